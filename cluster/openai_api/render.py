"""Engine outputs -> OpenAI response objects (JSON bodies and stream chunks).

Pure functions and small cursors, no I/O: the app feeds them cumulative
``RequestOutput``s and sends what they return. Streaming deltas are the
difference between consecutive cumulative outputs of one choice; the engine
already holds back text that could still turn into a stop string.
"""
from __future__ import annotations

from dataclasses import dataclass

from radixserve.cluster.openai_api.protocol import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessageOut,
    ChatStreamChoice,
    ChatTokenLogprob,
    ChatTopLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    DeltaMessage,
    PromptTokensDetails,
    Usage,
)
from radixserve.engine.entrypoints.outputs import CompletionOutput, PositionLogprobs, RequestOutput
from radixserve.engine.tokenizer import Tokenizer

# JSON has no -inf; OpenAI-compatible servers report this floor instead (as vLLM does).
_MIN_LOGPROB = -9999.0


@dataclass(frozen=True)
class TokenText:
    """How token ids read as text in echoed prompts and logprobs.

    Echoed prompts leave special tokens out (a text prompt's BOS was never in
    its text), as does the completion text when skip_special_tokens is on, so
    such tokens take no room in the legacy ``text_offset``s.
    """

    tokenizer: Tokenizer
    skip_special_tokens: bool = True

    def token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def prompt(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def width(self, token_id: int, token: str, in_prompt: bool) -> int:
        hidden = token_id in self.tokenizer.special_token_ids and (in_prompt or self.skip_special_tokens)
        return 0 if hidden else len(token)


def _clamp(logprob: float) -> float:
    return max(logprob, _MIN_LOGPROB)


def _token_str(token_id: int, pos: PositionLogprobs | None, text: TokenText) -> str:
    lp = pos.get(token_id) if pos else None
    if lp is not None and lp.decoded_token is not None:
        return lp.decoded_token
    return text.token(token_id)


def usage_of(outs: list[RequestOutput]) -> Usage:
    prompt = sum(len(o.prompt_token_ids) for o in outs)
    completion = sum(len(c.token_ids) for o in outs for c in o.outputs)
    cached = sum(o.num_cached_tokens for o in outs)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))


# -- logprobs ----------------------------------------------------------------------------

def legacy_logprobs(token_ids: list[int], positions: list[PositionLogprobs | None], text: TokenText,
                    start_offset: int = 0, in_prompt: bool = False) -> CompletionLogprobs:
    """The /v1/completions shape; a None position (the first prompt token) has no logprob."""
    out = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    offset = start_offset
    for tid, pos in zip(token_ids, positions):
        token = _token_str(tid, pos, text)
        out.tokens.append(token)
        out.text_offset.append(offset)
        offset += text.width(tid, token, in_prompt)
        if pos is None or tid not in pos:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        out.token_logprobs.append(_clamp(pos[tid].logprob))
        out.top_logprobs.append({_token_str(t, pos, text): _clamp(lp.logprob) for t, lp in pos.items()})
    return out


def _chat_top(token: str, logprob: float) -> ChatTopLogprob:
    return ChatTopLogprob(token=token, logprob=_clamp(logprob), bytes=list(token.encode("utf-8")))


def chat_logprobs(token_ids: list[int], positions: list[PositionLogprobs], top_k: int,
                  text: TokenText) -> ChatLogprobs:
    content = []
    for tid, pos in zip(token_ids, positions):
        token = _token_str(tid, pos, text)
        ranked = sorted((lp.rank, t, lp) for t, lp in pos.items() if lp.rank is not None and lp.rank <= top_k)
        top = [_chat_top(_token_str(t, pos, text), lp.logprob) for _, t, lp in ranked]
        base = _chat_top(token, pos[tid].logprob)
        content.append(ChatTokenLogprob(**base.model_dump(), top_logprobs=top))
    return ChatLogprobs(content=content)


# -- streaming cursors -----------------------------------------------------------------------

@dataclass
class Delta:
    text: str
    token_ids: list[int]
    logprobs: list[PositionLogprobs] | None
    finish_reason: str | None  # set once, on the delta where the choice finishes
    stop_reason: int | str | None


@dataclass
class ChoiceCursor:
    """How much of one choice has been sent."""

    text_len: int = 0
    num_tokens: int = 0
    text_offset: int = 0  # legacy logprobs: where the next token's text starts
    done: bool = False

    def advance(self, c: CompletionOutput) -> Delta | None:
        if self.done:
            return None
        text = c.text[self.text_len:]
        ids = c.token_ids[self.num_tokens:]
        lps = c.logprobs[self.num_tokens:] if c.logprobs is not None else None
        self.text_len, self.num_tokens = len(c.text), len(c.token_ids)
        self.done = c.finished
        return Delta(text, ids, lps, c.finish_reason, c.stop_reason)


class CompletionStreamer:
    """Chunks of one /v1/completions stream; choice index = prompt index * n + output index."""

    def __init__(self, rid: str, created: int, model: str, n: int, logprobs: bool, echo: bool,
                 text: TokenText, token_ids: bool = False):
        self.rid, self.created, self.model, self.n = rid, created, model, n
        self.logprobs, self.echo, self.text, self.token_ids = logprobs, echo, text, token_ids
        self.cursors: dict[int, ChoiceCursor] = {}

    def chunks(self, prompt_index: int, out: RequestOutput) -> list[CompletionResponse]:
        chunks = []
        for c in out.outputs:
            index = prompt_index * self.n + c.index
            cursor = self.cursors.get(index)
            prefix: CompletionChoice | None = None
            first = cursor is None
            if first:
                cursor = self.cursors[index] = ChoiceCursor()
                prefix = self._echo_prefix(index, out, cursor) if self.echo else None
            delta = cursor.advance(c)
            if delta is None:
                continue
            choice = self._content_choice(index, delta, cursor)
            if prefix is not None:
                choice = prefix if choice is None else CompletionChoice(
                    index=index, text=prefix.text + choice.text, finish_reason=None, stop_reason=None,
                    logprobs=_concat(prefix.logprobs, choice.logprobs), token_ids=choice.token_ids)
            if first and self.token_ids:  # a choice's first chunk carries the prompt
                choice = choice or CompletionChoice(index=index, text="", token_ids=[])
                choice.prompt_token_ids = list(out.prompt_token_ids)
            if choice is not None:
                chunks.append(self._chunk(choice))
            if delta.finish_reason is not None:
                chunks.append(self._chunk(CompletionChoice(index=index, text="", logprobs=None,
                                                           finish_reason=delta.finish_reason,
                                                           stop_reason=delta.stop_reason)))
        return chunks

    def usage_chunk(self, outs: list[RequestOutput]) -> CompletionResponse:
        return CompletionResponse(id=self.rid, created=self.created, model=self.model, choices=[],
                                  usage=usage_of(outs))

    def _echo_prefix(self, index: int, out: RequestOutput, cursor: ChoiceCursor) -> CompletionChoice:
        text = prompt_text(out, self.text)
        lp = None
        if self.logprobs:
            lp = legacy_logprobs(out.prompt_token_ids, _prompt_positions(out), self.text, in_prompt=True)
            cursor.text_offset = len(text)
        return CompletionChoice(index=index, text=text, logprobs=lp, finish_reason=None, stop_reason=None)

    def _content_choice(self, index: int, delta: Delta, cursor: ChoiceCursor) -> CompletionChoice | None:
        lp = None
        if self.logprobs and delta.logprobs is not None:
            lp = legacy_logprobs(delta.token_ids, list(delta.logprobs), self.text, cursor.text_offset)
            if lp.tokens:
                cursor.text_offset = lp.text_offset[-1] + self.text.width(delta.token_ids[-1], lp.tokens[-1],
                                                                          in_prompt=False)
        ids = delta.token_ids if self.token_ids else None
        if not delta.text and not (lp and lp.tokens) and not ids:
            return None
        return CompletionChoice(index=index, text=delta.text, logprobs=lp, finish_reason=None,
                                stop_reason=None, token_ids=ids)

    def _chunk(self, choice: CompletionChoice) -> CompletionResponse:
        return CompletionResponse(id=self.rid, created=self.created, model=self.model, choices=[choice])


def _concat(a: CompletionLogprobs | None, b: CompletionLogprobs | None) -> CompletionLogprobs | None:
    if a is None or b is None:
        return a or b
    return CompletionLogprobs(tokens=a.tokens + b.tokens, token_logprobs=a.token_logprobs + b.token_logprobs,
                              top_logprobs=a.top_logprobs + b.top_logprobs,
                              text_offset=a.text_offset + b.text_offset)


class ChatStreamer:
    """Chunks of one /v1/chat/completions stream: a role chunk per choice, content
    deltas, then a chunk with finish_reason per choice."""

    def __init__(self, rid: str, created: int, model: str, n: int, top_logprobs: int | None,
                 text: TokenText, token_ids: bool = False):
        self.rid, self.created, self.model, self.n = rid, created, model, n
        self.top_logprobs, self.text, self.token_ids = top_logprobs, text, token_ids
        self.cursors = [ChoiceCursor() for _ in range(n)]
        self.role_sent = False

    def role_chunks(self) -> list[ChatCompletionChunk]:
        return [self._chunk(ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""),
                                             logprobs=None, finish_reason=None)) for i in range(self.n)]

    def chunks(self, out: RequestOutput) -> list[ChatCompletionChunk]:
        chunks = []
        if not self.role_sent:  # the role chunks lead the stream
            chunks, self.role_sent = self.role_chunks(), True
            if self.token_ids:
                chunks[0].prompt_token_ids = list(out.prompt_token_ids)
        for c in out.outputs:
            delta = self.cursors[c.index].advance(c)
            if delta is None:
                continue
            lp = None
            if self.top_logprobs is not None and delta.logprobs:
                lp = chat_logprobs(delta.token_ids, list(delta.logprobs), self.top_logprobs, self.text)
            ids = delta.token_ids if self.token_ids else None
            if delta.text or lp is not None or ids:
                chunks.append(self._chunk(ChatStreamChoice(index=c.index, delta=DeltaMessage(content=delta.text),
                                                           logprobs=lp, finish_reason=None, token_ids=ids)))
            if delta.finish_reason is not None:
                chunks.append(self._chunk(ChatStreamChoice(index=c.index, delta=DeltaMessage(),
                                                           logprobs=None, finish_reason=delta.finish_reason,
                                                           stop_reason=delta.stop_reason)))
        return chunks

    def usage_chunk(self, outs: list[RequestOutput]) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.rid, created=self.created, model=self.model, choices=[],
                                   usage=usage_of(outs))

    def _chunk(self, choice: ChatStreamChoice) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.rid, created=self.created, model=self.model, choices=[choice])


# -- whole responses ---------------------------------------------------------------------------

def prompt_text(out: RequestOutput, text: TokenText) -> str:
    """The prompt as text: as sent, or decoded when it came as token ids."""
    return out.prompt if out.prompt is not None else text.prompt(out.prompt_token_ids)


def _prompt_positions(out: RequestOutput) -> list[PositionLogprobs | None]:
    if out.prompt_logprobs is not None:
        return list(out.prompt_logprobs)
    return [None] * len(out.prompt_token_ids)


def completion_response(rid: str, created: int, model: str, outs: list[RequestOutput], n: int,
                        logprobs: bool, echo: bool, text: TokenText, token_ids: bool = False
                        ) -> CompletionResponse:
    choices = []
    for p, out in enumerate(outs):
        prefix = prompt_text(out, text) if echo else ""
        prompt_lp = None
        if echo and logprobs:
            prompt_lp = legacy_logprobs(out.prompt_token_ids, _prompt_positions(out), text, in_prompt=True)
        for c in out.outputs:
            lp = None
            if logprobs:
                lp = _concat(prompt_lp, legacy_logprobs(c.token_ids, list(c.logprobs or []), text,
                                                        len(prefix)))
            choices.append(CompletionChoice(index=p * n + c.index, text=prefix + c.text, logprobs=lp,
                                            finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                                            prompt_token_ids=list(out.prompt_token_ids) if token_ids else None,
                                            token_ids=list(c.token_ids) if token_ids else None))
    return CompletionResponse(id=rid, created=created, model=model, choices=choices, usage=usage_of(outs))


def chat_response(rid: str, created: int, model: str, out: RequestOutput, top_logprobs: int | None,
                  text: TokenText, token_ids: bool = False) -> ChatCompletionResponse:
    choices = []
    for c in out.outputs:
        lp = None
        if top_logprobs is not None:
            lp = chat_logprobs(c.token_ids, list(c.logprobs or []), top_logprobs, text)
        choices.append(ChatChoice(index=c.index, message=ChatMessageOut(content=c.text), logprobs=lp,
                                  finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                                  token_ids=list(c.token_ids) if token_ids else None))
    return ChatCompletionResponse(id=rid, created=created, model=model, choices=choices, usage=usage_of([out]),
                                  prompt_token_ids=list(out.prompt_token_ids) if token_ids else None)
