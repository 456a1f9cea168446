"""Offline API in the shape users know from vLLM: ``LLM(...).generate(...)``."""
from __future__ import annotations

import itertools
import weakref
from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from radixserve.engine.config import EngineConfig, ModelConfig
from radixserve.engine.config import parse_lora_modules as parse_lora_modules  # re-exported: the flat API's helper
from radixserve.engine.core.llm_engine import LLMEngine
from radixserve.engine.entrypoints.outputs import RequestOutput
from radixserve.engine.lora.request import LoRARequest
from radixserve.engine.sampling_params import SamplingParams

PromptType = str | list[int] | dict[str, Any]


def engine_config(model: str = ModelConfig.model, **kwargs: Any) -> EngineConfig:
    """Flat keyword arguments (the CLI flags and LLM(...) kwargs) -> EngineConfig.

    The keywords are the fields of the dataclasses in ``radixserve.engine.config``
    (``engine_flags()`` lists them with their defaults): ``block_size``,
    ``max_num_batched_tokens``, ``tensor_parallel_size``, ``swap_space``, ...
    ``lora_modules``: adapters to load at startup, as ``["name=path", ...]``,
    ``{name: path}`` or a list of (name, path) pairs / LoRARequests.
    """
    return EngineConfig.from_flat(model=model, **kwargs)


class LLM:
    """Batch generation with continuous batching and the radix prefix cache.

    >>> llm = LLM(model="tiny-llama")
    >>> out = llm.generate(["Hello"], SamplingParams(max_tokens=8))
    >>> out[0].outputs[0].text
    """

    def __init__(self, model: str = ModelConfig.model, **kwargs: Any):
        self.engine = LLMEngine(engine_config(model, **kwargs))
        # An LLM dropped without shutdown() still stops its workers and closes its ports.
        self._finalizer = weakref.finalize(self, self.engine.shutdown)
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """What ``sampling_params=None`` means: the model's generation_config.json defaults (as vLLM)."""
        return SamplingParams(**self.engine.default_sampling)

    def generate(self, prompts: PromptType | Sequence[PromptType] | None = None,
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
                 prompt_token_ids: Sequence[list[int]] | None = None, use_tqdm: bool = False,
                 lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in input order.

        A prompt is text, a list of token ids, or ``{"prompt_token_ids": [...]}``.
        ``lora_request`` is one adapter for every prompt or one per prompt (None =
        base model); an adapter not loaded yet is loaded from its path. All
        prompts and adapters are validated before any is queued, so a bad one
        raises ValueError and leaves the engine as it was.
        """
        items = self._normalise_prompts(prompts, prompt_token_ids)
        params = self._normalise_params(sampling_params, len(items))
        loras = self._normalise_loras(lora_request, len(items))
        ids = [self._tokenize(p) for p in items]
        for token_ids in ids:
            self.engine.validate_prompt(token_ids)
        for sp in params:
            self.engine.validate_params(sp)
        self.engine.check_workers()  # a rank lost since the last call: restart before queueing
        for lr in dict.fromkeys(lr for lr in loras if lr is not None):
            self.engine.resolve_lora(lr)  # loads now: a bad adapter fails before anything is queued
        texts = [p if isinstance(p, str) else p.get("prompt") if isinstance(p, dict) else None
                 for p in items]
        order = []
        for text, token_ids, sp, lr in zip(texts, ids, params, loras):
            rid = str(next(self._ids))
            self.engine.add_request(rid, text, sp, prompt_token_ids=token_ids, lora_request=lr)
            order.append(rid)
        return self._run(order, use_tqdm)

    def load_lora(self, lora_request: LoRARequest):
        """Load (or reload with new weights) an adapter; returns its LoRAInfo."""
        return self.engine.load_lora(lora_request)

    def unload_lora(self, name: str) -> None:
        self.engine.unload_lora(name)

    def list_loras(self) -> list:
        return self.engine.list_loras()

    def chat(self, messages: list[dict[str, str]] | list[list[dict[str, str]]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
             add_generation_prompt: bool = True, use_tqdm: bool = False,
             lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
             chat_template_kwargs: dict[str, Any] | None = None) -> list[RequestOutput]:
        """One conversation (a list of {"role", "content"}) or a batch of them.

        ``chat_template_kwargs`` reach the template (``enable_thinking``, ``tools``, ...)."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tok, kw = self.engine.tokenizer, chat_template_kwargs or {}
        prompts = []
        for c in conversations:
            text = tok.apply_chat_template(c, add_generation_prompt, **kw)
            # The template wrote BOS itself, so the tokenizer must not add another.
            prompts.append({"prompt_token_ids": tok.encode(text, add_special_tokens=False), "prompt": text})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm, lora_request=lora_request)

    def _normalise_prompts(self, prompts, prompt_token_ids) -> list[PromptType]:
        if prompt_token_ids is not None:
            return [{"prompt_token_ids": list(t)} for t in prompt_token_ids]
        if prompts is None:
            raise ValueError("generate() needs prompts or prompt_token_ids")
        if isinstance(prompts, (str, dict)):
            return [prompts]
        if prompts and all(isinstance(t, int) for t in prompts):
            return [list(prompts)]  # a single prompt given as token ids
        return list(prompts)

    @staticmethod
    def _normalise_loras(lora, n: int) -> list[LoRARequest | None]:
        if lora is None or isinstance(lora, (LoRARequest, str)):
            return [LoRARequest(lora) if isinstance(lora, str) else lora] * n
        if len(lora) != n:
            raise ValueError(f"got {len(lora)} lora requests for {n} prompts")
        return [LoRARequest(r) if isinstance(r, str) else r for r in lora]

    def _normalise_params(self, params, n: int) -> list[SamplingParams]:
        if params is None:
            return [self.get_default_sampling_params()] * n
        if isinstance(params, SamplingParams):
            return [params] * n
        if len(params) != n:
            raise ValueError(f"got {len(params)} sampling params for {n} prompts")
        return list(params)

    def _tokenize(self, prompt: PromptType) -> list[int]:
        if isinstance(prompt, str):
            return self.engine.tokenizer.encode(prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return list(prompt["prompt_token_ids"])
            return self.engine.tokenizer.encode(prompt["prompt"])
        if isinstance(prompt, list):
            return list(prompt)
        raise ValueError(f"unsupported prompt type {type(prompt).__name__}")

    def _run(self, order: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(order), desc="generate", disable=not use_tqdm)
        try:
            while len(done) < len(order):
                for out in self.engine.step():
                    if out.finished and out.request_id not in done:
                        done[out.request_id] = out
                        bar.update(1)
        except BaseException:
            for rid in order:  # leave no half-run request behind (e.g. on Ctrl-C)
                if rid not in done:
                    self.engine.abort_request(rid)
            raise
        finally:
            bar.close()
        return [done[rid] for rid in order]

    def shutdown(self) -> None:
        self._finalizer()  # runs engine.shutdown once, here or when this LLM is collected

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
