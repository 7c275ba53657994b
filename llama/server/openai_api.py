"""The OpenAI endpoints: /v1/completions, /v1/chat/completions, /v1/models."""

import time
import uuid
from typing import AsyncIterator, Dict, List, Optional, Tuple

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from llama.server.errors import APIError, invalid
from llama.server.jobs import chat_job, completion_job
from llama.server.runner import ChoiceResult, Generation, collect_unless_disconnected
from llama.server.schemas import ChatCompletionRequest, CompletionRequest
from llama.server.state import ServerState
from llama.server.transport import DONE, EventStream, read_json, sse
from llama.tokenizer import Tokenizer

CLIENT_CLOSED = 499  # logged status of a request whose client went away


def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    """One token as text: `▁` as a space; a byte piece as its character, or `bytes:\\xNN` when
    the byte is part of a multi-byte character (OpenAI's notation)."""
    piece = tokenizer.token_piece(token_id)
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        byte = int(piece[3:5], 16)
        return chr(byte) if byte < 0x80 else f"bytes:\\x{byte:02x}"
    return piece.replace("▁", " ")


def check_model(state: ServerState, model: Optional[str]) -> None:
    """Raise a 400 unless `model` is absent or the served model's name."""
    if model is not None and model != state.model_name:
        raise invalid(
            f"unknown model {model!r}: this server serves {state.model_name!r} (see GET /v1/models)",
            "model",
            "model_not_found",
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
    content = []
    for i, (token_id, lp) in enumerate(zip(token_ids, logprobs)):
        text = token_text(tokenizer, token_id)
        alternatives = tops[i] if i < len(tops) else {}
        content.append(
            {
                "token": text,
                "logprob": lp,
                "bytes": list(text.encode("utf-8")),
                "top_logprobs": [
                    {
                        "token": token_text(tokenizer, t),
                        "logprob": v,
                        "bytes": list(token_text(tokenizer, t).encode()),
                    }
                    for t, v in alternatives.items()
                ],
            }
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
        engine, tokenizer = state.engine(), state.tokenizer()
        job = completion_job(body, tokenizer)
        generation = Generation(
            engine, job, state.capacity, state.metrics, "completions", state.engine_failed
        )
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": state.model_name}
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return EventStream(
                _stream_completion(generation, tokenizer, meta, include_usage), generation.close
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
        engine, tokenizer = state.engine(), state.tokenizer()
        job = chat_job(body, tokenizer)
        generation = Generation(engine, job, state.capacity, state.metrics, "chat", state.engine_failed)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": state.model_name}
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return EventStream(_stream_chat(generation, tokenizer, meta, include_usage), generation.close)
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


def _echo_logprobs(generation: Generation, index: int, tokenizer: Tokenizer) -> Tuple[List[int], list]:
    """Prompt ids and their log-probabilities, for `echo` with `logprobs`. BOS is left out, as the
    echoed text has none; a first token without context has None."""
    request = generation.requests[index]
    ids = list(request.prompt_tokens)
    lps: List[Optional[float]] = list(request.result().prompt_logprobs or [0.0] * len(ids))
    if ids[0] == tokenizer.bos_id:
        return ids[1:], lps[1:]
    return ids, [None] + lps[1:]


async def _stream_completion(
    generation: Generation, tokenizer: Tokenizer, meta: dict, include_usage: bool
) -> AsyncIterator[str]:
    job = generation.job
    results = [ChoiceResult() for _ in generation.requests]
    chunk = {**meta, "object": "text_completion"}
    try:
        if job.echo:
            for index in range(len(results)):
                yield sse({**chunk, "choices": [_text_choice(index, job.prompt_texts[index // job.n])]})
        async for item in generation.events():
            event, result = item.event, results[item.index]
            result.text += event.text
            result.usage = event.usage or result.usage
            if not (event.text or event.finish_reason or event.logprobs):
                continue
            logprobs = None
            if job.logprobs is not None:
                logprobs = completion_logprobs(
                    tokenizer, event.token_ids, event.logprobs, event.top_logprobs if job.logprobs else [], 0
                )
            choice = _text_choice(item.index, event.text, logprobs, event.finish_reason)
            yield sse({**chunk, "choices": [choice], **({"usage": None} if include_usage else {})})
        if include_usage:
            yield sse({**chunk, "choices": [], "usage": usage_dict(results, job.n)})
        yield DONE
    except APIError as error:
        yield sse(error.body())


def _text_choice(
    index: int, text: str, logprobs: Optional[dict] = None, finish: Optional[str] = None
) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}


async def _stream_chat(
    generation: Generation, tokenizer: Tokenizer, meta: dict, include_usage: bool
) -> AsyncIterator[str]:
    job = generation.job
    results = [ChoiceResult() for _ in generation.requests]
    chunk = {**meta, "object": "chat.completion.chunk"}
    usage_field = {"usage": None} if include_usage else {}
    try:
        for index in range(len(results)):
            delta = {"role": "assistant", "content": ""}
            yield sse({**chunk, "choices": [_delta_choice(index, delta)], **usage_field})
        async for item in generation.events():
            event, result = item.event, results[item.index]
            result.usage = event.usage or result.usage
            if not (event.text or event.finish_reason or event.logprobs):
                continue
            logprobs = None
            if job.logprobs is not None:
                logprobs = chat_logprobs(tokenizer, event.token_ids, event.logprobs, event.top_logprobs)
            delta = {"content": event.text} if event.text else {}
            choice = _delta_choice(item.index, delta, logprobs, event.finish_reason)
            yield sse({**chunk, "choices": [choice], **usage_field})
        if include_usage:
            yield sse({**chunk, "choices": [], "usage": usage_dict(results, job.n)})
        yield DONE
    except APIError as error:
        yield sse(error.body())


def _delta_choice(
    index: int, delta: dict, logprobs: Optional[dict] = None, finish: Optional[str] = None
) -> dict:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
