"""A submitted request: its checks, its scheduling state and the stream its consumers read."""

from typing import AsyncIterator, Callable, Iterator, List, Optional
from typing import Sequence as Seq

import torch

from llama import limits
from llama.detokenize import IncrementalDetokenizer, StopMatcher
from llama.engine.scheduler import Sequence
from llama.engine.stream import Completion, Event, EventStream, Usage, fold
from llama.sampling import RowSampler, SamplingParams
from llama.speculation import AdaptiveLength, LookupIndex, Speculation
from llama.tokenizer import Tokenizer


def check_prompt(prompt: Seq[int], vocab_size: int, max_seq_len: int, name: str = "the prompt") -> None:
    """Refuse a prompt that cannot run.

    Raises:
        ValueError: naming `name`, if the prompt is empty, holds an id outside the vocabulary,
            or leaves no room to generate within `max_seq_len`.
    """
    if not prompt:
        raise ValueError(f"{name} is empty: it needs at least one token (e.g. BOS)")
    bad = [t for t in prompt if not limits.is_int(t) or not 0 <= t < vocab_size]
    if bad:
        raise ValueError(
            f"{name} holds token id {bad[0]!r}, outside the vocabulary of {vocab_size} "
            "(ids must come from this model's tokenizer)"
        )
    if len(prompt) >= max_seq_len:
        raise ValueError(
            f"{name} is {len(prompt)} tokens long, which leaves no room to generate "
            f"within max_seq_len={max_seq_len}: shorten it or build with a larger max_seq_len"
        )


def check_options(
    max_tokens: object,
    prompt_length: int,
    max_seq_len: int,
    stop: List[str],
    stop_token_ids: List[int],
    vocab_size: int,
    logprobs: Optional[int],
) -> None:
    """Refuse request options outside the limits of `llama.limits`.

    Raises:
        ValueError: naming the option, its value and the allowed range.
    """
    if not limits.is_int(max_tokens) or max_tokens < 0:
        raise ValueError(f"max_tokens must be an integer >= 0, got {max_tokens!r}")
    if prompt_length + max_tokens > max_seq_len:
        raise ValueError(
            f"the prompt has {prompt_length} tokens and max_tokens is {max_tokens}: together "
            f"{prompt_length + max_tokens}, more than the context of {max_seq_len} tokens; "
            "shorten the prompt or lower max_tokens"
        )
    if len(stop) > limits.MAX_STOP_STRINGS or any(
        not isinstance(s, str) or not s or len(s) > limits.MAX_STOP_STRING_CHARS for s in stop
    ):
        raise ValueError(
            f"stop must be at most {limits.MAX_STOP_STRINGS} non-empty strings of at most "
            f"{limits.MAX_STOP_STRING_CHARS} characters, got {stop!r:.200}"
        )
    if len(stop_token_ids) > limits.MAX_STOP_TOKEN_IDS:
        raise ValueError(
            f"stop_token_ids holds at most {limits.MAX_STOP_TOKEN_IDS} ids, got {len(stop_token_ids)}"
        )
    bad = [t for t in stop_token_ids if not limits.is_int(t) or not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"stop_token_ids: {bad[0]!r} is outside the vocabulary of {vocab_size}")
    if logprobs is not None:
        limits.check_int("logprobs", logprobs, 0, limits.MAX_TOP_LOGPROBS, " or None")


class Request(Sequence):
    """A submitted request: iterate it (or `async for`) for its events, or wait for `result()`.

    Created by `Engine.submit`. Iterating without an engine thread runs the engine's steps in
    the calling thread (all live requests advance together). Stopping an iteration before the
    last event cancels the request.
    """

    def __init__(
        self,
        request_id: str,
        prompt_tokens: List[int],
        max_tokens: int,
        sampling: SamplingParams,
        sampler: RowSampler,
        tokenizer: Tokenizer,
        stop: Seq[str],
        stop_ids: Seq[int],
        logprobs: Optional[int],
        prompt_logprobs: bool,
        include_stop_str: bool,
        advance: Callable[[], None],
        engine_thread_running: Callable[[], bool],
        wake: Callable[[], None],
        speculation: Optional[Speculation] = None,
    ):
        super().__init__(prompt_tokens, max_tokens, prompt_logprobs)
        self.id = request_id
        self.sampling = sampling
        self.sampler = sampler
        self.logprobs = logprobs
        self.stop_ids = frozenset(stop_ids)
        self.detokenizer = IncrementalDetokenizer(tokenizer)
        self.stops = StopMatcher(stop, include_stop=include_stop_str)
        self.sampled = 0
        self.prompt_lps: List[float] = []
        self._wake = wake
        self.stream = EventStream(advance, engine_thread_running, self.cancel)
        # Prompt lookup: an index over the prompt and the tokens generated so far, and how many
        # tokens to propose next. Rows with penalties decode one token at a time.
        self.lookup: Optional[LookupIndex] = None
        self.lengths: Optional[AdaptiveLength] = None
        self.drafted = False  # proposals come from the draft model
        self.draft_probs: Optional[torch.Tensor] = None  # [k, vocab] what sampled drafts drew from
        if speculation is not None and not sampling.has_penalties:
            self.lengths = AdaptiveLength(speculation.num_tokens)
            if speculation.method == "draft":
                self.drafted = True
            else:
                self.lookup = LookupIndex(speculation.max_ngram, speculation.min_ngram, prompt_tokens)
        self.proposed = 0  # tokens proposed for this request, and of those accepted
        self.accepted = 0

    @property
    def finished(self) -> bool:
        """True once the last event is published (or the request failed)."""
        return self.stream.done

    def cancel(self) -> None:
        """Stop generating: the slot is freed at the next step and the last event says "cancelled"."""
        self.cancelled = True
        self._wake()

    def __iter__(self) -> Iterator[Event]:
        return iter(self.stream)

    def __aiter__(self) -> AsyncIterator[Event]:
        return self.stream.__aiter__()

    def result(self) -> Completion:
        """Wait for the end and return the whole completion.

        Raises:
            Exception: whatever failed this request inside the engine.
        """
        for _ in self.stream:
            pass
        return fold(self.stream.events, [0.0] + self.prompt_lps if self.prompt_logprobs else None)

    def usage(self) -> Usage:
        """Token counts so far."""
        return Usage(len(self.prompt_tokens), self.cached, self.sampled)
