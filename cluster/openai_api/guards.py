"""Cheap limits checked before any real work: body size, text length, list sizes, API keys.

Each check refuses in the OpenAI error shape before the request costs what it
asks for: a body over ``max_request_body_bytes`` is a 413 before it is read in
full; a text that could never fit in the context is a 400 before it is
tokenized (a token holds at most ``Tokenizer.max_token_chars`` characters, so
more than ``max_model_len`` times that can never fit).
"""
from __future__ import annotations

import hmac
from collections.abc import Mapping

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from radixserve.cluster.openai_api.protocol import RequestError
from radixserve.cluster.openai_api.serving import APIError

_TOO_LARGE = 413


def body_too_large(limit: int) -> str:
    return f"the request body is larger than the server's limit of {limit} bytes"


class BodyLimit:
    """ASGI middleware: refuse a body over ``max_bytes`` with 413, without reading it all.

    A declared Content-Length over the limit is answered at once; a chunked body is
    counted as it arrives, and the read that crosses the limit raises an HTTPException
    (which FastAPI's body parsing passes through to the app's handler: OpenAI shape).
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await _send_413(send, self.max_bytes)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise HTTPException(_TOO_LARGE, body_too_large(self.max_bytes))
            return message
        await self.app(scope, limited, send)


async def _send_413(send: Send, limit: int) -> None:
    body = APIError(_TOO_LARGE, body_too_large(limit)).body().model_dump_json().encode()
    await send({"type": "http.response.start", "status": _TOO_LARGE,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def check_text_length(text: str, max_chars: int, max_model_len: int, param: str) -> None:
    """A text too long to fit in ``max_model_len`` tokens, refused without tokenizing it."""
    if len(text) > max_chars:
        raise RequestError(
            f"This model's maximum context length is {max_model_len} tokens. However, the {param} is "
            f"{len(text)} characters long, more than {max_model_len} tokens can hold. "
            f"Please reduce the length of the {param}.", param=param, code="context_length_exceeded")


def check_count(items: list | None, limit: int, param: str, what: str) -> None:
    if items is not None and len(items) > limit:
        raise RequestError(f"{len(items)} {what} in one request; the server's limit is {limit}", param=param)


def tenant_for_token(keys: Mapping[str, str], authorization: str) -> str:
    """The tenant of ``Authorization: Bearer <key>``; 401 otherwise."""
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise APIError(401, "missing API key: send the header 'Authorization: Bearer <key>'",
                       code="invalid_api_key")
    token = token.strip()
    # compare_digest over every key: the time taken does not depend on which key matched.
    tenant = None
    for key, name in keys.items():
        if hmac.compare_digest(key.encode(), token.encode()):
            tenant = name
    if tenant is None:
        raise APIError(401, "incorrect API key provided", code="invalid_api_key")
    return tenant
