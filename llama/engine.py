"""The engine loop: requests join and leave a running batch, one step at a time.

The engine owns the KV-cache rows ("slots"). Each `step`:

1. admits waiting requests into free slots (reusing the longest cached prefix, else the least
   recently used slot) and retires cancelled ones;
2. runs the model: one decode pass over every row that has a token to feed, and one packed
   prefill pass over prompt chunks (at most `prefill_chunk` tokens per step, so a long prompt
   does not stall the running streams);
3. samples a token for every row whose logits are due, with each request's own settings, and
   publishes it as an `Event` (exact text delta, ids, log-probabilities, and at the end the
   finish reason and usage).

Decode rows and prefill chunks run in separate passes so a row's numbers never depend on
what else shares its step: each row's result is the same alone or in any batch.

Under model parallelism, model-parallel rank 0 decides everything (admission, cancellation,
sampled tokens) and broadcasts each step's plan; the other ranks run `follow`, which executes
the plans. Nothing relies on the ranks' random generators agreeing.
"""

import asyncio
import itertools
import threading
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Deque, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from llama import distributed
from llama.detokenize import IncrementalDetokenizer, StopMatcher
from llama.model import Transformer, pack_segments
from llama.sampling import RowSampler, SamplingParams, sample_rows, token_logprobs
from llama.tokenizer import Tokenizer

MAX_STOP_STRINGS = 4
MAX_TOP_LOGPROBS = 5
# While idle under model parallelism, rank 0 tells the other ranks it is alive this often, so
# their wait for the next plan never reaches the process group's timeout.
IDLE_HEARTBEAT_SECONDS = 10.0
_DEFAULT = object()


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
    finish_reason: str
    usage: Usage
    prompt_logprobs: Optional[List[float]] = None  # with `prompt_logprobs`: 0.0 for the first token


class Request:
    """A submitted request: iterate it (or `async for`) for its events, or wait for `result()`.

    Created by `Engine.submit`. Iterating without an engine thread runs the engine's steps in
    the calling thread (all live requests advance together).
    """

    def __init__(
        self,
        engine: "Engine",
        request_id: str,
        prompt_tokens: List[int],
        max_tokens: int,
        sampling: SamplingParams,
        stop: Sequence[str],
        stop_ids: Sequence[int],
        logprobs: Optional[int],
        prompt_logprobs: bool,
        include_stop_str: bool,
    ):
        self.id = request_id
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.sampling = sampling
        self.logprobs = logprobs
        self.prompt_logprobs = prompt_logprobs
        self._engine = engine
        self._stop_ids = frozenset(stop_ids)
        self._detokenizer = IncrementalDetokenizer(engine.tokenizer)
        self._stops = StopMatcher(stop, include_stop=include_stop_str)
        self._sampler: Optional[RowSampler] = None
        # Scheduling state, owned by the stepping thread.
        self.slot: Optional[int] = None
        self.computed = 0  # prompt tokens whose keys and values are in the slot
        self.cached = 0  # of those, reused from an earlier request
        self.generated: List[int] = []
        self.sampled = 0
        self.pending: Optional[int] = None  # sampled token to feed at the next decode pass
        self._prompt_lps: List[float] = []
        self._cancelled = False
        # What consumers read.
        self._events: List[Event] = []
        self._done = False
        self._error: Optional[BaseException] = None
        self._cond = threading.Condition()
        self._wakers: List[Tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    @property
    def finished(self) -> bool:
        return self._done

    def cancel(self) -> None:
        """Stop generating: the slot is freed at the next step and the last event says "cancelled"."""
        self._cancelled = True
        self._engine._wake()

    def __iter__(self) -> Iterator[Event]:
        index = 0
        while True:
            event = self._next_event(index)
            index += 1
            yield event
            if event.finish_reason is not None:
                return

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._async_events()

    async def _async_events(self) -> AsyncIterator[Event]:
        loop = asyncio.get_running_loop()
        arrived = asyncio.Event()
        with self._cond:
            self._wakers.append((loop, arrived))
        index = 0
        while True:
            with self._cond:
                event = self._events[index] if index < len(self._events) else None
                if event is None:
                    self._raise_error()
                    arrived.clear()
            if event is None:
                if self._engine.thread_running:
                    await arrived.wait()
                else:
                    await loop.run_in_executor(None, self._engine._drive)
                continue
            index += 1
            yield event
            if event.finish_reason is not None:
                return

    def result(self) -> Completion:
        """Wait for the end and return the whole completion.

        Raises:
            Exception: whatever failed inside the engine while this request ran.
        """
        for _ in self:
            pass
        events = self._events
        return Completion(
            text="".join(e.text for e in events),
            token_ids=[t for e in events for t in e.token_ids],
            logprobs=[lp for e in events for lp in e.logprobs],
            top_logprobs=[top for e in events for top in e.top_logprobs],
            finish_reason=events[-1].finish_reason,
            usage=events[-1].usage,
            prompt_logprobs=[0.0] + self._prompt_lps if self.prompt_logprobs else None,
        )

    def _next_event(self, index: int) -> Event:
        while True:
            with self._cond:
                if index < len(self._events):
                    return self._events[index]
                self._raise_error()
                if self._engine.thread_running:
                    self._cond.wait(timeout=1.0)
                    continue
            self._engine._drive()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _publish(self, event: Event) -> None:
        with self._cond:
            self._events.append(event)
            if event.finish_reason is not None:
                self._done = True
            self._cond.notify_all()
            wakers = list(self._wakers)
        for loop, arrived in wakers:
            loop.call_soon_threadsafe(arrived.set)

    def _fail(self, error: BaseException) -> None:
        with self._cond:
            self._error = error
            self._done = True
            self._cond.notify_all()
            wakers = list(self._wakers)
        for loop, arrived in wakers:
            loop.call_soon_threadsafe(arrived.set)

    def _usage(self) -> Usage:
        return Usage(len(self.prompt_tokens), self.cached, self.sampled)


@dataclass
class _Slot:
    index: int
    tokens: List[int] = field(default_factory=list)  # ids whose keys and values the cache row holds
    last_used: int = 0
    request: Optional[Request] = None


@dataclass
class _Plan:
    """One step's model work, as plain ids (what rank 0 broadcasts)."""

    decode: List[Tuple[int, int, int]]  # (slot, position, token)
    prefill: List[Tuple[int, int, List[int]]]  # (slot, start position, tokens)
    all_logits: bool = False  # prefill logits at every position (prompt log-probabilities)


class Engine:
    """The one generation loop of the project: see the module docstring.

    Args:
        model: a loaded `Transformer` (its KV cache rows are the slots).
        tokenizer: the model's tokenizer (EOS is the default stop token).
        prefill_chunk: most prompt tokens prefilled in one step (bounds the step time).
        prefix_reuse: reuse the keys and values of a cached prefix (a free slot whose tokens
            start the new prompt) instead of recomputing them.
        decode_fn: replaces `model.forward_decode` (e.g. a compiled version).
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        *,
        prefill_chunk: int = 512,
        prefix_reuse: bool = True,
        decode_fn: Optional[Callable[..., torch.Tensor]] = None,
    ):
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.model = model
        self.tokenizer = tokenizer
        self.prefill_chunk = prefill_chunk
        self.prefix_reuse = prefix_reuse
        self.decode_fn = decode_fn
        self.max_seq_len = model.params.max_seq_len
        self.vocab_size = model.params.vocab_size
        self._slots = [_Slot(i) for i in range(model.params.max_batch_size)]
        self._waiting: Deque[Request] = deque()
        self._running: List[Request] = []  # in admission order
        self._lock = threading.Lock()  # guards _waiting and the thread flags
        self._step_lock = threading.Lock()  # one step at a time
        self._work = threading.Condition(self._lock)
        self._ids = itertools.count()
        self._clock = itertools.count(1)
        self._thread: Optional[threading.Thread] = None
        self._stopping = False

    # ------------------------------------------------------------------ submitting

    @property
    def device(self) -> torch.device:
        return self.model.tok_embeddings.weight.device

    @property
    def thread_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(
        self,
        prompt_tokens: Sequence[int],
        *,
        max_tokens: int,
        sampling: Optional[SamplingParams] = None,
        stop: Sequence[str] = (),
        stop_token_ids: Sequence[int] = (),
        default_stop: Any = _DEFAULT,
        logprobs: Optional[int] = None,
        include_stop_str: bool = False,
        prompt_logprobs: bool = False,
    ) -> Request:
        """Queue a request; it joins the running batch at the next step. Thread-safe.

        Args:
            prompt_tokens: the prompt's ids (BOS included when wanted).
            max_tokens: most tokens to generate; prompt + max_tokens must fit max_seq_len.
            sampling: temperature, top_p, top_k, min_p, penalties, logit bias and seed
                (default greedy).
            stop: up to 4 non-empty strings; generation stops before the first one (matched
                across token boundaries); the text excludes it unless `include_stop_str`.
            stop_token_ids: ids that stop generation, besides `default_stop`.
            default_stop: the format's own stop id (EOS by default; `tokenizer.eot_id` for
                infilling, `tokenizer.step_id` for turn-based chat; None for none).
            logprobs: None for none, 0 for each token's log-probability, 1..5 to add that
                many most likely alternatives.
            prompt_logprobs: also compute the prompt tokens' log-probabilities (no prefix reuse).

        Returns:
            the `Request`.

        Raises:
            ValueError: naming the parameter and its allowed range, or the token counts of a
                prompt that does not fit; nothing else running is affected.
        """
        prompt = [int(t) for t in prompt_tokens]
        self._check_prompt(prompt)
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 0:
            raise ValueError(f"max_tokens must be an integer >= 0, got {max_tokens!r}")
        if len(prompt) + max_tokens > self.max_seq_len:
            raise ValueError(
                f"the prompt has {len(prompt)} tokens and max_tokens is {max_tokens}: together "
                f"{len(prompt) + max_tokens}, more than the context of {self.max_seq_len} tokens; "
                "shorten the prompt or lower max_tokens"
            )
        sampling = SamplingParams() if sampling is None else sampling
        sampling.validate(self.vocab_size)
        stop = [stop] if isinstance(stop, str) else list(stop)
        if len(stop) > MAX_STOP_STRINGS or any(not isinstance(s, str) or not s for s in stop):
            raise ValueError(f"stop must be at most {MAX_STOP_STRINGS} non-empty strings, got {stop!r}")
        ids = [int(t) for t in stop_token_ids]
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"stop_token_ids: {bad[0]} is outside the vocabulary of {self.vocab_size}")
        if logprobs is not None and not (isinstance(logprobs, int) and 0 <= logprobs <= MAX_TOP_LOGPROBS):
            raise ValueError(
                f"logprobs must be None or an integer in [0, {MAX_TOP_LOGPROBS}], got {logprobs!r}"
            )
        return self._enqueue(
            prompt, max_tokens, sampling, stop, ids, default_stop, logprobs, include_stop_str, prompt_logprobs
        )

    def _check_prompt(self, prompt: List[int], name: str = "the prompt") -> None:
        if not prompt:
            raise ValueError(f"{name} is empty: it needs at least one token (e.g. BOS)")
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(
                f"{name} holds token id {bad[0]}, outside the vocabulary of {self.vocab_size} "
                "(ids must come from this model's tokenizer)"
            )
        if len(prompt) >= self.max_seq_len:
            raise ValueError(
                f"{name} is {len(prompt)} tokens long, which leaves no room to generate "
                f"within max_seq_len={self.max_seq_len}: shorten it or build with a larger max_seq_len"
            )

    def _enqueue(
        self,
        prompt: List[int],
        max_tokens: int,
        sampling: SamplingParams,
        stop: Sequence[str],
        stop_ids: Sequence[int],
        default_stop: Any,
        logprobs: Optional[int],
        include_stop_str: bool = False,
        prompt_logprobs: bool = False,
    ) -> Request:
        default = self.tokenizer.eos_id if default_stop is _DEFAULT else default_stop
        stop_ids = list(stop_ids) + ([] if default is None else [default])
        request = Request(
            self,
            f"req-{next(self._ids)}",
            prompt,
            max_tokens,
            sampling,
            stop,
            stop_ids,
            logprobs,
            prompt_logprobs,
            include_stop_str,
        )
        request._sampler = RowSampler(sampling, prompt, self.vocab_size, self.device)
        with self._lock:
            self._waiting.append(request)
            self._work.notify_all()
        return request

    def forget_prefixes(self) -> None:
        """Drop what the free slots remember, so no later request reuses their cached prefixes."""
        with self._step_lock:
            for slot in self._slots:
                if slot.request is None:
                    slot.tokens.clear()

    def stats(self) -> Dict[str, int]:
        """Counts for monitoring: running and waiting requests, free slots, the batch size."""
        with self._lock:
            running, waiting = len(self._running), len(self._waiting)
        return {
            "running": running,
            "waiting": waiting,
            "free_slots": len(self._slots) - running,
            "max_batch_size": len(self._slots),
        }

    # ------------------------------------------------------------------ running

    def start(self) -> None:
        """Run steps in a daemon thread whenever there is work (what a server does)."""
        with self._lock:
            if self.thread_running:
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="codellama-engine", daemon=True)
            self._thread.start()

    def shutdown(self) -> None:
        """Stop the engine thread: live requests end "cancelled"; other ranks are released."""
        with self._lock:
            self._stopping = True
            for request in list(self._waiting) + self._running:
                request._cancelled = True
            self._work.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._drive()  # retire what is left
        distributed.broadcast_from_first_rank(("shutdown",))

    def _loop(self) -> None:
        while True:
            with self._lock:
                if not self._has_work() and not self._stopping:
                    self._work.wait(timeout=IDLE_HEARTBEAT_SECONDS)
                if self._stopping:
                    return
                idle = not self._has_work()
            if idle:
                distributed.broadcast_from_first_rank(("idle",))
                continue
            try:
                self._drive()
            except Exception:  # already handed to the failed requests; keep serving the next ones
                traceback.print_exc()

    def _wake(self) -> None:
        with self._lock:
            self._work.notify_all()

    def _has_work(self) -> bool:
        return bool(self._waiting or self._running)

    def _drive(self) -> None:
        """Run one step unless another thread is running one (then wait for it)."""
        with self._step_lock:
            try:
                self.step()
            except Exception as error:  # the model failed: fail every live request with it
                with self._lock:
                    failed = list(self._waiting) + self._running
                    self._waiting.clear()
                for request in failed:
                    self._release(request)
                    request._fail(error)
                raise

    @torch.inference_mode()
    def step(self) -> bool:
        """Admit, compute and sample once. Returns whether any request was live."""
        plan, rows = self._plan()
        if plan is None:
            return False
        distributed.broadcast_from_first_rank(("step", plan))
        decode_logits, prefill_logits = self._execute(plan)
        self._advance(plan, rows, decode_logits, prefill_logits)
        return True

    @torch.inference_mode()
    def follow(self, until_result: bool = False) -> Any:
        """On model-parallel ranks > 0: run rank 0's plans until it shuts down (or, with
        `until_result`, until it broadcasts a batch result, which is returned)."""
        while True:
            message = distributed.broadcast_from_first_rank(None)
            kind = message[0]
            if kind == "step":
                self._execute(message[1])
            elif kind == "result" and until_result:
                return message[1]
            elif kind == "shutdown":
                return None

    # ------------------------------------------------------------------ scheduling

    def _plan(self) -> Tuple[Optional[_Plan], List[Request]]:
        """Retire cancelled requests, admit waiting ones, and choose this step's work."""
        with self._lock:
            for request in [r for r in self._waiting if r._cancelled]:
                self._waiting.remove(request)
                request._publish(Event("", finish_reason="cancelled", usage=request._usage()))
            for request in [r for r in self._running if r._cancelled]:
                self._finish(request, "cancelled", "")
            while self._waiting and len(self._running) < len(self._slots):
                self._admit(self._waiting.popleft())
            running = list(self._running)
        if not running:
            return None, []
        decode = [r for r in running if r.pending is not None]
        plan = _Plan(
            decode=[(r.slot, len(r.prompt_tokens) + len(r.generated) - 1, r.pending) for r in decode],
            prefill=[],
        )
        budget = self.prefill_chunk
        prefilling = []
        for request in running:
            remaining = len(request.prompt_tokens) - request.computed
            if remaining == 0 or budget == 0:
                continue
            n = min(remaining, budget)
            budget -= n
            chunk = request.prompt_tokens[request.computed : request.computed + n]
            plan.prefill.append((request.slot, request.computed, chunk))
            plan.all_logits |= request.prompt_logprobs
            prefilling.append(request)
        return plan, decode + prefilling

    def _admit(self, request: Request) -> None:
        """Give `request` the free slot holding its longest cached prefix, else the least recently used."""
        free = [slot for slot in self._slots if slot.request is None]
        prompt = request.prompt_tokens
        reuse = self.prefix_reuse and not request.prompt_logprobs

        def cached_prefix(slot: _Slot) -> int:
            if not reuse:
                return 0
            n = 0
            for cached, wanted in zip(slot.tokens, prompt):
                if cached != wanted:
                    break
                n += 1
            return min(n, len(prompt) - 1)  # the last prompt token is always computed: its logits

        best = max(free, key=lambda slot: (cached_prefix(slot), -slot.last_used))
        request.cached = request.computed = cached_prefix(best)
        del best.tokens[request.computed :]
        best.request = request
        best.last_used = next(self._clock)
        request.slot = best.index
        self._running.append(request)

    def _execute(self, plan: _Plan) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Run the plan's decode and prefill passes; returns their logits."""
        device = self.device
        decode_logits = prefill_logits = None
        if plan.decode:
            slots, positions, tokens = (torch.tensor(column, device=device) for column in zip(*plan.decode))
            decode = self.decode_fn or self.model.forward_decode
            decode_logits = decode(tokens, slots, positions)
        if plan.prefill:
            segments = pack_segments([(slot, start, len(chunk)) for slot, start, chunk in plan.prefill])
            tokens = torch.tensor([t for _, _, chunk in plan.prefill for t in chunk], device=device)
            prefill_logits = self.model.forward_segments(tokens, segments, last_only=not plan.all_logits)
        return decode_logits, prefill_logits

    def _advance(
        self,
        plan: _Plan,
        rows: List[Request],
        decode_logits: Optional[torch.Tensor],
        prefill_logits: Optional[torch.Tensor],
    ) -> None:
        """Record what the passes computed, sample the rows that are due, publish events."""
        n_decode = len(plan.decode)
        due: List[Request] = rows[:n_decode]
        logits = [decode_logits] if n_decode else []
        offset = 0
        for request, (slot, start, chunk) in zip(rows[n_decode:], plan.prefill):
            self._slots[slot].tokens.extend(chunk)
            request.computed += len(chunk)
            if plan.all_logits:
                chunk_logits = prefill_logits[offset : offset + len(chunk)]
                offset += len(chunk)
                if request.prompt_logprobs:
                    targets = request.prompt_tokens[start + 1 : start + len(chunk) + 1]
                    lp = torch.log_softmax(chunk_logits[: len(targets)], dim=-1)
                    ids = torch.tensor(targets, device=lp.device)[:, None]
                    request._prompt_lps += lp.gather(-1, ids)[:, 0].tolist()
                last = chunk_logits[-1:]
            else:
                last = prefill_logits[offset : offset + 1]
                offset += 1
            if request.computed < len(request.prompt_tokens):
                continue
            if request.max_tokens == 0:
                self._finish(request, "length", "")
                continue
            due.append(request)
            logits.append(last)
        for request in rows[:n_decode]:  # the fed token's keys and values are now cached
            self._slots[request.slot].tokens.append(request.pending)
            request.pending = None
        if not due:
            return
        all_logits = torch.cat(logits) if len(logits) > 1 else logits[0]
        tokens = sample_rows(all_logits, [r._sampler for r in due])
        want = [r.logprobs for r in due if r.logprobs is not None]
        chosen_lp = top = None
        if want:
            chosen_lp, top = token_logprobs(all_logits, tokens, max(want))
            chosen_lp = chosen_lp.tolist()
            if top is not None:
                top = (top[0].tolist(), top[1].tolist())
        for i, (request, token) in enumerate(zip(due, tokens.tolist())):
            lp = None if chosen_lp is None else chosen_lp[i]
            alternatives = None
            if top is not None and request.logprobs:
                k = request.logprobs
                alternatives = dict(zip(top[0][i][:k], top[1][i][:k]))
            self._accept(request, token, lp, alternatives)

    def _accept(
        self, request: Request, token: int, logprob: Optional[float], alternatives: Optional[Dict[int, float]]
    ) -> None:
        """Add one sampled token to a request, publish it, and finish the request when due."""
        request.sampled += 1
        request._sampler.observe(token)
        if token in request._stop_ids:
            self._finish(request, "stop", "")
            return
        request.generated.append(token)
        event = Event(request._detokenizer.add(token), [token])
        if request.logprobs is not None:
            event.logprobs.append(logprob)
            if request.logprobs:
                event.top_logprobs.append(alternatives)
        event.text, stopped = request._stops.feed(event.text)
        finish = None
        if stopped:
            finish = "stop"
        elif len(request.generated) >= request.max_tokens:
            finish = "length"
        elif len(request.prompt_tokens) + len(request.generated) >= self.max_seq_len:
            finish = "length"  # no room to feed this token
        if finish is None:
            request.pending = token
            request._publish(event)
            return
        self._finish(request, finish, event.text, event, flush=not stopped)

    def _finish(
        self, request: Request, reason: str, text: str, event: Optional[Event] = None, flush: bool = True
    ) -> None:
        if flush:
            tail, stopped = request._stops.feed(request._detokenizer.flush())
            text += tail + ("" if stopped else request._stops.flush())
        event = event or Event("")
        event.text, event.finish_reason, event.usage = text, reason, request._usage()
        self._release(request)
        request._publish(event)

    def _release(self, request: Request) -> None:
        if request.slot is not None:
            slot = self._slots[request.slot]
            slot.request = None
            slot.last_used = next(self._clock)
            request.slot = None
        request.pending = None
        if request in self._running:
            self._running.remove(request)
