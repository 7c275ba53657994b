"""llama.cpp server-compatible endpoints: /completion, /infill, /tokenize, /detokenize.

Responses carry llama.cpp's fields (`content`, `stop`, `tokens_predicted`, `tokens_evaluated`,
`stop_type`, ...); streams are `data: {...}` events, the last one with `"stop": true`.
"""

import asyncio
import math
import time
from functools import partial
from typing import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from llama.server.errors import APIError, error_event
from llama.server.jobs import infill_job, llamacpp_completion_job
from llama.server.openai_api import CLIENT_CLOSED, token_text
from llama.server.runner import ChoiceResult, Generation, collect_unless_disconnected
from llama.server.schemas import DetokenizeRequest, InfillRequest, LlamaCppCompletionRequest, TokenizeRequest
from llama.server.state import ServerState
from llama.server.transport import EventStream, read_json, sse
from llama.tokenizer import Tokenizer


def _probabilities(tokenizer: Tokenizer, result: ChoiceResult) -> list:
    """llama.cpp's `completion_probabilities`: per token, its text and the top alternatives."""
    return [
        {
            "content": token_text(tokenizer, token_id),
            "probs": [{"tok_str": token_text(tokenizer, t), "prob": math.exp(lp)} for t, lp in top.items()],
        }
        for token_id, top in zip(result.token_ids, result.top_logprobs)
    ]


def _final(state: ServerState, generation: Generation, result: ChoiceResult, started: float) -> dict:
    """The closing fields of a llama.cpp completion."""
    tokenizer = state.tokenizer_
    usage = result.usage
    predicted = len(result.token_ids)
    stopped_eos = result.finish_reason == "stop" and usage.completion_tokens > predicted
    stopped_word = result.finish_reason == "stop" and not stopped_eos
    stopping_word = ""
    if stopped_word:
        full = tokenizer.decode_infilling(result.token_ids)[len(result.text) :]
        stopping_word = next((s for s in generation.job.stop if full.startswith(s)), "")
    elapsed_ms = (time.perf_counter() - started) * 1000
    return {
        "model": state.model_name,
        "stop": True,
        "tokens_predicted": predicted,
        "tokens_evaluated": usage.prompt_tokens,
        "tokens_cached": usage.cached_tokens,
        "stop_type": "eos" if stopped_eos else "word" if stopped_word else "limit",
        "stopped_eos": stopped_eos,
        "stopped_word": stopped_word,
        "stopped_limit": result.finish_reason == "length",
        "stopping_word": stopping_word,
        "truncated": False,
        "timings": {
            "prompt_n": usage.prompt_tokens - usage.cached_tokens,
            "predicted_n": predicted,
            "predicted_ms": elapsed_ms,
            "predicted_per_second": predicted / elapsed_ms * 1000 if elapsed_ms > 0 else 0.0,
        },
    }


def make_router(state: ServerState, max_body_bytes: int) -> APIRouter:
    """The llama.cpp-compatible routes over `state`."""
    router = APIRouter()

    async def run(request: Request, generation: Generation, stream: bool) -> Response:
        started = time.perf_counter()
        if stream:
            return EventStream(_stream(state, generation, started), generation.close)
        results = await collect_unless_disconnected(request.receive, generation)
        if results is None:
            return Response(status_code=CLIENT_CLOSED)
        result = results[0]
        body = {"content": result.text, **_final(state, generation, result, started)}
        if generation.job.logprobs:
            body["completion_probabilities"] = _probabilities(state.tokenizer_, result)
        return JSONResponse(body)

    @router.post("/completion")
    async def completion(request: Request) -> Response:
        body = await read_json(request, LlamaCppCompletionRequest, max_body_bytes)
        tokenizer = state.tokenizer()
        generation = await state.generate(
            "completion", 1, partial(llamacpp_completion_job, body, tokenizer, state.default_speculation)
        )
        return await run(request, generation, body.stream)

    @router.post("/infill")
    async def infill(request: Request) -> Response:
        body = await read_json(request, InfillRequest, max_body_bytes)
        tokenizer = state.tokenizer()
        generation = await state.generate(
            "infill", 1, partial(infill_job, body, tokenizer, state.default_speculation)
        )
        return await run(request, generation, body.stream)

    @router.post("/tokenize")
    async def tokenize(request: Request) -> dict:
        body = await read_json(request, TokenizeRequest, max_body_bytes)
        return await asyncio.to_thread(_tokenize, state.tokenizer(), body)

    @router.post("/detokenize")
    async def detokenize(request: Request) -> dict:
        body = await read_json(request, DetokenizeRequest, max_body_bytes)
        tokenizer = state.tokenizer()
        bad = [t for t in body.tokens if not 0 <= t < tokenizer.n_words]
        if bad:
            raise APIError(
                400, f"tokens: id {bad[0]} is outside the vocabulary of {tokenizer.n_words}", param="tokens"
            )
        return {"content": await asyncio.to_thread(tokenizer.decode, body.tokens)}

    return router


def _tokenize(tokenizer: Tokenizer, body: TokenizeRequest) -> dict:
    """The /tokenize answer: the ids, or with `with_pieces` each id with its piece."""
    ids = tokenizer.encode(body.content, bos=body.add_special, eos=False)
    if body.with_pieces:
        return {"tokens": [{"id": t, "piece": token_text(tokenizer, t)} for t in ids]}
    return {"tokens": ids}


async def _stream(state: ServerState, generation: Generation, started: float) -> AsyncIterator[str]:
    result = ChoiceResult()
    try:
        async for item in generation.events():
            event = item.event
            result.text += event.text
            result.token_ids += event.token_ids
            if event.finish_reason is None:
                if event.text:
                    yield sse({"content": event.text, "stop": False})
                continue
            result.finish_reason, result.usage = event.finish_reason, event.usage
            yield sse({"content": event.text, **_final(state, generation, result, started)})
    except Exception as error:  # the headers are sent: the error goes in the stream
        yield sse(error_event(error, state.metrics.count_error))
