"""Speculative decoding building blocks: proposing tokens and deciding which ones to keep.

Pure logic, independent of the engine: the engine proposes a few tokens per row (`LookupIndex`
for prompt lookup, or a draft model), runs the main model once over the row's last token plus
the proposals, and keeps what the verification rule accepts:

- `accept_greedy`: greedy requests keep the proposals that equal the main model's argmax, so the
  output is exactly what decoding one token at a time would give.
- `verify_sampled`: sampled requests use the speculative sampling rule (Leviathan et al. 2023,
  Chen et al. 2023), which keeps the distribution of the output the main model's own.
- `AdaptiveLength`: how many tokens a row proposes next, from its recent acceptance.

Either way, one verification pass of k proposals emits between 1 and k + 1 tokens.
"""

from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from llama import limits

# The longest n-gram prompt lookup matches by default. A longer match tells apart earlier
# occurrences of the same few tokens (a line repeated with a different ending: the latest
# 3-gram match is often the wrong one), and a match is tried from the longest n down, so short
# matches are still found.
DEFAULT_MAX_NGRAM = 8


@dataclass(frozen=True)
class Speculation:
    """How one request proposes tokens for the main model to check.

    `method` "lookup" proposes the tokens that followed the latest earlier occurrence of the last
    n tokens (n from `max_ngram` down to `min_ngram`) in the prompt and the text so far; "draft"
    has the draft model loaded beside the main one (`Llama.build(draft_ckpt_dir=...)`) decode
    them, greedily for a greedy request, else sampled with the request's own settings. At most
    `num_tokens` tokens are proposed per step; the number adapts to the request's acceptance,
    down to none.
    """

    method: str = "lookup"
    num_tokens: int = 4
    max_ngram: int = DEFAULT_MAX_NGRAM
    min_ngram: int = 1

    def validate(self) -> None:
        """Raises ValueError naming the first field out of range."""
        if self.method not in ("lookup", "draft"):
            raise ValueError(f'speculative method must be "lookup" or "draft", got {self.method!r}')
        limits.check_int("speculative num_tokens", self.num_tokens, 1, limits.MAX_SPECULATIVE_TOKENS)
        limits.check_int("speculative max_ngram", self.max_ngram, 1, limits.MAX_NGRAM)
        limits.check_int(
            "speculative min_ngram",
            self.min_ngram,
            1,
            self.max_ngram if _is_int(self.max_ngram) else limits.MAX_NGRAM,
        )


# ---------------------------------------------------------------------------------------------
# Prompt lookup


class LookupIndex:
    """Prompt lookup over a growing token sequence (the prompt, then each generated token).

    For every n-gram size in [min_ngram, max_ngram] a dict maps the n-gram to the position of
    the last token of its latest occurrence. The n-grams ending at the newest token are entered
    only when the next token arrives, so a lookup of the current suffix never finds the suffix
    itself. Feeding a token and proposing each cost O(max_ngram) dict operations, whatever the
    length of the context; feeding a prompt of n tokens costs O(n * max_ngram) once.
    """

    def __init__(self, max_ngram: int = DEFAULT_MAX_NGRAM, min_ngram: int = 1, tokens: Iterable[int] = ()):
        """An index of the n-grams of `tokens` for n in [min_ngram, max_ngram].

        Raises:
            ValueError: unless 1 <= min_ngram <= max_ngram (integers).
        """
        if not _is_int(min_ngram) or not _is_int(max_ngram) or not 1 <= min_ngram <= max_ngram:
            raise ValueError(
                f"n-gram sizes must be integers with 1 <= min_ngram <= max_ngram, got "
                f"min_ngram={min_ngram!r}, max_ngram={max_ngram!r}"
            )
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        self.tokens: List[int] = []
        self._last_end: Dict[int, Dict[Tuple[int, ...], int]] = {
            n: {} for n in range(min_ngram, max_ngram + 1)
        }
        self.extend(tokens)

    def __len__(self) -> int:
        return len(self.tokens)

    def append(self, token: int) -> None:
        """Add the next token of the sequence."""
        end = len(self.tokens) - 1  # the previous newest token: its n-grams become searchable
        if end >= 0:
            for n, last_end in self._last_end.items():
                if end + 1 >= n:
                    last_end[tuple(self.tokens[end + 1 - n : end + 1])] = end
        self.tokens.append(int(token))

    def extend(self, tokens: Iterable[int]) -> None:
        """Add several tokens, in order."""
        for token in tokens:
            self.append(token)

    def propose(self, num_tokens: int) -> List[int]:
        """Up to `num_tokens` tokens that followed the latest earlier occurrence of the sequence's
        last n tokens, trying n from `max_ngram` down to `min_ngram`.

        Returns:
            The tokens after the first n that matches (fewer than `num_tokens` when that
            occurrence is close to the end of the sequence); [] when no n matches or
            `num_tokens` is 0.

        Raises:
            ValueError: if `num_tokens` is negative.
        """
        if not _is_int(num_tokens) or num_tokens < 0:
            raise ValueError(f"num_tokens must be an integer >= 0, got {num_tokens!r}")
        if num_tokens == 0:
            return []
        tokens = self.tokens
        for n in range(min(self.max_ngram, len(tokens)), self.min_ngram - 1, -1):
            end = self._last_end[n].get(tuple(tokens[-n:]))
            if end is not None:  # end < len(tokens) - 1: at least one token follows
                return tokens[end + 1 : end + 1 + num_tokens]
        return []


def propose_lookup(
    tokens: Sequence[int], num_tokens: int, max_ngram: int = DEFAULT_MAX_NGRAM, min_ngram: int = 1
) -> List[int]:
    """Prompt lookup on a whole sequence at once (builds a `LookupIndex`: O(len(tokens)); the
    engine keeps one index per request and feeds it instead).

    Returns:
        As `LookupIndex.propose`: up to `num_tokens` tokens that followed the latest earlier
        occurrence of the last n tokens of `tokens`, n from `max_ngram` down to `min_ngram`.

    Raises:
        ValueError: for n-gram sizes or `num_tokens` out of range.
    """
    return LookupIndex(max_ngram, min_ngram, tokens).propose(num_tokens)


# ---------------------------------------------------------------------------------------------
# Verification


def accept_greedy(proposed: Sequence[int], target_tokens: Sequence[int]) -> int:
    """How many proposals a greedy request keeps.

    Args:
        proposed: the k proposed tokens.
        target_tokens: k + 1 tokens: target_tokens[i] is the main model's argmax after the
            prefix and proposed[:i].

    Returns:
        The length of the longest run of proposals equal to the targets. The request emits
        target_tokens[:accepted + 1]: the accepted proposals and the main model's own next token.

    Raises:
        ValueError: if there are not exactly k + 1 target tokens.
    """
    if len(target_tokens) != len(proposed) + 1:
        raise ValueError(
            f"expected {len(proposed) + 1} target tokens for {len(proposed)} proposals, got "
            f"{len(target_tokens)}"
        )
    accepted = 0
    for mine, target in zip(proposed, target_tokens):
        if int(mine) != int(target):
            break
        accepted += 1
    return accepted


def residual_distribution(p: torch.Tensor, q: Optional[torch.Tensor], token: int) -> torch.Tensor:
    """The distribution to sample from after the proposal `token` was rejected.

    Args:
        p: [vocab] the main model's probabilities at this position.
        q: [vocab] the draft's probabilities, or None for a proposal made with certainty (a
            point mass on `token`, as in prompt lookup).
        token: the rejected proposal.

    Returns:
        [vocab] float64 normalize(max(0, p - q)); `p` normalized when that residual has no mass
        (p <= q everywhere: possible only through rounding, as a rejection then has probability
        zero in exact arithmetic).
    """
    p = p.to(torch.float64)
    if q is None:
        residual = p.clone()
        residual[token] = 0.0  # max(0, p - onehot) with p <= 1
    else:
        residual = (p - q.to(torch.float64)).clamp_(min=0.0)
    total = float(residual.sum())
    if not total > 0.0:
        residual, total = p, float(p.sum())
    return residual / total


def verify_sampled(
    proposed: Sequence[int],
    target_probs: torch.Tensor,
    draft_probs: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> List[int]:
    """The tokens a sampled request emits from one verification pass (speculative sampling).

    Proposal i is accepted with probability min(1, p_i(x_i) / q_i(x_i)); at the first rejection
    a token is drawn from normalize(max(0, p_i - q_i)) and the round ends; when all k are
    accepted a bonus token is drawn from p_k. Each emitted token then has the distribution the
    main model would have sampled it from, given the tokens before it.

    Args:
        proposed: the k proposed tokens x_0 .. x_{k-1}.
        target_probs: [k + 1, vocab] the main model's final sampling distributions (after the
            request's penalties, temperature, top-k/top-p/min-p) after the prefix and
            proposed[:i], for i = 0 .. k. Penalties that depend on the generated tokens must
            count proposed[:i] as generated at row i.
        draft_probs: [k, vocab] the distributions each proposal was drawn from, or None when
            the proposals were made with certainty (prompt lookup: q_i is a point mass on x_i).
        generator: the request's random generator (None: torch's global one), on the device of
            `target_probs`; a seeded request draws every random number from it.

    Returns:
        Between 1 and k + 1 token ids: the accepted proposals, then the corrected or bonus token.

    Raises:
        ValueError: if the shapes do not match the number of proposals, or a proposal is not a
            token id of the vocabulary.
    """
    k = len(proposed)
    if target_probs.dim() != 2 or target_probs.shape[0] != k + 1:
        raise ValueError(
            f"target_probs must be [{k + 1}, vocab] for {k} proposals, got {tuple(target_probs.shape)}"
        )
    vocab = target_probs.shape[1]
    if draft_probs is not None and tuple(draft_probs.shape) != (k, vocab):
        raise ValueError(
            f"draft_probs must be [{k}, {vocab}] for {k} proposals, got {tuple(draft_probs.shape)}"
        )
    tokens = [int(t) for t in proposed]
    if any(not 0 <= t < vocab for t in tokens):
        raise ValueError(f"proposed token ids must be in [0, {vocab - 1}], got {tokens}")
    # Every random number of the round in one call: k acceptance tests, then one draw.
    draws = torch.rand(k + 1, generator=generator, dtype=torch.float64, device=target_probs.device).tolist()
    emitted: List[int] = []
    for i, token in enumerate(tokens):
        p = float(target_probs[i, token])
        q = 1.0 if draft_probs is None else float(draft_probs[i, token])
        # u < p / q, written without the division: q = 0 accepts exactly when p > 0.
        if draws[i] * q < p:
            emitted.append(token)
            continue
        draft = None if draft_probs is None else draft_probs[i]
        emitted.append(_draw(residual_distribution(target_probs[i], draft, token), draws[k]))
        return emitted
    emitted.append(_draw(target_probs[k].double(), draws[k]))
    return emitted


def _draw(probs: torch.Tensor, u: float) -> int:
    """The token at which the cumulative probability first exceeds u * total (inverse CDF: token
    i with probability probs[i] / total for u uniform in [0, 1); zero-probability tokens never)."""
    cumulative = probs.cumsum(0)
    total = cumulative[-1]
    index = int(torch.searchsorted(cumulative, total * u, right=True))
    if index >= probs.shape[0]:  # u * total rounded up to the total: the last possible token
        index = int(probs.nonzero().max())
    return index


# ---------------------------------------------------------------------------------------------
# How many tokens to propose


class AdaptiveLength:
    """The number of tokens one row proposes per step, adapting to its recent acceptance.

    A fully accepted round grows the length by one (up to `max_length`); a partly accepted one
    sets it to one more than the accepted count; a round with nothing accepted halves it, so a
    row whose proposals keep failing reaches 0 within a few rounds and then decodes at plain
    speed. At 0 the row proposes a single token again once `probe_every` steps have passed, so a
    request that starts copying later recovers. Steps on which nothing could be proposed (no
    lookup match) tell nothing and change nothing.

    Use: `n = lengths.next_length()` each step, propose up to n tokens, verify, then
    `lengths.record(len(proposed), accepted)`.
    """

    def __init__(self, max_length: int, start: Optional[int] = None, probe_every: int = 8):
        """Lengths in [0, max_length], starting at `start` (default `max_length`).

        Raises:
            ValueError: if max_length < 0, start is outside [0, max_length] or probe_every < 1.
        """
        if not _is_int(max_length) or max_length < 0:
            raise ValueError(f"max_length must be an integer >= 0, got {max_length!r}")
        start = max_length if start is None else start
        if not _is_int(start) or not 0 <= start <= max_length:
            raise ValueError(f"start must be an integer in [0, {max_length}], got {start!r}")
        if not _is_int(probe_every) or probe_every < 1:
            raise ValueError(f"probe_every must be an integer >= 1, got {probe_every!r}")
        self.max_length = max_length
        self.length = start
        self.probe_every = probe_every
        self._idle_steps = 0  # steps at length 0 since the last probe

    def next_length(self) -> int:
        """How many tokens to propose this step (call once per step): the current length, or 1
        for a probe when the length is 0 and `probe_every` steps have passed since the last one."""
        if self.length > 0 or self.max_length == 0:
            return self.length
        self._idle_steps += 1
        return 1 if self._idle_steps >= self.probe_every else 0

    def record(self, proposed: int, accepted: int) -> None:
        """Update the length after a step that proposed `proposed` tokens and accepted `accepted`.

        Raises:
            ValueError: unless 0 <= accepted <= proposed.
        """
        if not _is_int(proposed) or not _is_int(accepted) or not 0 <= accepted <= proposed:
            raise ValueError(
                f"need 0 <= accepted <= proposed, got proposed={proposed!r}, accepted={accepted!r}"
            )
        if proposed == 0:
            return
        self._idle_steps = 0
        if accepted == proposed:
            self.length = min(self.max_length, max(self.length, proposed) + 1)
        elif accepted > 0:
            self.length = min(self.length, accepted + 1)
        else:
            self.length //= 2


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
