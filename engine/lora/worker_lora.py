"""One rank's LoRA state: the hooks on its model shard and the slots they hold.

``apply(loads)`` runs before a step's forward: for each ``LoRALoad`` it takes
this rank's shard of the adapter (from a host-memory LRU of ``max_cpu_loras``
adapters keyed by content hash, else from disk, checked against the hash the
engine validated) and copies it into the slot. All ranks agree on which loads
failed (one small all-reduce, only on steps that load), so either every rank
runs the forward or none does.

Every rank reads the whole adapter file, not just its slice: the content hash
covers all tensors, and verifying it is what guarantees a rank never serves
weights other than those the engine namespaced. Adapters are small next to
the base model, so this costs little.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.distributed as dist

from radixserve.engine.config import LoRAConfig
from radixserve.engine.core.scheduler_output import LoRALoad, LoRALoadError
from radixserve.engine.lora.adapter import ROW_PARALLEL, ParsedAdapter, read_adapter
from radixserve.engine.lora.layers import LoRABatch, LoRAContext, LoRALinear, TorchLoRAOps, TritonLoRAOps
from radixserve.engine.model.hf_config import ArchConfig
from radixserve.engine.worker.distributed import TPGroup

# (layer, module) -> this rank's (a, b * scaling), in the model dtype, on the host
Shards = dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]

_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "o_proj": ("o_proj",),
          "gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}


class WorkerLoRAManager:
    def __init__(self, model, config: LoRAConfig, arch: ArchConfig, tp: TPGroup, dtype: torch.dtype,
                 device: torch.device, use_triton: bool):
        self.config = config
        self.arch = arch
        self.tp = tp
        self.dtype = dtype
        self.device = device
        self.ctx = LoRAContext(TritonLoRAOps() if use_triton else TorchLoRAOps())
        self.hooks: dict[tuple[int, str], LoRALinear] = {}  # (layer, fused name) -> hook
        for i, layer in enumerate(model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            for fused, base in (("qkv_proj", attn.qkv_proj), ("o_proj", attn.o_proj),
                                ("gate_up_proj", mlp.gate_up_proj), ("down_proj", mlp.down_proj)):
                outs = list(base.local_sizes) if hasattr(base, "local_sizes") else [base.out_features]
                hook = LoRALinear(self.ctx, _FUSED[fused], base.weight.shape[1], outs, config.max_loras,
                                  config.max_lora_rank, dtype, device)
                base.lora = hook
                self.hooks[(i, fused)] = hook
        self._host: OrderedDict[str, Shards] = OrderedDict()  # content hash -> shards (LRU)

    # -- slots -------------------------------------------------------------------------------

    def apply(self, loads: list[LoRALoad]) -> list[LoRALoadError]:
        errors: dict[int, LoRALoadError] = {}
        for i, ld in enumerate(loads):
            try:
                self._fill(ld.slot, self._shards(ld))
            except (ValueError, OSError) as exc:
                errors[i] = LoRALoadError(ld.slot, ld.name, str(exc))
        if self.tp.size > 1:
            failed = torch.tensor([1 if i in errors else 0 for i in range(len(loads))], dtype=torch.int32,
                                  device=self.device)
            dist.all_reduce(failed, op=dist.ReduceOp.MAX, group=self.tp.group)
            for i in failed.nonzero().flatten().tolist():
                errors.setdefault(i, LoRALoadError(loads[i].slot, loads[i].name,
                                                   "the adapter failed to load on another tensor-parallel rank"))
        for err in errors.values():
            self.clear_slot(err.slot)
        return list(errors.values())

    def clear_slot(self, slot: int) -> None:
        for hook in self.hooks.values():
            hook.clear_slot(slot)

    def _fill(self, slot: int, shards: Shards) -> None:
        dev = self.device
        for (layer, fused), hook in self.hooks.items():
            weights = []
            for sub in hook.sub_names:
                w = shards.get((layer, sub))
                weights.append(None if w is None else (w[0].to(dev), w[1].to(dev)))
            hook.set_slot(slot, weights)

    def _shards(self, ld: LoRALoad) -> Shards:
        cached = self._host.get(ld.content_hash)
        if cached is not None:
            self._host.move_to_end(ld.content_hash)
            return cached
        parsed = read_adapter(ld.path, self.arch, self.config.max_lora_rank)
        if parsed.content_hash != ld.content_hash:
            raise ValueError(f"LoRA adapter {ld.name!r}: the files at {ld.path} changed since it was loaded "
                             f"(content hash {parsed.content_hash[:16]} != {ld.content_hash[:16]}); "
                             f"load it again")
        shards = self._shard(parsed)
        self._host[ld.content_hash] = shards
        while len(self._host) > self.config.cpu_cache_size:
            self._host.popitem(last=False)
        return shards

    def _shard(self, parsed: ParsedAdapter) -> Shards:
        """This rank's slices: column-parallel modules split B's rows, row-parallel ones A's columns."""
        out: Shards = {}
        rank, size = self.tp.rank, self.tp.size
        for key, m in parsed.modules.items():
            a, b = m.a.float(), m.b.float() * m.scaling
            if key[1] in ROW_PARALLEL:
                part = a.shape[1] // size
                a = a[:, rank * part:(rank + 1) * part]
            else:
                part = b.shape[0] // size
                b = b[rank * part:(rank + 1) * part]
            out[key] = (a.to(self.dtype).contiguous(), b.to(self.dtype).contiguous())
        return out

    # -- per step ------------------------------------------------------------------------------

    def set_batch(self, indptr: list[int], slots: list[int]) -> None:
        """Segments of the next forward: tokens indptr[g]:indptr[g+1] use slot slots[g]
        (-1 = base model). No segment with a slot >= 0 means no LoRA work at all."""
        self.ctx.batch = self._segments(indptr, slots)
        self.ctx.kept = None

    def set_kept_rows(self, row_slots: list[int]) -> None:
        """Slots of the rows the last layer keeps (one per sampled sequence, in row order)."""
        indptr, slots = [0], []
        for s in row_slots:
            if slots and slots[-1] == s:
                indptr[-1] += 1
            else:
                slots.append(s)
                indptr.append(indptr[-1] + 1)
        self.ctx.kept = self._segments(indptr, slots)

    def _segments(self, indptr: list[int], slots: list[int]) -> LoRABatch | None:
        lengths = [b - a for a, b, s in zip(indptr, indptr[1:], slots) if s >= 0]
        if not lengths:
            return None
        dev = self.device
        return LoRABatch(
            torch.tensor(indptr, dtype=torch.int32, device=dev), torch.tensor(slots, dtype=torch.int32, device=dev),
            max(lengths), frozenset(s for s in slots if s >= 0), list(indptr), list(slots))

    def clear_batch(self) -> None:
        self.ctx.batch = self.ctx.kept = None

