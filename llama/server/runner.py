"""Running a `Job` on the engine from the event loop: admission against the bounded queue, the
choices' events merged into one async stream, cancellation, metrics.
"""

import asyncio
import time
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable, List, Optional, TypeVar

from llama.engine import Completion, Engine, Event, Request, fold
from llama.server.errors import APIError, invalid
from llama.server.jobs import Job
from llama.server.metrics import ServerMetrics

RETRY_AFTER_SECONDS = 1
T = TypeVar("T")


class Capacity:
    """How many generations may be in flight: the engine's slots plus a bounded queue.

    Used only from the event loop's thread, so it needs no lock.
    """

    def __init__(self, slots: int, max_queue: int):
        self.limit = slots + max_queue
        self.max_queue = max_queue
        self.in_flight = 0

    def acquire(self, count: int) -> None:
        """Reserve `count` generations.

        Raises:
            APIError: 400 when `count` exceeds what the server ever holds; 503 with Retry-After
                when they do not fit now.
        """
        if count > self.limit:
            raise invalid(
                f"the request asks for {count} generations (prompts x n) but this server holds at most "
                f"{self.limit} at once: send fewer prompts or a smaller n",
                "n",
            )
        if self.in_flight + count > self.limit:
            raise APIError(
                503,
                f"the server is busy: {self.in_flight} generations are running or queued (at most "
                f"{self.limit}: the engine's slots plus --max_queue {self.max_queue}); retry shortly",
                code="queue_full",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            )
        self.in_flight += count

    def release(self, count: int) -> None:
        """Give back `count` reserved generations."""
        self.in_flight -= count


class EngineUnavailable(APIError):
    """503: the engine can no longer generate (its loop ended, or a model-parallel rank is gone)."""

    def __init__(self, reason: str):
        super().__init__(
            503,
            f"the engine stopped: {reason}",
            code="engine_unavailable",
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        )


@dataclass
class ChoiceEvent:
    """One engine event of choice `index` (text already adjusted for the job's format)."""

    index: int
    event: Event


class Generation:
    """A job's engine requests. Iterate `events()` once; `cancel()` ends every unfinished choice.

    Construction submits the requests; `capacity` must already hold the job's places (see
    `start_generation`), which the generation gives back when it ends, or at once if submitting
    fails. `on_engine_error` turns an error the engine raised while generating into the error
    to answer with. A job with `cap_to_context` generates at most what the context leaves.

    Raises:
        APIError: 400 when the engine refuses the request (e.g. a prompt that does not fit the
            context with its max_tokens, giving the counts).
    """

    def __init__(
        self,
        engine: Engine,
        job: Job,
        capacity: Capacity,
        metrics: ServerMetrics,
        endpoint: str,
        on_engine_error: Callable[[BaseException], APIError],
    ):
        self.job = job
        self._on_engine_error = on_engine_error
        self._metrics = metrics
        self._endpoint = endpoint
        self._capacity = capacity
        self._count = job.choice_count()
        self.requests: List[Request] = []
        self._submitted = time.perf_counter()
        try:
            for choice in range(self._count):
                prompt = job.prompts[choice // job.n]
                room = max(engine.max_request_positions - len(prompt), 0)
                max_tokens = job.max_tokens
                if max_tokens is None:
                    max_tokens = room
                elif job.cap_to_context:
                    max_tokens = min(max_tokens, room)
                self.requests.append(
                    engine.submit(
                        prompt,
                        max_tokens=max_tokens,
                        sampling=job.sampling_for(choice),
                        stop=job.stop,
                        stop_token_ids=job.stop_token_ids,
                        default_stop=job.default_stops[choice // job.n],
                        logprobs=job.logprobs,
                        prompt_logprobs=job.prompt_logprobs,
                        speculation=job.speculation,
                    )
                )
        except ValueError as error:
            self.cancel()
            self._release()
            message = str(error)
            code = (
                "context_length_exceeded"
                if "context" in message or "max_seq_len" in message or "kv_cache_tokens" in message
                else None
            )
            param = "max_tokens" if code else None
            if message.startswith("speculative method"):
                param = "speculative.method"
            raise invalid(message, param, code) from None
        except BaseException:
            self.cancel()
            self._release()
            raise
        self._released = False
        self._open = set(range(self._count))  # choices whose last event was not consumed

    def _release(self) -> None:
        if not getattr(self, "_released", False):
            self._released = True
            self._capacity.release(self._count)

    def close(self) -> None:
        """Cancel what is unfinished (counted as "cancelled": the client went away) and give
        back the queue places. Idempotent; the end of `events()` calls it."""
        self.cancel()
        for _ in self._open:
            self._metrics.requests.labels(self._endpoint, "cancelled").inc()
        self._open.clear()
        self._release()

    def cancel(self) -> None:
        """Cancel every unfinished choice (their slots are free within one engine step)."""
        for request in self.requests:
            if not request.finished:
                request.cancel()

    async def events(self) -> AsyncIterator[ChoiceEvent]:
        """The choices' events as they come, in order per choice; each choice ends with an
        event carrying its finish reason. Cancels what is unfinished when the consumer stops.

        Raises:
            APIError: from `on_engine_error`, if the engine failed while generating.
        """
        queue: "asyncio.Queue[tuple]" = asyncio.Queue()

        async def pump(index: int, request: Request) -> None:
            try:
                async for event in request:
                    queue.put_nowait((index, event, None))
            except Exception as error:  # the engine failed: report it once the queue is read
                queue.put_nowait((index, None, error))

        tasks = [asyncio.ensure_future(pump(i, r)) for i, r in enumerate(self.requests)]
        started = [False] * len(self.requests)
        last_token_at: List[Optional[float]] = [None] * len(self.requests)
        try:
            while self._open:
                index, event, error = await queue.get()
                if error is not None:
                    raise self._on_engine_error(error)
                self._observe(index, event, last_token_at)
                if self.job.strip_leading_space and not started[index] and event.text:
                    event.text = event.text[1:] if event.text.startswith(" ") else event.text
                started[index] = started[index] or bool(event.text)
                if event.finish_reason is not None:
                    self._open.discard(index)
                yield ChoiceEvent(index, event)
        finally:
            for task in tasks:
                task.cancel()
            self.close()

    def _observe(self, index: int, event: Event, last_token_at: List[Optional[float]]) -> None:
        now = time.perf_counter()
        if event.token_ids:
            previous = last_token_at[index]
            if previous is None:
                self._metrics.time_to_first_token.observe(now - self._submitted)
            else:
                self._metrics.inter_token_latency.observe(now - previous)
            last_token_at[index] = now
            self._metrics.generated_tokens.inc(len(event.token_ids))
        if event.finish_reason is not None:
            self._metrics.requests.labels(self._endpoint, event.finish_reason).inc()
            if event.usage is not None:
                self._metrics.prompt_tokens.inc(event.usage.prompt_tokens)
                self._metrics.cached_tokens.inc(event.usage.cached_tokens)


async def start_generation(
    engine: Engine,
    capacity: Capacity,
    metrics: ServerMetrics,
    endpoint: str,
    on_engine_error: Callable[[BaseException], APIError],
    choices: int,
    make_job: Callable[[], Job],
) -> Generation:
    """Reserve `choices` places, then build the job in a worker thread (tokenizing a large body
    would stall every stream the event loop serves) and submit it.

    Raises:
        APIError: 503 when the queue is full (before any tokenizing), 400 when the request asks
            for more than the server ever holds, or whatever `make_job` raises.
    """
    capacity.acquire(choices)
    try:
        job = await asyncio.to_thread(make_job)
        if job.choice_count() != choices:
            raise RuntimeError(f"the job has {job.choice_count()} choices, {choices} were reserved")
    except BaseException:
        capacity.release(choices)
        raise
    return Generation(engine, job, capacity, metrics, endpoint, on_engine_error)


async def collect(generation: Generation) -> List[Completion]:
    """Run a generation to its end; the completions of its choices in choice order."""
    events: List[List[Event]] = [[] for _ in generation.requests]
    async for item in generation.events():
        events[item.index].append(item.event)
    return [fold(choice) for choice in events]


async def until_disconnect(receive: Callable[[], Awaitable[dict]], work: Awaitable[T]) -> Optional[T]:
    """Await `work` unless the client disconnects first (then `work` is cancelled and None returned).

    `receive` is the ASGI receive of a request whose body has been read: its next message is the
    disconnect.
    """
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    return None


async def collect_unless_disconnected(
    receive: Callable[[], Awaitable[dict]], generation: Generation
) -> Optional[List[Completion]]:
    """`collect(generation)`, or None (the generation cancelled) if the client disconnects first."""
    try:
        return await until_disconnect(receive, collect(generation))
    finally:
        generation.close()
