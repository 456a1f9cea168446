"""OpenAI-compatible request and response models, and request -> SamplingParams.

Requests accept what clients of vLLM's OpenAI server send: OpenAI's fields,
vLLM's extensions (top_k, min_p, repetition_penalty, ignore_eos, min_tokens,
stop_token_ids, skip_special_tokens, include_stop_str_in_output, cache_salt,
...), and any unknown field (ignored, since SDKs send things like
``logit_bias: null``). Fields we know but cannot honour are rejected with a
400 only when set to something other than their no-op value (``_UNSUPPORTED``).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, model_serializer

from radixserve.engine.sampling_params import MAX_LOGPROBS, SamplingParams


class RequestError(ValueError):
    """A request we refuse (400); ``param`` names the offending field."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


class _Model(BaseModel):
    # "model" is a real field name here; unknown fields are ignored, not errors.
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


# -- requests -----------------------------------------------------------------------

class StreamOptions(_Model):
    include_usage: bool | None = True
    continuous_usage_stats: bool | None = False  # accepted, ignored


class TextPart(_Model):
    type: str
    text: str | None = None


class ChatMessage(_Model):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant turn's calls (tools.py renders them)
    tool_call_id: str | None = None  # a role "tool" turn: the call it answers


class _GenerationRequest(_Model):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = 1
    best_of: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = False
    min_tokens: int | None = 0
    skip_special_tokens: bool | None = True
    include_stop_str_in_output: bool | None = False
    user: str | None = None
    cache_salt: str | None = None
    return_token_ids: bool | None = False  # vLLM: prompt and output token ids in the response
    # Output constraints (structured.py turns them into StructuredOutputsParams).
    response_format: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    structured_outputs: Any = None
    # Known but not honoured: accepted only at their no-op value (see _UNSUPPORTED).
    logit_bias: Any = None
    prompt_logprobs: Any = None
    use_beam_search: Any = None
    return_tokens_as_token_ids: Any = None
    priority: Any = None

    @property
    def wants_stream(self) -> bool:
        return bool(self.stream)

    @property
    def include_usage_in_stream(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    @property
    def requested_max_tokens(self) -> int | None:
        # OpenAI renamed max_tokens; the new name wins when both are sent (as in vLLM).
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# A prompt: text, a batch of texts, token ids, or a batch of token-id lists.
PromptInput = Union[StrictStr, list[StrictStr], list[StrictInt], list[list[StrictInt]]]


class CompletionRequest(_GenerationRequest):
    prompt: PromptInput
    logprobs: int | None = None
    echo: bool | None = False
    suffix: Any = None


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage]
    logprobs: bool | None = False
    top_logprobs: int | None = None
    add_generation_prompt: bool | None = True
    chat_template_kwargs: dict[str, Any] | None = None  # reach the chat template (enable_thinking, ...)
    tools: Any = None  # validated by tools.py
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    functions: Any = None
    function_call: Any = None
    continue_final_message: Any = None
    echo: Any = None
    modalities: Any = None
    audio: Any = None
    prediction: Any = None


class TokenizeRequest(_Model):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(_Model):
    model: str | None = None
    tokens: list[StrictInt]


# -- what we cannot honour ------------------------------------------------------------

def _is_none(v: Any) -> bool:
    return v is None


def _is_falsy(v: Any) -> bool:
    return not v


def _is_no_tool_choice(v: Any) -> bool:
    return v is None or v in ("none", "auto")


def _is_text_modality(v: Any) -> bool:
    return v is None or v == ["text"]


# field -> (is this value a no-op?, why we refuse it otherwise)
_Rule = tuple[Callable[[Any], bool], str]
_UNSUPPORTED: dict[str, _Rule] = {
    "logit_bias": (_is_falsy, "logit_bias is not supported"),
    "prompt_logprobs": (_is_none, "prompt_logprobs is not supported; use echo with logprobs"),
    "use_beam_search": (_is_falsy, "beam search is not supported"),
    "return_tokens_as_token_ids": (_is_falsy, "return_tokens_as_token_ids is not supported"),
    "priority": (_is_falsy, "priority is not supported: requests are scheduled first come, first served "
                            "(send 0 or leave it out)"),
}
_UNSUPPORTED_COMPLETION: dict[str, _Rule] = {
    "suffix": (_is_falsy, "suffix is not supported"),
}
_UNSUPPORTED_CHAT: dict[str, _Rule] = {
    "functions": (_is_falsy, "functions (function calling) are not supported"),
    "function_call": (_is_no_tool_choice, "function_call is not supported"),
    "continue_final_message": (_is_falsy, "continue_final_message is not supported"),
    "echo": (_is_falsy, "echo is not supported for chat completions"),
    "modalities": (_is_text_modality, "only the text modality is supported"),
    "audio": (_is_none, "audio output is not supported"),
    "prediction": (_is_none, "predicted outputs are not supported"),
}


def check_supported(req: _GenerationRequest) -> None:
    """Raise RequestError for a field set to something we cannot honour."""
    own = _UNSUPPORTED_CHAT if isinstance(req, ChatCompletionRequest) else _UNSUPPORTED_COMPLETION
    for name, (is_noop, why) in (_UNSUPPORTED | own).items():
        if not is_noop(getattr(req, name)):
            raise RequestError(why, param=name)
    if req.stream_options is not None and not req.stream:
        raise RequestError("stream_options can only be set when stream is true", param="stream_options")
    if req.cache_salt is not None and not req.cache_salt:
        raise RequestError("cache_salt must be a non-empty string", param="cache_salt")
    n, best_of = req.n or 1, req.best_of
    if req.stream and best_of is not None and best_of != n:
        raise RequestError("best_of must equal n when streaming", param="best_of")


# -- prompts ------------------------------------------------------------------------------

def valid_text(text: str, param: str) -> str:
    """``text`` if it is encodable Unicode: JSON may carry lone surrogates ("\\ud800"),
    which no tokenizer takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RequestError(f"{param} is not valid Unicode text (a lone surrogate at character {exc.start})",
                           param=param) from None
    return text


def completion_prompts(req: CompletionRequest) -> list[str | list[int]]:
    """The request's prompts, each text or token ids."""
    p = req.prompt
    if isinstance(p, str):
        return [valid_text(p, "prompt")]
    if not p:
        raise RequestError("the prompt is empty", param="prompt")
    if isinstance(p[0], int):
        return [list(p)]
    return [valid_text(t, "prompt") if isinstance(t, str) else t for t in p]


# OpenAI's message roles; anything else would reach the chat template unchecked.
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "function")


def chat_messages(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """Messages as the chat template wants them: role and plain-text content.

    Text parts are joined with newlines, as vLLM does for string-content templates.
    """
    if not messages:
        raise RequestError("messages must not be empty", param="messages")
    out = []
    for m in messages:
        if m.role not in CHAT_ROLES:
            raise RequestError(f"unknown message role {m.role[:32]!r}; expected one of {', '.join(CHAT_ROLES)}",
                               param="messages")
        if m.content is None or isinstance(m.content, str):
            text = m.content or ""
        else:
            bad = next((part.type for part in m.content if part.type != "text" or part.text is None), None)
            if bad is not None:
                raise RequestError(f"only text content parts are supported, got type {bad!r}",
                                   param="messages")
            text = "\n".join(part.text for part in m.content)
        out.append({"role": valid_text(m.role, "messages"), "content": valid_text(text, "messages")})
    return out


# -- sampling params ----------------------------------------------------------------------

def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def _sampling_params(req: _GenerationRequest, max_tokens: int, logprobs: int | None,
                     prompt_logprobs: int | None, defaults: Mapping[str, Any]) -> SamplingParams:
    """``defaults``: the model's generation_config values, for the fields the request left unset."""
    d = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0, **defaults}
    try:
        return SamplingParams(
            n=_or(req.n, 1), best_of=req.best_of, temperature=_or(req.temperature, d["temperature"]),
            top_p=_or(req.top_p, d["top_p"]), top_k=_or(req.top_k, d["top_k"]), min_p=_or(req.min_p, d["min_p"]),
            seed=req.seed, repetition_penalty=_or(req.repetition_penalty, d["repetition_penalty"]),
            presence_penalty=_or(req.presence_penalty, 0.0),
            frequency_penalty=_or(req.frequency_penalty, 0.0), stop=req.stop,
            stop_token_ids=req.stop_token_ids, ignore_eos=_or(req.ignore_eos, False),
            max_tokens=max_tokens, min_tokens=_or(req.min_tokens, 0), logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            include_stop_str_in_output=_or(req.include_stop_str_in_output, False),
            skip_special_tokens=_or(req.skip_special_tokens, True))
    except ValueError as exc:
        raise RequestError(str(exc)) from exc


def completion_sampling_params(req: CompletionRequest, max_tokens: int,
                               defaults: Mapping[str, Any] | None = None) -> SamplingParams:
    # echo + logprobs scores the prompt too (legacy OpenAI), so ask for prompt logprobs.
    prompt_lp = req.logprobs if (req.echo and req.logprobs is not None) else None
    return _sampling_params(req, max_tokens, req.logprobs, prompt_lp, defaults or {})


def chat_sampling_params(req: ChatCompletionRequest, max_tokens: int,
                         defaults: Mapping[str, Any] | None = None) -> SamplingParams:
    if req.top_logprobs is not None and not req.logprobs:
        raise RequestError("top_logprobs requires logprobs to be true", param="top_logprobs")
    if req.top_logprobs is not None and not 0 <= req.top_logprobs <= MAX_LOGPROBS:
        raise RequestError(f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {req.top_logprobs}",
                           param="top_logprobs")
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    return _sampling_params(req, max_tokens, logprobs, None, defaults or {})


def resolve_max_tokens(requested: int | None, prompt_len: int, max_model_len: int,
                       what: str = "prompt") -> int:
    """max_tokens to run with; too long a request is a 400 naming both numbers (vLLM's wording)."""
    if requested is None:
        if prompt_len >= max_model_len:
            raise RequestError(
                f"This model's maximum context length is {max_model_len} tokens. However, you "
                f"requested {prompt_len} tokens in the {what}. Please reduce the length of the {what}.",
                param=what, code="context_length_exceeded")
        return max_model_len - prompt_len
    if prompt_len + requested > max_model_len:
        raise RequestError(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {prompt_len + requested} tokens ({prompt_len} in the {what}, {requested} "
            f"in the completion). Please reduce the length of the {what} or completion.",
            param="max_tokens", code="context_length_exceeded")
    return requested


# -- responses ------------------------------------------------------------------------------

class _DropNone(BaseModel):
    """Leaves out the fields named in drop_if_none when they are None (OpenAI
    omits an unset delta.role or a chunk's usage rather than sending null)."""

    drop_if_none: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _drop(self, handler):
        data = handler(self)
        for name in self.drop_if_none:
            if data.get(name) is None:
                data.pop(name, None)
        return data


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(_DropNone):
    drop_if_none = ("prompt_token_ids", "token_ids")
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_token_ids: list[int] | None = None  # return_token_ids: on a choice's first chunk
    token_ids: list[int] | None = None  # return_token_ids: this choice's (new) output tokens


class CompletionResponse(_DropNone):
    drop_if_none = ("usage",)
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None


class FunctionCall(_DropNone):
    drop_if_none = ("name", "arguments")
    name: str | None = None
    arguments: str | None = None


class ToolCall(_DropNone):
    """A tool call; in a stream delta only ``index`` is always there (id, type, name: first delta)."""

    drop_if_none = ("id", "type", "index")
    index: int | None = None  # stream deltas only
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCall


class ChatMessageOut(_DropNone):
    drop_if_none = ("tool_calls",)
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(_DropNone):
    drop_if_none = ("token_ids",)
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None  # return_token_ids


class ChatCompletionResponse(_DropNone):
    drop_if_none = ("prompt_token_ids",)
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_token_ids: list[int] | None = None  # return_token_ids


class DeltaMessage(_DropNone):
    drop_if_none = ("role", "content", "tool_calls")
    role: str | None = None
    content: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChatStreamChoice(_DropNone):
    drop_if_none = ("token_ids",)
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None  # return_token_ids: this chunk's new output tokens


class ChatCompletionChunk(_DropNone):
    drop_if_none = ("usage", "prompt_token_ids")
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: Usage | None = None
    prompt_token_ids: list[int] | None = None  # return_token_ids: on the first chunk


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "radixserve"
    root: str
    parent: str | None = None
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str | None] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class LoadLoRAAdapterRequest(BaseModel):
    """POST /v1/load_lora_adapter (vLLM's shape)."""

    model_config = ConfigDict(extra="ignore")
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadLoRAAdapterRequest(BaseModel):
    """POST /v1/unload_lora_adapter (vLLM's shape)."""

    model_config = ConfigDict(extra="ignore")
    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None
