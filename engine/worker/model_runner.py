"""One rank's model, KV pool and (on rank 0) sampler: executes a SchedulerOutput."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from radixserve.engine.config import EngineConfig
from radixserve.engine.core.scheduler_output import (
    PromptLogprobs,
    SampledToken,
    ScheduledSeq,
    SchedulerOutput,
    StepResult,
)
from radixserve.engine.model.hf_config import ArchConfig
from radixserve.engine.model.layers import can_pack
from radixserve.engine.model.loader import build_model
from radixserve.engine.structured.mask import apply_grammar_mask
from radixserve.engine.worker.attention import AttentionMetadata, select_backend
from radixserve.engine.worker.distributed import TPGroup
from radixserve.engine.worker.sampler import Sampler, SeqSamplingState

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_CPU_DEFAULT_KV_GIB = 2.0


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was requested but CUDA is not available here")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    # CPU runs fp32 by default (exact HF parity; CPUs without avx512_bf16/AMX multiply bf16
    # far slower than fp32). With AMX bf16 linears run 3-7x faster: dtype="bfloat16" opts in.
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


@dataclass
class StepInputs:
    input_ids: torch.Tensor   # [num_tokens]
    positions: torch.Tensor   # [num_tokens]
    meta: AttentionMetadata
    last_index: list[int]     # per scheduled seq (SchedulerOutput order): flat index of its last token
    first_index: list[int]    # per scheduled seq: flat index of its first token


def _block_table(rows: list[list[int]], device: torch.device) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)
    table = np.zeros((len(rows), max(width, 1)), dtype=np.int32)  # padding never read
    for i, r in enumerate(rows):
        table[i, :len(r)] = r
    return torch.from_numpy(table).to(device)


class ModelRunner:
    def __init__(self, config: EngineConfig, model_dir: Path, arch: ArchConfig, tp: TPGroup,
                 device: torch.device, max_model_len: int, eos_token_ids: frozenset[int]):
        self.config = config
        self.arch = arch
        self.tp = tp
        self.device = device
        self.dtype = resolve_dtype(config.model.dtype, device)
        self.block_size = config.cache.block_size
        self.max_model_len = max_model_len
        self.model = build_model(arch, model_dir, tp, self.dtype, device, max_positions=max_model_len + 1)
        if config.model.cpu_linear == "packed" and can_pack(self.model.lm_head.weight):
            self.model.prepack()
        self.backend = select_backend(config.attention_backend, device)
        self.lora = None
        if config.lora.enable_lora:
            from radixserve.engine.lora.worker_lora import WorkerLoRAManager
            self.lora = WorkerLoRAManager(self.model, config.lora, arch, tp, self.dtype, device,
                                          use_triton=self.backend.name == "triton")
        self.num_kv_heads = arch.num_kv_heads // tp.size
        self.kv_cache: torch.Tensor | None = None
        self.host_cache: torch.Tensor | None = None  # the CPU tier's pool
        self.transfer = None  # CacheTransferServer, when there is a CPU tier
        self.sampler = Sampler(eos_token_ids, seed=config.model.seed) if tp.rank == 0 else None
        self.states: dict[int, SeqSamplingState] = {}

    # -- KV pool -------------------------------------------------------------

    @property
    def block_bytes(self) -> int:
        """Bytes of one block across all layers, K and V, on this rank."""
        elem = torch.tensor([], dtype=self.dtype).element_size()
        return (self.arch.num_layers * 2 * self.block_size * self.num_kv_heads
                * self.arch.head_dim * elem)

    def num_blocks_fitting(self) -> int:
        cache = self.config.cache
        if cache.num_gpu_blocks is not None:
            return cache.num_gpu_blocks
        if cache.kv_cache_gib is not None:
            return int(cache.kv_cache_gib * 2**30) // self.block_bytes
        if self.device.type != "cuda":
            # Room for every sequence at full length, capped: a bigger pool only costs RAM.
            cap = int(_CPU_DEFAULT_KV_GIB * 2**30) // self.block_bytes
            want = self.config.scheduler.max_num_seqs * -(-self.max_model_len // self.block_size)
            return max(1, min(cap, want))
        return self._profile_cuda_blocks()

    def _profile_cuda_blocks(self) -> int:
        """Run the largest step without KV to measure activation memory, then
        give the KV pool what ``gpu_memory_utilization`` leaves."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        n = self.config.scheduler.max_num_batched_tokens
        self.allocate_kv_cache(1)
        ids = torch.zeros(n, dtype=torch.long, device=self.device)
        pos = torch.arange(n, device=self.device) % max(1, self.model.layers[0].self_attn.rotary.cos.shape[0])
        meta = self._meta_prefill_only(n)
        hidden = self.model(ids, pos, self.kv_cache, meta, self.backend)
        self.model.compute_logits(hidden[-self.config.scheduler.max_num_seqs:])
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        self.kv_cache = None
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        others = total - free - torch.cuda.memory_reserved(self.device)
        budget = total * self.config.cache.gpu_memory_utilization - peak - others
        blocks = int(budget) // self.block_bytes
        if blocks < 1:
            raise ValueError(f"no GPU memory left for the KV cache (weights + activations peak at "
                             f"{peak / 2**30:.2f} GiB); raise gpu_memory_utilization or lower "
                             f"max_num_batched_tokens")
        return blocks

    def _meta_prefill_only(self, n: int) -> AttentionMetadata:
        dev = self.device
        i32 = torch.int32
        return AttentionMetadata(
            slot_mapping=torch.full((n,), -1, dtype=torch.long, device=dev),
            num_decodes=0, decode_block_tables=torch.zeros(0, 1, dtype=i32, device=dev),
            decode_seq_lens=torch.zeros(0, dtype=i32, device=dev), num_prefills=1,
            prefill_block_tables=torch.zeros(1, 1, dtype=i32, device=dev),
            prefill_query_start_loc=torch.tensor([0, n], dtype=i32, device=dev),
            prefill_seq_lens=torch.tensor([n], dtype=i32, device=dev))

    def _pool_shape(self, num_blocks: int) -> tuple[int, ...]:
        return (self.arch.num_layers, 2, num_blocks, self.block_size, self.num_kv_heads, self.arch.head_dim)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        # Zeroed, so padding positions read by the attention are never NaN.
        self.kv_cache = torch.zeros(self._pool_shape(num_blocks), dtype=self.dtype, device=self.device)

    def allocate_host_pool(self, num_blocks: int) -> torch.Tensor:
        """The CPU tier: same layout in host memory, pinned for async copies on CUDA."""
        pin = self.device.type == "cuda"
        self.host_cache = torch.zeros(self._pool_shape(num_blocks), dtype=self.dtype, pin_memory=pin)
        return self.host_cache

    # -- one step --------------------------------------------------------------

    def _prepare(self, so: SchedulerOutput) -> StepInputs:
        bs = self.block_size
        # Decodes first (attention needs it); with LoRA, each group by adapter slot too,
        # so every adapter's tokens form few contiguous segments.
        order = sorted(range(len(so.seqs)), key=lambda i: (len(so.seqs[i].token_ids) != 1, so.seqs[i].lora_slot))
        ids, pos, slots = [], [], []
        first_index, last_index = [0] * len(so.seqs), [0] * len(so.seqs)
        decode_rows, decode_lens, prefill_rows, prefill_lens, qsl = [], [], [], [], [0]
        offset = 0
        for i in order:
            s = so.seqs[i]
            n = len(s.token_ids)
            p = np.arange(s.start_pos, s.start_pos + n, dtype=np.int64)
            blocks = np.asarray(s.block_ids, dtype=np.int64)
            ids.append(np.asarray(s.token_ids, dtype=np.int64))
            pos.append(p)
            slots.append(blocks[p // bs] * bs + p % bs)
            first_index[i], last_index[i] = offset, offset + n - 1
            offset += n
            if n == 1:
                decode_rows.append(s.block_ids)
                decode_lens.append(s.start_pos + 1)
            else:
                prefill_rows.append(s.block_ids)
                prefill_lens.append(s.start_pos + n)
                qsl.append(qsl[-1] + n)
        if self.lora is not None:
            self._set_lora_batch(so, order, first_index)
        dev = self.device
        i32 = torch.int32
        meta = AttentionMetadata(
            slot_mapping=torch.from_numpy(np.concatenate(slots)).to(dev),
            num_decodes=len(decode_rows),
            decode_block_tables=_block_table(decode_rows, dev),
            decode_seq_lens=torch.tensor(decode_lens, dtype=i32, device=dev),
            num_prefills=len(prefill_rows),
            prefill_block_tables=_block_table(prefill_rows, dev),
            prefill_query_start_loc=torch.tensor(qsl, dtype=i32, device=dev),
            prefill_seq_lens=torch.tensor(prefill_lens, dtype=i32, device=dev))
        return StepInputs(torch.from_numpy(np.concatenate(ids)).to(dev),
                          torch.from_numpy(np.concatenate(pos)).to(dev), meta, last_index, first_index)

    def _set_lora_batch(self, so: SchedulerOutput, order: list[int], first_index: list[int]) -> None:
        indptr, seg_slots = [0], []
        for i in order:
            s = so.seqs[i]
            end = first_index[i] + len(s.token_ids)
            if seg_slots and seg_slots[-1] == s.lora_slot:
                indptr[-1] = end
            else:
                seg_slots.append(s.lora_slot)
                indptr.append(end)
        self.lora.set_batch(indptr, seg_slots)

    def _update_states(self, so: SchedulerOutput) -> None:
        for seq_id in so.finished_seq_ids:
            self.states.pop(seq_id, None)
        if self.sampler is None:
            return
        for ns in so.new_samplers:
            state = SeqSamplingState.create(ns.params, ns.prompt_token_ids,
                                            child_index=ns.child_index, device=self.device)
            state.output_token_ids.extend(ns.output_token_ids)
            self.states[ns.seq_id] = state

    @torch.inference_mode()
    def execute(self, so: SchedulerOutput) -> StepResult:
        timeout = self.config.parallel.worker_timeout_s
        if so.transfers_before_forward:  # evicted blocks are copied out before anything overwrites them
            self.transfer.wait(so.transfers_before_forward, timeout_s=timeout)
        if so.block_copies:
            src, dst = zip(*so.block_copies)
            self.backend.copy_blocks(self.kv_cache, torch.tensor(src, device=self.device),
                                     torch.tensor(dst, device=self.device))
        self._update_states(so)
        result = StepResult(so.step_id)
        if so.lora_loads:
            # A load that fails on any rank skips the forward on every rank; the engine
            # fails that adapter's requests and reschedules the rest.
            result.lora_errors = self.lora.apply(so.lora_loads)
        if so.seqs and not result.lora_errors:
            self._forward(so, result)
        pending = [t for t in so.wait_transfers if t not in so.transfers_before_forward]
        if pending:  # this step's write-backs must land before any block is reused
            self.transfer.wait(pending, timeout_s=timeout)
        return result

    def _forward(self, so: SchedulerOutput, result: StepResult) -> None:
        inputs = self._prepare(so)
        # in row order, so that keeping every row is the identity
        sources = sorted({r.source for r in so.sample_rows}, key=lambda i: inputs.last_index[i])
        sample_index = [inputs.last_index[i] for i in sources]
        # Only the sampled rows need the last layer's output, unless prompt logprobs read every row.
        prune = all(s.prompt_logprobs is None for s in so.seqs)
        keep = torch.tensor(sample_index, dtype=torch.long, device=self.device) if prune else None
        if prune and self.lora is not None:
            self.lora.set_kept_rows([so.seqs[i].lora_slot for i in sources])
        try:
            hidden = self.model(inputs.input_ids, inputs.positions, self.kv_cache, inputs.meta, self.backend, keep)
        finally:
            if self.lora is not None:
                self.lora.clear_batch()
        if so.sample_rows:
            row_of = {src: i for i, src in enumerate(sources)}
            logits = self.model.compute_logits(hidden if prune else hidden[sample_index])
            if self.sampler is not None:  # every rank joins the logits gather; rank 0 samples
                result.sampled = self._sample(so, logits, row_of)
        for i, s in enumerate(so.seqs):
            if s.prompt_logprobs is not None:
                plp = self._prompt_logprobs(s, hidden[inputs.first_index[i]:inputs.last_index[i] + 1])
                if plp is not None:
                    result.prompt_logprobs.append(plp)

    def _sample(self, so: SchedulerOutput, logits: torch.Tensor, row_of: dict[int, int]) -> list[SampledToken]:
        rows = torch.tensor([row_of[r.source] for r in so.sample_rows], device=logits.device)
        states = [self.states[r.seq_id] for r in so.sample_rows]
        logits = logits[rows]  # [num_sample_rows, vocab], a copy
        apply_grammar_mask(logits, so.grammar_mask)  # structured outputs: constrained rows only
        out = self.sampler(logits, states)
        sampled = []
        for i, r in enumerate(so.sample_rows):
            states[i].output_token_ids.append(out.token_ids[i])
            sampled.append(SampledToken(r.seq_id, out.token_ids[i], out.logprobs[i], out.top_logprobs[i]))
        return sampled

    def _prompt_logprobs(self, s: ScheduledSeq, hidden: torch.Tensor) -> PromptLogprobs | None:
        # Position j predicts token j+1: targets are the chunk's own tokens
        # shifted by one, plus the first token of the next chunk if any.
        targets = s.token_ids[1:] + ([s.next_prompt_token] if s.next_prompt_token >= 0 else [])
        if not targets:
            return None
        logits = self.model.compute_logits(hidden[:len(targets)])  # [len(targets), vocab]
        if self.sampler is None:
            return None
        logprobs = torch.log_softmax(logits, dim=-1)
        tgt = torch.tensor(targets, device=logprobs.device)
        token_lp = logprobs.gather(1, tgt[:, None]).squeeze(1).tolist()
        top = None
        if s.prompt_logprobs:
            vals, idx = logprobs.topk(s.prompt_logprobs, dim=-1)
            top = [list(zip(i, v)) for i, v in zip(idx.tolist(), vals.tolist())]
        return PromptLogprobs(s.seq_id, s.start_pos, token_lp, top)
