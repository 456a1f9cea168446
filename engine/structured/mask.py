"""Apply a step's grammar bitmasks to the logits of the rows that sample (rank 0)."""
from __future__ import annotations

import numpy as np
import torch

from radixserve.engine.core.scheduler_output import GrammarMask


def allowed_tokens(mask: GrammarMask, vocab: int) -> np.ndarray:
    """[len(mask.rows), vocab] bool: bit t % 32 of int32 word t // 32 set = token t allowed."""
    words = np.frombuffer(mask.bitmask, dtype="<i4").reshape(len(mask.rows), mask.num_words)
    bits = np.unpackbits(words.view(np.uint8), axis=1, bitorder="little")  # [rows, 32 * words]
    if bits.shape[1] < vocab:  # logits wider than the grammar's vocabulary: the rest is never allowed
        bits = np.pad(bits, ((0, 0), (0, vocab - bits.shape[1])))
    return bits[:, :vocab].astype(bool)


@torch.inference_mode()
def apply_grammar_mask(logits: torch.Tensor, mask: GrammarMask | None) -> None:
    """Set the forbidden tokens of ``mask.rows`` to -inf, in place; other rows are untouched.

    ``logits`` is [num_sample_rows, vocab] in ``SchedulerOutput.sample_rows`` order.
    """
    if mask is None or not mask.rows:
        return
    rows = torch.tensor(mask.rows, device=logits.device)
    allowed = torch.from_numpy(allowed_tokens(mask, logits.shape[1])).to(logits.device)  # [rows, vocab]
    sub = logits.index_select(0, rows).masked_fill_(~allowed, float("-inf"))
    logits.index_copy_(0, rows, sub)
