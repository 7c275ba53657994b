"""Which requests run in the next step: plain data in, a plan out (no torch, no threads).

The scheduler owns the cache slots and the queues. `schedule()` retires cancelled requests,
admits waiting ones into free slots (the slot holding the longest cached prefix of the prompt,
else the least recently used one) and chooses the step's work: one decode position for every
running sequence with a token to feed, and prompt chunks of at most `prefill_chunk` tokens in
all, oldest request first. The caller serialises access (the engine holds its lock).

With a paged cache (`BlockBudget`), a request is admitted only when the pool has room for every
position it may reach (prompt + max_tokens) besides what the running requests may reach: it never
runs out of blocks mid-way, it waits instead. Prefixes kept by free slots count as held until a
request needs their room; then the least recently used are forgotten. The plan tells the model
which rows to trim (a finished request's row keeps the blocks of its cached ids; a forgotten one
none), so the model's table matches this count.

Prefixes computed by running requests are shared too: a prompt that starts with at least
`COPY_MIN_TOKENS` more ids than a free slot caches, computed in a running request's slot, has them
copied into its own slot (the plan's `copy`) instead of recomputed; and a prompt sharing such a
prefix with a request still prefilling it waits until that prefix is computed (later requests may
go first meanwhile). Several choices of one prompt (`n`) thus prefill it once.
"""

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Deque, List, Optional, Tuple

# Fewest shared ids worth copying from another slot (or waiting for) instead of recomputing.
COPY_MIN_TOKENS = 16
# What `Scheduler._admit` did: admitted, waiting for a paged cache's blocks (first come, first
# served), or waiting for a running request to compute a shared prefix (others may go first).
ADMITTED, WAIT_BLOCKS, WAIT_PREFIX = "admitted", "wait_blocks", "wait_prefix"


@dataclass(eq=False)
class Sequence:
    """The scheduling state of one request."""

    prompt_tokens: List[int]
    max_tokens: int
    prompt_logprobs: bool = False  # every prompt position's logits are needed (no prefix reuse)
    slot: Optional[int] = None
    computed: int = 0  # prompt tokens whose keys and values are in the slot
    cached: int = 0  # of those, reused from an earlier request
    generated: List[int] = field(default_factory=list)
    pending: Optional[int] = None  # sampled token to feed at the next decode pass
    proposals: List[int] = field(default_factory=list)  # checked after `pending` in the same pass
    cancelled: bool = False

    @property
    def prefilled(self) -> bool:
        """True once every prompt token's keys and values are cached."""
        return self.computed == len(self.prompt_tokens)


@dataclass
class Slot:
    """One cache row and the ids whose keys and values it holds."""

    index: int
    tokens: List[int] = field(default_factory=list)
    last_used: int = 0
    sequence: Optional[Sequence] = None


@dataclass
class Plan:
    """One step's model work, as plain ids (what rank 0 broadcasts to the other ranks)."""

    decode: List[Tuple[int, int, int]]  # (slot, position, token); a slot's proposals follow its token
    prefill: List[Tuple[int, int, List[int]]]  # (slot, start position, tokens)
    all_logits: bool = False  # prefill logits at every position (prompt log-probabilities)
    trim: List[Tuple[int, int]] = field(default_factory=list)  # (slot, positions kept), before the passes
    copy: List[Tuple[int, int, int]] = field(default_factory=list)  # (from slot, to slot, positions), then


@dataclass(frozen=True)
class BlockBudget:
    """A paged cache's pool as the scheduler counts it: `blocks` blocks of `block_len` positions."""

    blocks: int
    block_len: int

    def blocks_for(self, positions: int) -> int:
        """Blocks that hold `positions` positions."""
        return -(-positions // self.block_len)


@dataclass
class Step:
    """What `schedule` decided: the retired sequences and, when there is work, the plan with the
    sequence of each decode row and each prefill chunk (in plan order)."""

    retired: List[Sequence]
    plan: Optional[Plan] = None
    decoding: List[Sequence] = field(default_factory=list)
    prefilling: List[Sequence] = field(default_factory=list)


class Scheduler:
    """The waiting queue, the running sequences and the cache slots.

    Args:
        num_slots: cache rows (the model's max_batch_size).
        prefill_chunk: most prompt tokens prefilled in one step.
        prefix_reuse: admit a prompt into the free slot that caches its longest prefix.
        budget: the pool of a paged cache (None: every slot holds max_seq_len positions).
    """

    def __init__(
        self,
        num_slots: int,
        prefill_chunk: int,
        prefix_reuse: bool = True,
        budget: Optional[BlockBudget] = None,
    ):
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.slots = [Slot(i) for i in range(num_slots)]
        self.prefill_chunk = prefill_chunk
        self.prefix_reuse = prefix_reuse
        self.budget = budget
        self.waiting: Deque[Sequence] = deque()
        self.running: List[Sequence] = []  # in admission order
        self._clock = itertools.count(1)
        self._trim: List[Tuple[int, int]] = []  # for the next plan
        self._copy: List[Tuple[int, int, int]] = []  # for the next plan

    def has_work(self) -> bool:
        """True while any sequence waits or runs."""
        return bool(self.waiting or self.running)

    def add(self, sequence: Sequence) -> None:
        """Queue a sequence; it is admitted when a slot is free."""
        self.waiting.append(sequence)

    def schedule(self) -> Step:
        """Retire cancelled sequences (released), admit waiting ones, and plan the step."""
        retired = [s for s in self.waiting if s.cancelled]
        for sequence in retired:
            self.waiting.remove(sequence)
        cancelled_running = [s for s in self.running if s.cancelled]
        for sequence in cancelled_running:
            self.release(sequence)
        retired += cancelled_running
        for sequence in list(self.waiting):
            if len(self.running) == len(self.slots):
                break
            outcome = self._admit(sequence)
            if outcome == ADMITTED:
                self.waiting.remove(sequence)
            elif outcome == WAIT_BLOCKS:
                break
        if not self.running:
            return Step(retired)
        decoding = [s for s in self.running if s.pending is not None]
        plan = Plan(decode=[], prefill=[], trim=self._trim, copy=self._copy)
        self._trim, self._copy = [], []
        for s in decoding:  # the fed token, then any proposals at the positions after it
            position = len(s.prompt_tokens) + len(s.generated) - 1
            for i, token in enumerate([s.pending] + s.proposals):
                plan.decode.append((s.slot, position + i, token))
        budget = self.prefill_chunk
        prefilling = []
        for sequence in self.running:
            remaining = len(sequence.prompt_tokens) - sequence.computed
            if remaining == 0 or budget == 0:
                continue
            n = min(remaining, budget)
            budget -= n
            chunk = sequence.prompt_tokens[sequence.computed : sequence.computed + n]
            plan.prefill.append((sequence.slot, sequence.computed, chunk))
            plan.all_logits |= sequence.prompt_logprobs
            prefilling.append(sequence)
        return Step(retired, plan, decoding, prefilling)

    def reserved_blocks(self, sequence: Sequence) -> int:
        """Blocks of a paged cache every position `sequence` may reach takes (0 without a budget)."""
        if self.budget is None:
            return 0
        return self.budget.blocks_for(len(sequence.prompt_tokens) + sequence.max_tokens)

    def free_blocks(self) -> int:
        """Blocks of a paged cache neither reserved by a running sequence nor holding a free slot's
        prefix (0 without a budget)."""
        if self.budget is None:
            return 0
        used = sum(self.reserved_blocks(s) for s in self.running)
        used += sum(self.budget.blocks_for(len(slot.tokens)) for slot in self.slots if slot.sequence is None)
        return self.budget.blocks - used

    def _make_room(self, needed: int, keep: Slot, source: Optional[Slot]) -> bool:
        """Forget free slots' prefixes (least recently used first, never `keep`'s or `source`'s)
        until `needed` blocks beyond `keep`'s are free. Returns whether they are; forgets nothing
        when even all of them would not make room (the running sequences hold the rest)."""
        free = self.free_blocks() + self.budget.blocks_for(len(keep.tokens))
        spare = [s for s in self.slots if s.sequence is None and s not in (keep, source) and s.tokens]
        if free + sum(self.budget.blocks_for(len(s.tokens)) for s in spare) < needed:
            return False
        for slot in sorted(spare, key=lambda slot: slot.last_used):
            if free >= needed:
                break
            free += self.budget.blocks_for(len(slot.tokens))
            slot.tokens.clear()
            self._trim.append((slot.index, 0))
        return True

    def _admit(self, sequence: Sequence) -> str:
        """Put `sequence` in a free slot (ADMITTED), reusing the longest prefix it shares with a
        free slot's ids or, copied, with a running request's; or leave everything as it is and
        say why it waits (WAIT_BLOCKS, WAIT_PREFIX)."""
        free = [slot for slot in self.slots if slot.sequence is None]
        prompt = sequence.prompt_tokens
        reuse = self.prefix_reuse and not sequence.prompt_logprobs

        def shared_prefix(ids: List[int]) -> int:
            if not reuse:
                return 0
            # The last prompt token is always computed: its logits.
            return min(common_prefix(ids, prompt), len(prompt) - 1)

        best = max(free, key=lambda slot: (shared_prefix(slot.tokens), -slot.last_used))
        cached, source = shared_prefix(best.tokens), None
        for other in self.running:
            computing = shared_prefix(other.prompt_tokens)
            if computing >= cached + COPY_MIN_TOKENS and other.computed < computing:
                return WAIT_PREFIX  # it is computing a longer shared prefix: copy it once done
            slot = self.slots[other.slot]
            computed = shared_prefix(slot.tokens)
            if computed >= cached + COPY_MIN_TOKENS:
                cached, source = computed, slot
        if self.budget is not None and not self._make_room(self.reserved_blocks(sequence), best, source):
            return WAIT_BLOCKS
        sequence.cached = sequence.computed = cached
        if source is None:
            del best.tokens[cached:]
        else:
            best.tokens = source.tokens[:cached]
            self._copy.append((source.index, best.index, cached))
        best.sequence = sequence
        best.last_used = next(self._clock)
        sequence.slot = best.index
        self.running.append(sequence)
        return ADMITTED

    def prefilled(self, sequence: Sequence, chunk: List[int]) -> None:
        """Record that `chunk` (the next prompt tokens of `sequence`) is now cached."""
        self.slots[sequence.slot].tokens.extend(chunk)
        sequence.computed += len(chunk)

    def decoded(self, sequence: Sequence) -> None:
        """Record that the fed token's keys and values are now cached."""
        self.slots[sequence.slot].tokens.append(sequence.pending)
        sequence.pending = None
        sequence.proposals = []

    def release(self, sequence: Sequence) -> None:
        """Take a sequence out of the queues and free its slot (its cached ids stay for reuse)."""
        if sequence.slot is not None:
            slot = self.slots[sequence.slot]
            slot.sequence = None
            slot.last_used = next(self._clock)
            sequence.slot = None
            if self.budget is not None:  # positions past the cached ids (e.g. rejected proposals)
                self._trim.append((slot.index, len(slot.tokens)))
        sequence.pending = None
        sequence.proposals = []
        if sequence in self.running:
            self.running.remove(sequence)
        if sequence in self.waiting:
            self.waiting.remove(sequence)

    def drain(self) -> List[Sequence]:
        """Release and return every waiting and running sequence (the engine failed them)."""
        live = list(self.waiting) + list(self.running)
        for sequence in live:
            self.release(sequence)
        return live

    def forget_prefixes(self) -> None:
        """Free slots forget their cached ids, so no later request reuses them."""
        for slot in self.slots:
            if slot.sequence is None:
                slot.tokens.clear()
                if self.budget is not None:
                    self._trim.append((slot.index, 0))

    def free_slots(self) -> int:
        """Slots without a running sequence."""
        return sum(slot.sequence is None for slot in self.slots)


def common_prefix(a: List[int], b: List[int]) -> int:
    """How many leading ids `a` and `b` share. Records that share a long head (a slot's ids and a
    prompt, the draft's and the main model's) are compared at C speed first, a block at a time."""
    n, same = min(len(a), len(b)), 0
    step = 256
    while same + step <= n and a[same : same + step] == b[same : same + step]:
        same += step
    while same < n and a[same] == b[same]:
        same += 1
    return same
