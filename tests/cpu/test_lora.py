"""Multi-LoRA serving: correctness against transformers with the LoRA merged into
the weights, mixed-adapter batches, per-adapter prefix caching, reloads, LRU
slots, TP=2, and bad adapter directories.

The tests write their own random PEFT adapters (adapter_config.json +
adapter_model.safetensors with PEFT's tensor names) for the tiny model.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from radixserve.engine import LLM, LoRARequest, SamplingParams
from radixserve.engine.core.scheduler_output import LoRALoad, LoRALoadError, ScheduledSeq, SchedulerOutput, StepResult
from radixserve.engine.executor import wire
from radixserve.engine.executor.protocol import ENGINE_TO_WORKER, WORKER_TO_ENGINE, StepReply
from radixserve.engine.lora.adapter import TARGET_MODULES
from radixserve.engine.model.hf_config import load_arch_config
from tests.cpu.helpers import hf_greedy, random_prompts, write_adapter

LOGPROB_ATOL = 2e-4
MAX_NEW = 10
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=0)
ALL = tuple(TARGET_MODULES)


# ----------------------------------------------------------------------------- adapters

def merged_hf(tiny_dir, adapter_dir: Path):
    """transformers' LlamaForCausalLM with W += scaling * B @ A merged by hand."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    r, alpha = cfg["r"], cfg["lora_alpha"]
    scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, a in tensors.items():
            if ".lora_A." not in name:
                continue
            b = tensors[name.replace(".lora_A.", ".lora_B.")]
            target = name.replace("base_model.model.", "", 1).replace(".lora_A.weight", ".weight")
            params[target] += scaling * (b.double() @ a.double()).float()
    return model


def token_logprobs(out) -> list[float]:
    comp = out.outputs[0]
    return [lp[t].logprob for lp, t in zip(comp.logprobs, comp.token_ids)]


def assert_same(a, b, atol: float = LOGPROB_ATOL) -> None:
    assert a.outputs[0].token_ids == b.outputs[0].token_ids
    assert max(abs(x - y) for x, y in zip(token_logprobs(a), token_logprobs(b))) < atol


def assert_matches(hf_model, outs, prompts) -> None:
    for p, out in zip(prompts, outs):
        ref_tokens, ref_lps = hf_greedy(hf_model, p, MAX_NEW)
        assert out.outputs[0].token_ids == ref_tokens, f"prompt of {len(p)} tokens diverged from HF"
        assert max(abs(a - b) for a, b in zip(token_logprobs(out), ref_lps)) < LOGPROB_ATOL


def gen(llm: LLM, prompts, lora=None, params=GREEDY):
    return llm.generate([{"prompt_token_ids": p} for p in prompts], params, lora_request=lora)


@pytest.fixture(scope="module")
def arch(tiny_dir):
    return load_arch_config(tiny_dir)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, arch) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "full": write_adapter(root / "full", arch, seed=1),                       # r=8, alpha=16, all seven
        "qv": write_adapter(root / "qv", arch, seed=2, modules=("q_proj", "v_proj")),
        "rs4": write_adapter(root / "rs4", arch, seed=3, r=4, alpha=8, use_rslora=True,
                             modules=("k_proj", "o_proj", "gate_proj", "down_proj")),
    }


@pytest.fixture(scope="module")
def hf_refs(tiny_dir, adapters):
    return {name: merged_hf(tiny_dir, path) for name, path in adapters.items()}


@pytest.fixture(scope="module")
def prompts(arch):
    return random_prompts(3, arch.vocab_size, seed=11, lo=5, hi=50)


@pytest.fixture(scope="module")
def llm(tiny_dir, adapters):
    return LLM(str(tiny_dir), enable_lora=True, max_loras=4, max_lora_rank=8, max_model_len=512,
               lora_modules=[f"full={adapters['full']}"])


def lr(adapters, name: str) -> LoRARequest:
    return LoRARequest(name, str(adapters[name]))


# ----------------------------------------------------------------------------- correctness

@pytest.mark.parametrize("name", ["full", "qv", "rs4"])
def test_adapter_matches_hf_with_merged_lora(llm, adapters, hf_refs, hf_tiny, prompts, name):
    outs = gen(llm, prompts, lr(adapters, name))
    assert_matches(hf_refs[name], outs, prompts)
    base = [hf_greedy(hf_tiny, p, MAX_NEW)[0] for p in prompts]
    assert any(o.outputs[0].token_ids != b for o, b in zip(outs, base)), "the adapter changed nothing"


def test_peft_written_adapter_matches_peft_model(tmp_path, tiny_dir, llm):
    """PEFT's own save_pretrained format (incl. rank_pattern / alpha_pattern) vs PEFT's forward."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=list(ALL),
                          rank_pattern={"layers.1.self_attn.q_proj": 4}, alpha_pattern={"down_proj": 32})
    model = peft.get_peft_model(base, cfg).eval()
    torch.manual_seed(5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p) * 0.1)
    model.save_pretrained(tmp_path / "peft")
    prompts = random_prompts(2, 2048, seed=12)
    outs = gen(llm, prompts, LoRARequest("peft", str(tmp_path / "peft")))
    assert_matches(model, outs, prompts)
    llm.unload_lora("peft")


def test_mixed_adapter_batch_equals_each_alone(tiny_dir, adapters, prompts):
    # A 16-token step budget chunks the prefills, so one step mixes decodes and prefill
    # chunks of the base model and both adapters.
    llm = LLM(str(tiny_dir), enable_lora=True, max_loras=2, max_lora_rank=8, max_model_len=512,
              max_num_batched_tokens=16, enable_prefix_caching=False)
    loras = [None, lr(adapters, "full"), lr(adapters, "qv")]
    batch = gen(llm, prompts * 2, loras * 2)
    for p, lora, out in zip(prompts * 2, loras * 2, batch):
        assert_same(out, gen(llm, [p], lora)[0])


def test_no_cross_adapter_cache_hit(llm, adapters):
    shared = random_prompts(1, 2048, seed=13, lo=60, hi=60)[0]
    first = gen(llm, [shared], lr(adapters, "full"))[0]
    again = gen(llm, [shared], lr(adapters, "full"))[0]
    other = gen(llm, [shared], lr(adapters, "qv"))[0]
    base = gen(llm, [shared])[0]
    assert first.num_cached_tokens == 0 and again.num_cached_tokens == 48
    assert other.num_cached_tokens == 0 and base.num_cached_tokens == 0
    assert_same(first, again)
    assert gen(llm, [shared], lr(adapters, "qv"))[0].num_cached_tokens == 48


def test_reload_with_new_weights_has_no_stale_hit(tmp_path, tiny_dir, arch, llm, adapters, hf_refs):
    path = shutil.copytree(adapters["full"], tmp_path / "x")
    prompt = random_prompts(1, 2048, seed=14, lo=40, hi=40)
    old = gen(llm, prompt, LoRARequest("x", str(path)))[0]
    assert_matches(hf_refs["full"], [old], prompt)
    assert gen(llm, prompt, LoRARequest("x"))[0].num_cached_tokens == 32
    # Same name and path, new weights written in place: noticed on the next request.
    write_adapter(path, arch, seed=2, modules=("q_proj", "v_proj"))
    new = gen(llm, prompt, LoRARequest("x", str(path)))[0]
    assert new.num_cached_tokens == 0
    assert_matches(hf_refs["qv"], [new], prompt)
    # Explicit unload + load of other weights under the same name: fresh again.
    llm.unload_lora("x")
    shutil.rmtree(path)
    shutil.copytree(adapters["rs4"], path)
    info = llm.load_lora(LoRARequest("x", str(path)))
    assert info.namespace.startswith("lora:x:") and info.rank == 4
    fresh = gen(llm, prompt, LoRARequest("x"))[0]
    assert fresh.num_cached_tokens == 0
    assert_matches(hf_refs["rs4"], [fresh], prompt)
    shutil.rmtree(path)  # files gone: the loaded version keeps serving from its slot
    again = gen(llm, prompt, LoRARequest("x"))[0]
    assert again.num_cached_tokens == 32
    assert_same(again, fresh)
    llm.unload_lora("x")


def test_unload_drops_blocks_and_refuses_new_requests(llm, adapters):
    prompt = random_prompts(1, 2048, seed=15, lo=50, hi=50)
    gen(llm, prompt, lr(adapters, "qv"))
    kv, lora = llm.engine.kv, llm.engine.lora
    before, dropped = len(kv.tree), lora.stats.dropped_blocks
    llm.unload_lora("qv")
    assert lora.stats.dropped_blocks - dropped >= 3 and len(kv.tree) <= before - 3
    with pytest.raises(ValueError, match="'qv' is not loaded"):
        gen(llm, prompt, LoRARequest("qv"))
    assert "qv" not in [i.name for i in llm.list_loras()]
    kv.check_invariants([])


def test_unload_while_running_drains(tiny_dir, adapters):
    llm = LLM(str(tiny_dir), enable_lora=True, max_loras=2, max_lora_rank=8, max_model_len=512)
    engine = llm.engine
    prompt = random_prompts(1, 2048, seed=16, lo=40, hi=40)[0]
    ref = gen(llm, [prompt], lr(adapters, "full"))[0]
    engine.add_request("r", prompt_token_ids=prompt, params=GREEDY, lora_request=LoRARequest("full"))
    engine.step()
    engine.step()
    engine.unload_lora("full")  # returns at once; the running request keeps its adapter
    with pytest.raises(ValueError, match="not loaded"):
        engine.add_request("r2", prompt_token_ids=prompt, params=GREEDY, lora_request=LoRARequest("full"))
    outs = []
    while engine.has_unfinished_requests():
        outs += [o for o in engine.step() if o.finished]
    assert_same(outs[0], ref)
    assert engine.lora.num_resident == 0 and engine.lora.stats.dropped_blocks > 0
    engine.kv.check_invariants([])


def test_lru_three_adapters_two_slots(tiny_dir, adapters, hf_refs, prompts):
    llm = LLM(str(tiny_dir), enable_lora=True, max_loras=2, max_lora_rank=8, max_model_len=512)
    names = ["full", "qv", "rs4", "full"]
    for name in names:  # one after the other: each use evicts the least recently used idle adapter
        assert_matches(hf_refs[name], gen(llm, prompts[:1], lr(adapters, name)), prompts[:1])
    assert llm.engine.metrics.values["lora_slot_evictions"] >= 2
    # All three at once with two slots: the third waits for a slot to unpin.
    loras = [lr(adapters, n) for n in ("full", "qv", "rs4")]
    outs = gen(llm, prompts, loras)
    for name, p, out in zip(("full", "qv", "rs4"), prompts, outs):
        assert_matches(hf_refs[name], [out], [p])


def test_tp2_with_adapters_equals_tp1(tiny_dir, adapters, llm, prompts):
    tp2 = LLM(str(tiny_dir), tensor_parallel_size=2, engine_worker_queue_port=0, enable_lora=True,
              max_loras=2, max_lora_rank=8, max_model_len=512)
    try:
        loras = [lr(adapters, "full"), lr(adapters, "rs4"), None]
        for a, b in zip(gen(tp2, prompts, loras), gen(llm, prompts, loras)):
            assert_same(a, b)
    finally:
        tp2.shutdown()


def test_async_engine_loads_adapter_on_first_use(tiny_dir, adapters, llm, prompts):
    from radixserve.engine import AsyncLLMEngine
    eng = AsyncLLMEngine.from_kwargs(str(tiny_dir), enable_lora=True, max_lora_rank=8, max_model_len=512)

    async def go():
        outs = [o async for o in eng.generate(None, GREEDY, prompt_token_ids=prompts[0],
                                              lora_request=lr(adapters, "qv"))]
        names = [i.name for i in await eng.list_loras()]
        await eng.unload_lora("qv")
        with pytest.raises(ValueError, match="not loaded"):
            [o async for o in eng.generate(None, GREEDY, prompt_token_ids=prompts[0],
                                           lora_request=LoRARequest("qv"))]
        with pytest.raises(ValueError, match="adapter_config.json: missing"):
            await eng.load_lora(LoRARequest("bad", str(adapters["qv"].parent)))
        return outs[-1], names
    try:
        out, names = asyncio.run(go())
    finally:
        eng.shutdown()
    assert names == ["qv"]
    assert_same(out, gen(llm, [prompts[0]], lr(adapters, "qv"))[0])


# ----------------------------------------------------------------------------- errors

def _bad_dirs(root: Path, good: Path, arch) -> dict[str, tuple[Path, str]]:
    def copy(name):
        return shutil.copytree(good, root / name)

    def edit_cfg(d, **kv):
        cfg = json.loads((d / "adapter_config.json").read_text())
        cfg.update(kv)
        (d / "adapter_config.json").write_text(json.dumps(cfg))
        return d

    def edit_tensors(d, fn):
        t = load_file(d / "adapter_model.safetensors")
        fn(t)
        save_file(t, str(d / "adapter_model.safetensors"))
        return d

    q_a = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    cases = {}
    cases["no_dir"] = (root / "does-not-exist", "directory does not exist")
    d = copy("no_config")
    (d / "adapter_config.json").unlink()
    cases["no_config"] = (d, r"adapter_config\.json: missing")
    d = copy("no_weights")
    (d / "adapter_model.safetensors").unlink()
    cases["no_weights"] = (d, r"adapter_model\.safetensors: missing")
    cases["rank"] = (write_adapter(root / "rank", arch, seed=4, r=16, alpha=16),
                     "r = 16 exceeds max_lora_rank = 8")
    cases["target_cfg"] = (edit_cfg(copy("target_cfg"), target_modules=["q_proj", "lm_head"]),
                           "unsupported target module 'lm_head'")
    cases["target_tensor"] = (edit_tensors(copy("target_tensor"), lambda t: t.update({
        "base_model.model.lm_head.lora_A.weight": torch.zeros(8, 64),
        "base_model.model.lm_head.lora_B.weight": torch.zeros(2048, 8)})), "module 'lm_head'")
    cases["shape"] = (edit_tensors(copy("shape"), lambda t: t.update({q_a: t[q_a][:, :-1].contiguous()})),
                      rf"tensor '{q_a}' has shape \[8, 63\], expected \[8, 64\]")
    cases["half_pair"] = (edit_tensors(copy("half_pair"), lambda t: t.pop(q_a)), "lora_A.weight is missing")
    cases["dora"] = (edit_cfg(copy("dora"), use_dora=True), "DoRA")
    cases["modules_to_save"] = (edit_cfg(copy("mts"), modules_to_save=["lm_head"]), "modules_to_save")
    d = copy("bad_json")
    (d / "adapter_config.json").write_text("{not json")
    cases["bad_json"] = (d, "invalid JSON")
    cases["nan"] = (edit_tensors(copy("nan"), lambda t: t[q_a].__setitem__((0, 0), float("nan"))), "NaN")
    return cases


def test_bad_adapter_dirs_are_clear_errors_and_serving_continues(tmp_path, llm, adapters, arch, prompts):
    engine = llm.engine
    loaded = {i.name for i in llm.list_loras()}
    for case, (path, msg) in _bad_dirs(tmp_path, adapters["full"], arch).items():
        with pytest.raises(ValueError, match=msg):
            llm.load_lora(LoRARequest(case, str(path)))
        with pytest.raises(ValueError, match=msg):  # validated before anything is queued
            gen(llm, prompts, [None, LoRARequest(case, str(path)), None])
        assert not engine.scheduler.requests and not engine.scheduler.waiting, case
    assert {i.name for i in llm.list_loras()} == loaded
    outs = gen(llm, prompts[:2], [None, LoRARequest("full")])
    assert all(o.outputs[0].finish_reason == "length" for o in outs)


def test_request_errors(tiny_dir, llm, adapters):
    with pytest.raises(ValueError, match="'nope' is not loaded"):
        gen(llm, [[5, 6, 7]], LoRARequest("nope"))
    with pytest.raises(ValueError, match="is loaded from"):
        gen(llm, [[5, 6, 7]], LoRARequest("full", str(adapters["qv"])))
    with pytest.raises(ValueError, match="2 lora requests for 1 prompts"):
        gen(llm, [[5, 6, 7]], [None, None])
    plain = LLM(str(tiny_dir), max_model_len=256)
    with pytest.raises(ValueError, match="LoRA is not enabled"):
        gen(plain, [[5, 6, 7]], lr(adapters, "full"))
    assert plain.engine.model_dir and plain.engine.executor.worker.runner.lora is None
    with pytest.raises(ValueError, match="enable_lora"):
        LLM(str(tiny_dir), lora_modules=[f"a={adapters['full']}"])


def test_worker_load_failure_fails_only_that_adapter(tiny_dir, adapters, prompts):
    """Weights that no longer hash to what the engine validated: the worker refuses
    them, that adapter's requests fail with the reason, the rest of the batch runs."""
    llm = LLM(str(tiny_dir), enable_lora=True, max_loras=2, max_lora_rank=8, max_model_len=512)
    mgr = llm.engine.lora
    req = LoRARequest("tampered", str(adapters["qv"]))
    parsed = mgr.read(req)
    mgr.register(req, dataclasses.replace(parsed, content_hash="0" * 64))
    outs = gen(llm, prompts, [None, LoRARequest("tampered"), lr(adapters, "full")])
    assert outs[1].outputs[0].finish_reason == "error" and "changed since it was loaded" in outs[1].error
    ref = LLM(str(tiny_dir), enable_lora=True, max_lora_rank=8, max_model_len=512)
    for i in (0, 2):
        assert_same(outs[i], gen(ref, [prompts[i]], [None, lr(adapters, "full")][i // 2])[0])
    assert "tampered" not in [i.name for i in llm.list_loras()]
    assert gen(llm, prompts[:1], lr(adapters, "qv"))[0].outputs[0].finish_reason == "length"


# ----------------------------------------------------------------------------- pieces

def test_lora_fields_cross_the_wire():
    so = SchedulerOutput(step_id=3, seqs=[ScheduledSeq(1, [5, 6], 0, [0], lora_slot=1)],
                         lora_loads=[LoRALoad(1, "a", "/x/a", "ab" * 32)])
    assert wire.decode(wire.encode("step", so), ENGINE_TO_WORKER)[1] == so
    reply = StepReply(0, StepResult(3, lora_errors=[LoRALoadError(1, "a", "boom")]), 0.1)
    assert wire.decode(wire.encode("step", reply), WORKER_TO_ENGINE)[1] == reply


def test_lora_modules_flag_parsing(adapters):
    from radixserve.engine.entrypoints.llm import engine_config, parse_lora_modules
    assert parse_lora_modules(["a=/p/a", "b=/p/b"]) == (("a", "/p/a"), ("b", "/p/b"))
    assert parse_lora_modules({"a": "/p"}) == parse_lora_modules([LoRARequest("a", "/p")]) == (("a", "/p"),)
    with pytest.raises(ValueError, match="name=path"):
        parse_lora_modules(["just-a-path"])
    cfg = engine_config(enable_lora=True, max_loras=3, lora_modules=[f"x={adapters['qv']}"])
    assert cfg.lora.max_loras == 3 and cfg.lora.lora_modules == (("x", str(adapters["qv"])),)
    from radixserve.engine.config import EngineConfig  # the config crosses to TP workers as JSON
    assert wire.from_plain(EngineConfig, json.loads(json.dumps(wire.to_plain(cfg)))) == cfg
    with pytest.raises(ValueError, match="duplicate adapter names"):
        engine_config(enable_lora=True, lora_modules=["x=/a", "x=/b"])
    from radixserve.cli import build_parser, engine_kwargs
    args = build_parser().parse_args(["generate", "hi", "--enable-lora", "true", "--lora-modules", "a=/p/a", "b=/p"])
    assert engine_kwargs(args)["lora_modules"] == ["a=/p/a", "b=/p"]
