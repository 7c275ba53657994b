"""The OpenAI endpoints: /v1/completions, /v1/chat/completions, /v1/models."""

import time
import uuid
from functools import partial
from typing import AsyncIterator, Dict, List, Optional, Protocol, Tuple, Union

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from llama.engine import Event
from llama.server.errors import APIError, error_event
from llama.server.jobs import Job, chat_job, completion_job
from llama.server.runner import ChoiceResult, Generation, collect_unless_disconnected
from llama.server.schemas import ChatCompletionRequest, CompletionRequest
from llama.server.state import ServerState
from llama.server.transport import DONE, EventStream, read_json, sse
from llama.tokenizer import Tokenizer

CLIENT_CLOSED = 499  # logged status of a request whose client went away


def _byte_piece(piece: str) -> Optional[int]:
    """The byte of a byte-fallback piece `<0xNN>`, else None."""
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        return int(piece[3:5], 16)
    return None


def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    """One token as text: `▁` as a space; a byte piece as its character, or `bytes:\\xNN` when
    the byte is part of a multi-byte character (OpenAI's notation)."""
    piece = tokenizer.token_piece(token_id)
    byte = _byte_piece(piece)
    if byte is not None:
        return chr(byte) if byte < 0x80 else f"bytes:\\x{byte:02x}"
    return piece.replace("▁", " ")


def token_bytes(tokenizer: Tokenizer, token_id: int) -> List[int]:
    """The UTF-8 bytes one token stands for: `[0xNN]` for a byte piece, else its text's bytes."""
    piece = tokenizer.token_piece(token_id)
    byte = _byte_piece(piece)
    if byte is not None:
        return [byte]
    return list(piece.replace("▁", " ").encode("utf-8"))


def check_model(state: ServerState, model: Optional[str]) -> None:
    """Raise a 404 (OpenAI's `model_not_found`) unless `model` is absent or the served model's name."""
    if model is not None and model != state.model_name:
        raise APIError(
            404,
            f"the model {model!r} does not exist: this server serves {state.model_name!r} "
            "(see GET /v1/models)",
            param="model",
            code="model_not_found",
            error_type="invalid_request_error",
        )


def usage_dict(results: List[ChoiceResult], n: int) -> dict:
    """OpenAI usage: prompt tokens counted once per prompt, completion tokens of every choice."""
    firsts = [r.usage for r in results[::n] if r.usage is not None]
    prompt = sum(u.prompt_tokens for u in firsts)
    completion = sum(r.usage.completion_tokens for r in results if r.usage is not None)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": sum(u.cached_tokens for u in firsts)},
    }


def completion_logprobs(
    tokenizer: Tokenizer,
    token_ids: List[int],
    logprobs: List[Optional[float]],
    tops: List[Dict[int, float]],
    offset: int,
) -> dict:
    """The legacy completions `logprobs` object; `offset` is where the first token's text starts."""
    tokens = [token_text(tokenizer, t) for t in token_ids]
    offsets = []
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    top = [{token_text(tokenizer, t): lp for t, lp in alternatives.items()} for alternatives in tops]
    return {
        "tokens": tokens,
        "token_logprobs": logprobs,
        "top_logprobs": top or None,
        "text_offset": offsets,
    }


def chat_logprobs(
    tokenizer: Tokenizer, token_ids: List[int], logprobs: List[float], tops: List[dict]
) -> dict:
    """The chat `logprobs` object: `{"content": [{token, logprob, bytes, top_logprobs}]}`."""

    def entry(token_id: int, logprob: float) -> dict:
        return {
            "token": token_text(tokenizer, token_id),
            "logprob": logprob,
            "bytes": token_bytes(tokenizer, token_id),
        }

    content = []
    for i, (token_id, lp) in enumerate(zip(token_ids, logprobs)):
        alternatives = tops[i] if i < len(tops) else {}
        content.append(
            {**entry(token_id, lp), "top_logprobs": [entry(t, v) for t, v in alternatives.items()]}
        )
    return {"content": content}


def make_router(state: ServerState, max_body_bytes: int) -> APIRouter:
    """The OpenAI routes over `state`."""
    router = APIRouter()

    @router.get("/v1/models")
    async def models() -> dict:
        return {
            "object": "list",
            "data": [
                {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "codellama"}
            ],
        }

    @router.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await read_json(request, CompletionRequest, max_body_bytes)
        check_model(state, body.model)
        tokenizer = state.tokenizer()
        choices = body.prompt_count() * body.n
        generation = await state.generate(
            "completions", choices, partial(completion_job, body, tokenizer, state.default_speculation)
        )
        job = generation.job
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": state.model_name}
        if body.stream:
            chunks = _CompletionChunks(job, tokenizer)
            return EventStream(
                _stream(state, generation, chunks, meta, _include_usage(body)), generation.close
            )
        results = await collect_unless_disconnected(request.receive, generation)
        if results is None:
            return Response(status_code=CLIENT_CLOSED)
        choices = []
        for index, result in enumerate(results):
            prompt_text = job.prompt_texts[index // job.n]
            text = (prompt_text if job.echo else "") + result.text
            logprobs = None
            if job.logprobs is not None:
                ids, lps, tops = result.token_ids, list(result.logprobs), result.top_logprobs
                if job.echo:
                    prompt_ids, prompt_lps = _echo_logprobs(generation, index, tokenizer)
                    ids, lps, tops = prompt_ids + ids, prompt_lps + lps, [{} for _ in prompt_ids] + tops
                logprobs = completion_logprobs(tokenizer, ids, lps, tops if job.logprobs else [], 0)
            choices.append(
                {"index": index, "text": text, "logprobs": logprobs, "finish_reason": result.finish_reason}
            )
        return JSONResponse(
            {**meta, "object": "text_completion", "choices": choices, "usage": usage_dict(results, job.n)}
        )

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await read_json(request, ChatCompletionRequest, max_body_bytes)
        check_model(state, body.model)
        tokenizer = state.tokenizer()
        generation = await state.generate(
            "chat", body.n, partial(chat_job, body, tokenizer, state.default_speculation)
        )
        job = generation.job
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": state.model_name}
        if body.stream:
            chunks = _ChatChunks(job, tokenizer)
            return EventStream(
                _stream(state, generation, chunks, meta, _include_usage(body)), generation.close
            )
        results = await collect_unless_disconnected(request.receive, generation)
        if results is None:
            return Response(status_code=CLIENT_CLOSED)
        choices = []
        for index, result in enumerate(results):
            logprobs = None
            if job.logprobs is not None:
                logprobs = chat_logprobs(tokenizer, result.token_ids, result.logprobs, result.top_logprobs)
            message = {"role": "assistant", "content": result.text}
            if tokenizer.step_id is not None:
                message["destination"] = "user"
            choices.append(
                {
                    "index": index,
                    "message": message,
                    "logprobs": logprobs,
                    "finish_reason": result.finish_reason,
                }
            )
        return JSONResponse(
            {**meta, "object": "chat.completion", "choices": choices, "usage": usage_dict(results, job.n)}
        )

    return router


def _include_usage(body: Union[CompletionRequest, ChatCompletionRequest]) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


def _echo_logprobs(generation: Generation, index: int, tokenizer: Tokenizer) -> Tuple[List[int], list]:
    """Prompt ids and their log-probabilities, for `echo` with `logprobs`. BOS is left out, as the
    echoed text has none; a first token without context has None."""
    request = generation.requests[index]
    ids = list(request.prompt_tokens)
    lps: List[Optional[float]] = list(request.result().prompt_logprobs or [0.0] * len(ids))
    if ids[0] == tokenizer.bos_id:
        return ids[1:], lps[1:]
    return ids, [None] + lps[1:]


class _Chunks(Protocol):
    """How one endpoint's stream writes its choices."""

    object: str

    def opening(self, index: int) -> Optional[dict]:
        """The choice sent for choice `index` before anything is generated, if any."""

    def choice(self, index: int, event: Event) -> dict:
        """The choice carrying one engine event of choice `index`."""


class _CompletionChunks:
    """/v1/completions: text choices; `text_offset` counts from the start of the choice's text
    (the echoed prompt included), across chunks."""

    object = "text_completion"

    def __init__(self, job: Job, tokenizer: Tokenizer):
        self.job = job
        self.tokenizer = tokenizer
        self.offsets = [
            len(job.prompt_texts[i // job.n]) if job.echo else 0 for i in range(job.choice_count())
        ]

    def opening(self, index: int) -> Optional[dict]:
        if not self.job.echo:
            return None
        return _text_choice(index, self.job.prompt_texts[index // self.job.n])

    def choice(self, index: int, event: Event) -> dict:
        logprobs = None
        if self.job.logprobs is not None:
            tops = event.top_logprobs if self.job.logprobs else []
            logprobs = completion_logprobs(
                self.tokenizer, event.token_ids, event.logprobs, tops, self.offsets[index]
            )
            self.offsets[index] += sum(len(text) for text in logprobs["tokens"])
        return _text_choice(index, event.text, logprobs, event.finish_reason)


class _ChatChunks:
    """/v1/chat/completions: a first delta with the role, then content deltas."""

    object = "chat.completion.chunk"

    def __init__(self, job: Job, tokenizer: Tokenizer):
        self.job = job
        self.tokenizer = tokenizer

    def opening(self, index: int) -> Optional[dict]:
        return _delta_choice(index, {"role": "assistant", "content": ""})

    def choice(self, index: int, event: Event) -> dict:
        logprobs = None
        if self.job.logprobs is not None:
            logprobs = chat_logprobs(self.tokenizer, event.token_ids, event.logprobs, event.top_logprobs)
        delta = {"content": event.text} if event.text else {}
        return _delta_choice(index, delta, logprobs, event.finish_reason)


async def _stream(
    state: ServerState, generation: Generation, chunks: _Chunks, meta: dict, include_usage: bool
) -> AsyncIterator[str]:
    """A generation as OpenAI server-sent events: the openings, a chunk per event with text, a
    finish reason or logprobs, the usage chunk if asked, `[DONE]`; an error event if it fails."""
    results = [ChoiceResult() for _ in generation.requests]
    base = {**meta, "object": chunks.object}
    usage_field = {"usage": None} if include_usage else {}
    try:
        for index in range(len(results)):
            opening = chunks.opening(index)
            if opening is not None:
                yield sse({**base, "choices": [opening], **usage_field})
        async for item in generation.events():
            event = item.event
            results[item.index].usage = event.usage or results[item.index].usage
            if not (event.text or event.finish_reason or event.logprobs):
                continue
            yield sse({**base, "choices": [chunks.choice(item.index, event)], **usage_field})
        if include_usage:
            yield sse({**base, "choices": [], "usage": usage_dict(results, generation.job.n)})
        yield DONE
    except Exception as error:  # the headers are sent: the error goes in the stream
        yield sse(error_event(error, state.metrics.count_error))


def _text_choice(
    index: int, text: str, logprobs: Optional[dict] = None, finish: Optional[str] = None
) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}


def _delta_choice(
    index: int, delta: dict, logprobs: Optional[dict] = None, finish: Optional[str] = None
) -> dict:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
