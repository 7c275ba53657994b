"""What a request hands its consumers: events as they come, and their fold into one completion.

The stepping thread publishes events; consumers read them by index, in a thread (iteration) or
on an asyncio loop (async iteration, woken through the loop's thread-safe callback). A consumer
that stops reading before the last event cancels its request, so an abandoned stream frees its
cache slot at the next step. A consumer whose event loop has closed is forgotten, never an
error in the stepping thread.
"""

import asyncio
import threading
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Dict, Iterable, Iterator, List, Optional, Tuple


@dataclass
class Usage:
    """Token counts of one request."""

    prompt_tokens: int
    cached_tokens: int  # prompt tokens whose keys and values came from the prefix cache
    completion_tokens: int  # sampled tokens, a stop token included


@dataclass
class Event:
    """What one step produced for a request: normally one token; the last event ends it."""

    text: str  # new text (may be empty while UTF-8 bytes or a possible stop string are held back)
    token_ids: List[int] = field(default_factory=list)
    logprobs: List[float] = field(default_factory=list)  # when asked: one per token id
    top_logprobs: List[Dict[int, float]] = field(default_factory=list)  # when asked for alternatives
    finish_reason: Optional[str] = None  # "stop", "length" or "cancelled" on the last event
    usage: Optional[Usage] = None  # on the last event


@dataclass
class Completion:
    """A finished request: everything its events carried, put together."""

    text: str
    token_ids: List[int]
    logprobs: List[float]
    top_logprobs: List[Dict[int, float]]
    finish_reason: Optional[str]
    usage: Optional[Usage]
    prompt_logprobs: Optional[List[float]] = None  # with `prompt_logprobs`: 0.0 for the first token


def fold(events: Iterable[Event], prompt_logprobs: Optional[List[float]] = None) -> Completion:
    """Put a request's events together: texts, ids and log-probabilities concatenated in order,
    the finish reason and usage of the last event (None while it has not ended)."""
    completion = Completion("", [], [], [], None, None, prompt_logprobs)
    texts = []
    for event in events:
        texts.append(event.text)
        completion.token_ids += event.token_ids
        completion.logprobs += event.logprobs
        completion.top_logprobs += event.top_logprobs
        if event.finish_reason is not None:
            completion.finish_reason, completion.usage = event.finish_reason, event.usage
    completion.text = "".join(texts)
    return completion


class EventStream:
    """A request's published events, read by any number of consumers.

    Args:
        advance: runs one engine step in the calling thread (used when no engine thread runs).
        engine_thread_running: tells whether an engine thread publishes events by itself.
        cancel: cancels the request (called when a consumer stops before the last event).
    """

    def __init__(
        self,
        advance: Callable[[], None],
        engine_thread_running: Callable[[], bool],
        cancel: Callable[[], None],
    ):
        self._advance = advance
        self._thread_running = engine_thread_running
        self._cancel = cancel
        self.events: List[Event] = []
        self.done = False
        self._error: Optional[BaseException] = None
        self._cond = threading.Condition()
        self._wakers: List[Tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    # ------------------------------------------------------------------ producer side

    def publish(self, event: Event) -> None:
        """Append an event (the stepping thread); the one with a finish reason ends the stream."""
        with self._cond:
            self.events.append(event)
            if event.finish_reason is not None:
                self.done = True
            self._cond.notify_all()
        self._wake_loops()

    def fail(self, error: BaseException) -> None:
        """End the stream with an error, which every consumer raises."""
        with self._cond:
            self._error = error
            self.done = True
            self._cond.notify_all()
        self._wake_loops()

    def _wake_loops(self) -> None:
        with self._cond:
            wakers = list(self._wakers)
        for waker in wakers:
            loop, arrived = waker
            try:
                loop.call_soon_threadsafe(arrived.set)
            except RuntimeError:  # that consumer's loop has closed: nobody is waiting there
                self._remove_waker(waker)

    def _remove_waker(self, waker: Tuple[asyncio.AbstractEventLoop, asyncio.Event]) -> None:
        with self._cond:
            if waker in self._wakers:
                self._wakers.remove(waker)

    # ------------------------------------------------------------------ consumer side

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def next_event(self, index: int) -> Event:
        """The event at `index`, waiting (or stepping the engine) until it exists.

        Raises:
            Exception: what failed the request.
        """
        while True:
            with self._cond:
                if index < len(self.events):
                    return self.events[index]
                self._raise_error()
                if self._thread_running():
                    self._cond.wait(timeout=1.0)
                    continue
            self._advance()

    def __iter__(self) -> Iterator[Event]:
        index = 0
        finished = False
        try:
            while not finished:
                event = self.next_event(index)
                index += 1
                finished = event.finish_reason is not None
                yield event
        finally:
            if not finished and not self.done:
                self._cancel()

    def __aiter__(self) -> AsyncIterator[Event]:
        return _AsyncEvents(self)


class _AsyncEvents:
    """One async iteration over a stream. Stopping before the end (break, an exception, the
    loop shutting down) cancels the request and removes this iteration's waker."""

    def __init__(self, stream: EventStream):
        self._stream = stream
        self._index = 0
        self._finished = False
        self._waker: Optional[Tuple[asyncio.AbstractEventLoop, asyncio.Event]] = None

    def __aiter__(self) -> "_AsyncEvents":
        return self

    async def __anext__(self) -> Event:
        stream = self._stream
        if self._finished:
            raise StopAsyncIteration
        if self._waker is None:
            self._waker = (asyncio.get_running_loop(), asyncio.Event())
            with stream._cond:
                stream._wakers.append(self._waker)
        loop, arrived = self._waker
        while True:
            with stream._cond:
                event = stream.events[self._index] if self._index < len(stream.events) else None
                if event is None:
                    try:
                        stream._raise_error()
                    except BaseException:
                        self._close(cancel=False)
                        raise
                    arrived.clear()
            if event is not None:
                break
            try:
                if stream._thread_running():
                    await arrived.wait()
                else:
                    await loop.run_in_executor(None, stream._advance)
            except BaseException:  # cancelled while waiting: the consumer is gone
                self._close(cancel=True)
                raise
        self._index += 1
        if event.finish_reason is not None:
            self._close(cancel=False)
        return event

    async def aclose(self) -> None:
        """Stop iterating: cancels the request unless it has ended."""
        self._close(cancel=True)

    def _close(self, cancel: bool) -> None:
        if self._finished:
            return
        self._finished = True
        if self._waker is not None:
            self._stream._remove_waker(self._waker)
            self._waker = None
        if cancel and not self._stream.done:
            self._stream._cancel()

    def __del__(self) -> None:  # dropped after a `break`: nobody reads this stream any more
        self._close(cancel=True)
