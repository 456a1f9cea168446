"""Helpers shared by several test modules (no test module imports another).

Cache: sequences built by hand and run through a KVCacheManager without a model.
Models: Hugging Face references (greedy tokens and logprobs), HF model directories
written by a test, and random PEFT LoRA adapters.
"""
from __future__ import annotations

import itertools
import json
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from radixserve.engine import LLM, SamplingParams
from radixserve.engine.cache.hashing import root_hash
from radixserve.engine.cache.kv_manager import KVCacheManager
from radixserve.engine.core.sequence import Request, Sequence
from radixserve.engine.lora.adapter import TARGET_MODULES, module_shapes

# ----------------------------------------------------------------------------- cache

_ids = itertools.count()


BS = 4  # the block size of the bookkeeping tests (make_seq's default)
EOS = 3  # their end-of-sequence token


def make_request(tokens: list[int], params: SamplingParams, arrival: float | None = None) -> Request:
    """A request of block size BS, with its n / best_of sequences forked from the first."""
    req = Request(f"r{next(_ids)}", None, list(tokens), params, (),
                  arrival if arrival is not None else float(next(_ids)))
    root = root_hash(())
    head = Sequence(next(_ids), req, 0, list(tokens), BS, root)
    req.seqs.append(head)
    for i in range(1, params.best_of or params.n):
        req.seqs.append(Sequence(next(_ids), req, i, list(tokens), BS, root,
                                 block_hashes=list(head.block_hashes), parent=head))
    return req


def make_seq(tokens: list[int], namespace: tuple[str, ...] = (), block_size: int = 4) -> Sequence:
    req = Request(f"r{next(_ids)}", None, list(tokens), SamplingParams(), namespace)
    seq = Sequence(next(_ids), req, 0, list(tokens), block_size, root_hash(namespace))
    req.seqs.append(seq)
    return seq


def compute(kv: KVCacheManager, seq: Sequence, n: int) -> None:
    """What the scheduler + a step do: allocate, compute n tokens, commit."""
    assert kv.allocate(seq, n)
    seq.num_computed_tokens += n
    kv.commit(seq)


def tree_tiers(kv: KVCacheManager) -> dict[int, set[str]]:
    """Block hash -> the tiers holding it, read through the cache's snapshot."""
    return {e.block_hash: set(e.tiers) for e in kv.snapshot().blocks}


def complete_all(kv: KVCacheManager, ok: bool = True) -> None:
    for t in kv.take_transfers():
        kv.complete_transfer(t.task_id, ok)


def settle(kv: KVCacheManager, ok: bool = True) -> None:
    """End a step: plan its swap-outs, then complete every transfer started."""
    kv.plan_transfers()
    complete_all(kv, ok)


def run_seq(kv: KVCacheManager, tokens: list[int]) -> Sequence:
    seq = make_seq(tokens, block_size=kv.block_size)
    hit = kv.lookup(seq)
    assert kv.allocate(seq, seq.num_tokens - hit.num_tokens(kv.block_size), hit)
    assert not kv.is_swapping_in(seq)
    seq.num_computed_tokens = seq.num_tokens
    kv.commit(seq)
    return seq


# ----------------------------------------------------------------------------- Hugging Face references

LOGPROB_ATOL = 2e-4


def hf_greedy(model, prompt: list[int], max_new: int) -> tuple[list[int], list[float]]:
    """HF greedy generation and the logprob of each chosen token (EOS ignored, like ignore_eos)."""
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                         output_scores=True, return_dict_in_generate=True, eos_token_id=None,
                         pad_token_id=0, min_new_tokens=max_new)
    gen = out.sequences[0, len(prompt):].tolist()
    # Raw-logit logprobs from one full forward pass (generate's scores are processed logits).
    with torch.no_grad():
        logits = model(out.sequences).logits[0, len(prompt) - 1:-1].float()
    lps = torch.log_softmax(logits, -1).gather(1, torch.tensor(gen)[:, None]).squeeze(1).tolist()
    return gen, lps


def random_prompts(n: int, vocab: int, seed: int, lo: int = 3, hi: int = 60) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(5, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def assert_matches_hf(hf_model, llm: LLM, prompts: list[list[int]], max_new: int,
                      atol: float = LOGPROB_ATOL) -> list:
    params = SamplingParams(temperature=0, max_tokens=max_new, ignore_eos=True, logprobs=0)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    for p, out in zip(prompts, outs):
        ref_tokens, ref_lps = hf_greedy(hf_model, p, max_new)
        comp = out.outputs[0]
        assert comp.token_ids == ref_tokens, f"prompt of {len(p)} tokens diverged from HF"
        ours = [lp[t].logprob for lp, t in zip(comp.logprobs, comp.token_ids)]
        assert max(abs(a - b) for a, b in zip(ours, ref_lps)) < atol
    return outs


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def write_hf_dir(path, tiny_dir, model_cls, config):
    torch.manual_seed(0)
    model = model_cls(config).eval()
    model.save_pretrained(path, max_shard_size="300KB")  # several shards + index.json
    for name in TOKENIZER_FILES:
        shutil.copy(tiny_dir / name, path / name)
    return model


# ----------------------------------------------------------------------------- LoRA adapters

def write_adapter(path: Path, arch, seed: int, r: int = 8, alpha: float = 16, modules=tuple(TARGET_MODULES),
                  scale: float = 0.1, **config) -> Path:
    """A random PEFT LoRA adapter for ``arch`` (B non-zero, unlike PEFT's init)."""
    path.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(arch.num_layers):
        for m in modules:
            in_f, out_f = module_shapes(arch)[m]
            prefix = f"base_model.model.model.layers.{i}.{TARGET_MODULES[m]}.{m}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(r, in_f, generator=gen) * scale
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_f, r, generator=gen) * scale
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": list(modules),
           "bias": "none", "use_dora": False, "modules_to_save": None, **config}
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return path


# ----------------------------------------------------------------------------- processes

def listening_addresses(pid: int) -> set[str]:
    """"ip:port" of every TCP socket process ``pid`` listens on (read from /proc, Linux)."""
    import ipaddress
    import os
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if cols[3] != "0A" or cols[9] not in inodes:  # 0A = LISTEN
                    continue
                hexip, hexport = cols[1].split(":")
                raw = bytes.fromhex(hexip)
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # per-word little-endian
                found.add(f"{ipaddress.ip_address(raw)}:{int(hexport, 16)}")
    return found
