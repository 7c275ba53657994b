"""Reading request bodies (bounded, parsed into the schemas) and framing server-sent events."""

import asyncio
import json
from typing import Any, AsyncIterator, Callable, Type, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.types import Receive, Scope, Send

from llama.server.errors import APIError, invalid

Body = TypeVar("Body", bound=BaseModel)
DONE = "data: [DONE]\n\n"
PARSE_IN_THREAD_BYTES = 64 * 1024  # larger bodies are parsed off the event loop


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed `limit` bytes: from
    Content-Length before reading anything, else while it streams in.

    Raises:
        APIError: 413 for a body over the limit, 400 for a malformed Content-Length.
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise invalid(f"malformed Content-Length header {declared!r}")
        if int(declared) > limit:
            raise _too_large(int(declared), limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(size, limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(size: int, limit: int) -> APIError:
    return APIError(
        413,
        f"the request body has {size} bytes or more, over the limit of {limit} bytes "
        "(the server's --max_body_bytes)",
        code="request_too_large",
    )


def parse_body(raw: bytes, schema: Type[Body]) -> Body:
    """`raw` JSON validated as `schema`.

    Raises:
        APIError: 400 naming the first invalid field (param) and why, or the JSON syntax error.
    """
    if not raw.strip():
        raise invalid("the request body is empty: send a JSON object")
    try:
        return schema.model_validate_json(raw)
    except ValidationError as error:
        first = error.errors()[0]
        if first["type"] == "json_invalid":
            raise invalid(
                f"the request body is not valid JSON: {first['msg']}", code="invalid_json"
            ) from None
        param = ".".join(str(part) for part in first["loc"]) or None
        message = first["msg"].removeprefix("Value error, ")
        if param is not None:
            message = f"{param}: {message} (got {json.dumps(first.get('input'), default=str)[:100]})"
        raise invalid(message, param, first["type"]) from None


async def read_json(request: Request, schema: Type[Body], limit: int) -> Body:
    """Read and validate a JSON body (see `read_body` and `parse_body`); a large one in a worker
    thread, so the event loop goes on serving the streams in flight."""
    raw = await read_body(request, limit)
    if len(raw) > PARSE_IN_THREAD_BYTES:
        return await asyncio.to_thread(parse_body, raw, schema)
    return parse_body(raw, schema)


def sse(data: Any) -> str:
    """One server-sent event carrying `data` as JSON."""
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class EventStream(StreamingResponse):
    """A streaming response of server-sent events that calls `on_close` when it ends in any way
    (finished, client gone, server stopping), even if the stream never started."""

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(
            events,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()
