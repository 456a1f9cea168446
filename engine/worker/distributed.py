"""Tensor-parallel group: the collectives the model layers need.

With size 1 every collective is the identity, so the same model code runs
single-rank without torch.distributed being initialised.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TPGroup:
    rank: int = 0
    size: int = 1
    group: Any = None  # torch.distributed ProcessGroup; None = default group

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.size:
            raise ValueError(f"tensor-parallel rank {self.rank} outside [0, {self.size})")

    def shard(self, n: int, what: str) -> int:
        """Per-rank share of ``n`` (heads, features), which must divide evenly."""
        if n % self.size:
            raise ValueError(f"{what} = {n} is not divisible by tensor_parallel_size = {self.size}")
        return n // self.size

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1 and x.numel():  # every rank has the same shape: all skip together
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """[..., n] on every rank -> [..., size * n], ranks in order."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)
