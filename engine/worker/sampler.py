"""Per-sequence sampling state and the batched sampler.

``Sampler`` turns one step's logits into one token per row, in vLLM's order:
penalties, min_tokens masking, temperature, top-k, top-p, min-p, then either
argmax (greedy rows) or the exponential race (random rows). The returned
logprobs are computed from the raw logits, before any of that processing,
which is what vLLM returns by default.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from radixserve.engine.sampling_params import _U64, SamplingParams


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _sorted_values(x: torch.Tensor) -> torch.Tensor:
    """``x`` sorted ascending along the last dim, values only."""
    if x.device.type == "cpu":
        # torch's CPU sort always carries indices and is ~20x slower than
        # numpy's value-only sort (32 x 8192: 8 ms against 0.45 ms).
        return torch.from_numpy(np.sort(x.detach().numpy(), axis=-1))
    return x.sort(dim=-1).values


def _argmax(x: torch.Tensor) -> torch.Tensor:
    """Row-wise argmax; the first (lowest) index wins ties, like torch.argmax."""
    if x.device.type == "cpu":
        # torch's CPU argmax is ~6x slower than numpy's (32 x 8192: 150 us against 23 us).
        return torch.from_numpy(np.argmax(x.detach().numpy(), axis=-1))
    return x.argmax(dim=-1)


def _device_key(d: torch.device) -> tuple[str, int]:
    # torch.device("cuda") != torch.device("cuda:0"), yet they are one device.
    return d.type, d.index or 0


def _same_device(a: torch.device, b: torch.device) -> bool:
    return _device_key(a) == _device_key(b)


def _ge(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """1.0 where a >= b (broadcast), else 0.0, as float32.

    Written straight into a float tensor: a bool result and its promotion
    back to float cost ~5x more on CPU.
    """
    out = torch.empty(torch.broadcast_shapes(a.shape, b.shape), device=a.device)
    return torch.ge(a, b, out=out)


def _token_slots(prompts: list[np.ndarray], outputs: list[list[int]],
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row j lists prompts[j] + outputs[j], right-padded with a repeat of its last id.

    Returns ids [rows, max_len] int64 and is_output [rows, max_len] float32
    (1.0 on output slots). A pad repeats a real token, so anything computed
    per (row, token) is the same on the pad, and scattering it back is safe.
    Built with numpy: torch.tensor() on a Python list is ~8x slower.
    """
    lens = [len(p) + len(o) for p, o in zip(prompts, outputs)]
    ids = np.zeros((len(lens), max(lens)), dtype=np.int64)
    is_output = np.zeros(ids.shape, dtype=np.float32)
    for j, (p, o) in enumerate(zip(prompts, outputs)):
        ids[j, :len(p)] = p
        ids[j, len(p):lens[j]] = o
        ids[j, lens[j]:] = ids[j, lens[j] - 1]
        is_output[j, len(p):lens[j]] = 1.0
    return torch.from_numpy(ids).to(device), torch.from_numpy(is_output).to(device)


def derive_seed(seed: int, child_index: int) -> int:
    """Seed of child ``child_index`` of a seeded request (child 0 keeps ``seed``).

    A splitmix64 step keeps children of nearby seeds apart, so children differ
    from each other yet a request with the same seed reproduces them all.
    """
    seed &= _U64
    if child_index == 0:
        return seed
    z = (seed + child_index * 0x9E3779B97F4A7C15) & _U64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _U64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _U64
    return z ^ (z >> 31)


@dataclass
class SeqSamplingState:
    """What the sampling worker keeps per sequence between steps.

    The ``Sampler`` only reads it (and advances ``generator``): the caller
    appends each sampled token to ``output_token_ids`` after the step, which
    the penalties and min_tokens of the next step depend on.
    """

    params: SamplingParams
    generator: torch.Generator | None  # own noise stream of a seeded request
    prompt_token_ids: list[int]
    output_token_ids: list[int] = field(default_factory=list)
    # Prompt ids as an array, built once for the repetition penalty.
    _prompt_np: np.ndarray | None = field(default=None, repr=False, compare=False)

    @classmethod
    def create(cls, params: SamplingParams, prompt_token_ids: list[int], child_index: int = 0,
               device: torch.device | str = "cpu") -> SeqSamplingState:
        """State of child ``child_index`` of a request.

        ``device`` is where the logits will live: a seeded request's generator
        must be there to draw its noise in place (a mismatch still works, but
        draws on the generator's device and copies every step).
        """
        gen = None
        if params.seed is not None:
            gen = torch.Generator(device=device)
            gen.manual_seed(derive_seed(params.seed, child_index))
        return cls(params=params, generator=gen, prompt_token_ids=list(prompt_token_ids))

    def prompt_np(self) -> np.ndarray:
        if self._prompt_np is None:
            self._prompt_np = np.asarray(self.prompt_token_ids, dtype=np.int64)
        return self._prompt_np


@dataclass
class SamplerOutput:
    """One entry per logits row."""

    token_ids: list[int]
    logprobs: list[float]  # raw logprob of the sampled token
    top_logprobs: list[list[tuple[int, float]] | None]  # params.logprobs best, desc; else None


@dataclass
class _Plan:
    """Which rows need which processing this step (built by one pass over states)."""

    random_rows: list[int]
    penalty_rows: list[int]
    min_tokens_rows: list[int]
    logprob_rows: list[int]


class Sampler:
    """Batched sampler; one call per step over every row that samples.

    ``eos_token_ids`` are masked (with ``stop_token_ids``) until ``min_tokens``
    tokens have been generated. Unseeded random rows draw their noise from a
    sampler-wide generator seeded with ``seed``; seeded rows from their own, so
    a seeded request gives the same tokens whatever else shares the batch.
    """

    def __init__(self, eos_token_ids: frozenset[int] = frozenset(), seed: int = 0):
        self.eos_token_ids = frozenset(eos_token_ids)
        self.seed = seed
        self._generators: dict[tuple[str, int], torch.Generator] = {}  # one stream per device

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, states: list[SeqSamplingState]) -> SamplerOutput:
        _require(logits.dim() == 2 and logits.shape[0] == len(states),
                 f"logits must be [num_rows={len(states)}, vocab], got {tuple(logits.shape)}")
        logits = logits.float()  # [num_rows, vocab]; no copy when already float32
        plan = self._plan(states)
        # Raw logprobs, before any processing (vLLM's default). A full
        # log_softmax is cheaper on CPU than logsumexp alone.
        logprobs = logits.log_softmax(dim=-1)  # [num_rows, vocab]
        top = self._top_logprobs(logprobs, states, plan.logprob_rows)

        x = self._penalised(logits, states, plan)
        tokens = _argmax(x)  # [num_rows]; the answer for greedy rows
        if plan.random_rows:
            rows = torch.tensor(plan.random_rows, device=x.device)
            tokens[rows] = self._sample_random(x.index_select(0, rows),
                                               [states[i] for i in plan.random_rows])

        token_lp = logprobs.gather(1, tokens[:, None]).squeeze(1)  # [num_rows]
        return SamplerOutput(token_ids=tokens.tolist(), logprobs=token_lp.tolist(),
                             top_logprobs=top)

    @torch.inference_mode()
    def penalised_logits(self, logits: torch.Tensor,
                         states: list[SeqSamplingState]) -> torch.Tensor:
        """Logits after penalties and min_tokens masking: what greedy rows take
        the argmax of and random rows go on from. A copy when anything changed."""
        return self._penalised(logits.float(), states, self._plan(states))

    def _penalised(self, logits: torch.Tensor, states: list[SeqSamplingState],
                   plan: _Plan) -> torch.Tensor:
        if not (plan.penalty_rows or plan.min_tokens_rows):
            return logits
        x = logits.clone()  # the raw logits stay untouched for the logprobs
        if plan.penalty_rows:
            self._apply_penalties(x, states, plan.penalty_rows)
        if plan.min_tokens_rows:
            self._mask_stop_tokens(x, states, plan.min_tokens_rows)
        return x

    def _plan(self, states: list[SeqSamplingState]) -> _Plan:
        plan = _Plan([], [], [], [])
        for i, s in enumerate(states):
            p = s.params
            if not p.is_greedy:
                plan.random_rows.append(i)
            if p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0:
                plan.penalty_rows.append(i)
            if len(s.output_token_ids) < p.min_tokens:
                plan.min_tokens_rows.append(i)
            if p.logprobs is not None:
                plan.logprob_rows.append(i)
        return plan

    @staticmethod
    def _top_logprobs(logprobs: torch.Tensor, states: list[SeqSamplingState],
                      rows: list[int]) -> list[list[tuple[int, float]] | None]:
        top: list[list[tuple[int, float]] | None] = [None] * len(states)
        if not rows:
            return top
        ks = [states[i].params.logprobs for i in rows]
        k_max = min(max(ks), logprobs.shape[1])
        idx = torch.tensor(rows, device=logprobs.device)
        vals, ids = logprobs[idx].topk(k_max, dim=-1)  # [len(rows), k_max], sorted desc
        vals, ids = vals.tolist(), ids.tolist()
        for j, (i, k) in enumerate(zip(rows, ks)):
            top[i] = list(zip(ids[j][:k], vals[j][:k]))
        return top

    @staticmethod
    def _apply_penalties(x: torch.Tensor, states: list[SeqSamplingState], rows: list[int]) -> None:
        """Penalise ``x[rows]`` in place: repetition over prompt+output, presence/frequency over output.

        Only the logits of tokens the sequence has seen change, so they are
        gathered, penalised and scattered back: a few [rows, seq_len] tensors
        rather than several [rows, vocab] temporaries per step.
        """
        dev, vocab = x.device, x.shape[1]
        use_prompt = any(states[i].params.repetition_penalty != 1.0 for i in rows)
        empty = np.zeros(0, dtype=np.int64)
        prompts = [states[i].prompt_np() if use_prompt else empty for i in rows]
        outs = [states[i].output_token_ids for i in rows]
        keep = [j for j in range(len(rows)) if len(prompts[j]) + len(outs[j]) > 0]
        if not keep:  # nothing seen yet: nothing to penalise
            return
        rows = [rows[j] for j in keep]
        params = [states[i].params for i in rows]
        ids, is_output = _token_slots([prompts[j] for j in keep], [outs[j] for j in keep], dev)
        # [len(rows), vocab] output occurrences, read back per slot: [len(rows), seq_len]
        counts = torch.zeros(len(rows), vocab, device=dev).scatter_add_(1, ids, is_output)
        count = counts.gather(1, ids)
        flat = torch.tensor(rows, device=dev)[:, None] * vocab + ids  # slots in x.view(-1)
        vals = x.view(-1)[flat]  # [len(rows), seq_len]

        rep = torch.tensor([p.repetition_penalty for p in params], device=dev)[:, None]
        freq = torch.tensor([p.frequency_penalty for p in params], device=dev)[:, None]
        pres = torch.tensor([p.presence_penalty for p in params], device=dev)[:, None]
        # HF/vLLM: a seen token's positive logit is divided, a negative one
        # multiplied, so a penalty > 1 always makes it less likely (-inf stays -inf).
        vals = vals.clamp(min=0) / rep + vals.clamp(max=0) * rep
        vals = vals - freq * count - pres * count.clamp(max=1)
        x.view(-1)[flat] = vals  # duplicate slots write identical values

    def _mask_stop_tokens(self, x: torch.Tensor, states: list[SeqSamplingState],
                          rows: list[int]) -> None:
        """min_tokens: rows that have not generated enough yet may not pick EOS or a stop token."""
        vocab = x.shape[1]
        r_idx: list[int] = []
        t_idx: list[int] = []
        for i in rows:
            p = states[i].params
            # With ignore_eos the scheduler never stops on EOS, so it needs no mask.
            stops = set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_token_ids)
            for t in stops:
                if t < vocab:
                    r_idx.append(i)
                    t_idx.append(t)
        if r_idx:
            x[torch.tensor(r_idx, device=x.device),
              torch.tensor(t_idx, device=x.device)] = float("-inf")

    def _sample_random(self, x: torch.Tensor, states: list[SeqSamplingState]) -> torch.Tensor:
        """Temperature, top-k, top-p, min-p and the exponential race over ``x`` (a copy we own).

        Works on unnormalised probabilities ``w = exp(x - max)`` (the most
        likely token has w = 1) and filters by multiplying with keep masks:
        the race is scale-invariant, so no renormalisation is needed.
        """
        dev, vocab = x.device, x.shape[1]
        params = [s.params for s in states]
        temps = torch.tensor([p.temperature for p in params], device=dev)
        x.div_(temps[:, None])  # [num_random, vocab]
        w = (x - x.amax(dim=-1, keepdim=True)).exp_()  # [num_random, vocab]

        top_ks = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
        top_ps = [p.top_p for p in params]
        if min(top_ks) < vocab or min(top_ps) < 1.0:
            w.mul_(_ge(x, self._top_k_top_p_cutoff(x, top_ks, top_ps)))
        min_ps = [p.min_p for p in params]
        if max(min_ps) > 0.0:
            # w is the probability relative to the most likely token, which
            # survives top-k/top-p, so this is vLLM's p < min_p * max_p test.
            w.mul_(_ge(w, torch.tensor(min_ps, device=dev)[:, None]))

        # Exponential race: argmax(w_i / E_i) with E_i ~ Exp(1) picks i with
        # probability w_i / sum(w) (the Gumbel-max trick in disguise) and needs
        # no cumulative sum, so rows stay independent and vectorised.
        # E = -log(U) with U in [0, 1) is never 0, so w = 0 gives 0, not NaN;
        # it is also ~3x faster on CPU than Tensor.exponential_.
        u = torch.empty_like(w).uniform_(generator=self._generator(dev))
        for j, s in enumerate(states):
            g = s.generator
            if g is None:
                continue
            if _same_device(g.device, dev):
                u[j].uniform_(generator=g)
            else:  # a seeded state made for another device: draw there, then move
                u[j] = torch.empty(vocab, device=g.device).uniform_(generator=g).to(dev)
        e = u.log_().neg_()  # [num_random, vocab]; Exp(1) noise
        return _argmax(w / e)

    @staticmethod
    def _top_k_top_p_cutoff(x: torch.Tensor, top_ks: list[int], top_ps: list[float]) -> torch.Tensor:
        """Per-row logit cut-off of top-k and top-p: keep tokens with x >= cutoff.

        Both filters are value thresholds on one ascending sort of the values
        (no indices needed), so tokens tied with the cut-off are all kept.
        Top-p drops the least likely tokens whose cumulative probability is
        <= 1 - top_p (after top-k), as vLLM does; the most likely token
        always survives.
        """
        dev, vocab = x.device, x.shape[1]
        sorted_x = _sorted_values(x)  # [num_random, vocab], ascending
        k = torch.tensor(top_ks, device=dev)
        kth = sorted_x.gather(1, (vocab - k)[:, None])  # [num_random, 1]; k-th largest
        sorted_w = (sorted_x - sorted_x[:, -1:]).exp_().mul_(_ge(sorted_x, kth))
        cum = sorted_w.cumsum(dim=-1)  # [num_random, vocab]; ascending, unnormalised
        p = torch.tensor(top_ps, device=dev)[:, None]
        num_drop = _ge((1 - p) * cum[:, -1:], cum).sum(dim=-1, keepdim=True).long()
        return torch.maximum(kth, sorted_x.gather(1, num_drop.clamp_(max=vocab - 1)))

    def _generator(self, device: torch.device) -> torch.Generator:
        key = _device_key(device)
        g = self._generators.get(key)
        if g is None:
            g = torch.Generator(device=device)
            g.manual_seed(self.seed)
            self._generators[key] = g
        return g
