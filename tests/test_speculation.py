"""Speculative decoding building blocks: prompt lookup against a brute-force scan, greedy
acceptance (and a toy greedy decode that must not change a token), the speculative sampling rule
against direct sampling by a chi-square test (which must reject deliberately wrong rules), and
the adaptive proposal length."""

import random
from collections import Counter
from typing import Callable, List, Sequence

import pytest
import torch

from llama import limits
from llama.server.schemas import SpeculativeOptions
from llama.speculation import (
    DEFAULT_MAX_NGRAM,
    AdaptiveLength,
    LookupIndex,
    Speculation,
    accept_greedy,
    propose_lookup,
    residual_distribution,
    verify_sampled,
)

# ---------------------------------------------------------------------------------------------
# Prompt lookup


def brute_force_lookup(tokens: Sequence[int], num_tokens: int, max_ngram: int, min_ngram: int) -> List[int]:
    """The definition, scanned from the right: the latest start j < len - n where the n tokens
    equal the last n, for the longest n that has one."""
    tokens = list(tokens)
    for n in range(max_ngram, min_ngram - 1, -1):
        if n > len(tokens):
            continue
        suffix = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start : start + n] == suffix:
                return tokens[start + n : start + n + num_tokens]
    return []


def test_the_latest_earlier_occurrence_wins():
    tokens = [1, 2, 9, 1, 2, 8, 1, 2]
    assert propose_lookup(tokens, 3) == [8, 1, 2]
    assert propose_lookup(tokens, 1) == [8]
    assert propose_lookup(tokens, 0) == []


def test_longer_ngrams_are_tried_first_then_shorter_ones():
    # (1, 2, 3) occurred once, early; its last two tokens (2, 3) occurred again later.
    tokens = [1, 2, 3, 10, 2, 3, 11, 1, 2, 3]
    assert propose_lookup(tokens, 4, max_ngram=3) == [10, 2, 3, 11]
    assert propose_lookup(tokens, 4, max_ngram=2) == [11, 1, 2, 3]
    # Only the 1-gram 5 repeats: min_ngram=2 finds nothing, min_ngram=1 finds it.
    assert propose_lookup([5, 6, 7, 5], 2, max_ngram=3, min_ngram=1) == [6, 7]
    assert propose_lookup([5, 6, 7, 5], 2, max_ngram=3, min_ngram=2) == []


def test_the_default_ngram_tells_apart_lines_that_differ_in_their_ending():
    # Lines that alternate between two endings: "p A B C x" and "q A B C y". After "q A B C" the
    # latest 3-gram (A B C) is followed by x, the 4-gram (q A B C) by y, which is what comes next.
    p, a, b, c, x, q, y = 1, 2, 3, 4, 5, 6, 7
    tokens = [p, a, b, c, x, q, a, b, c, y, p, a, b, c, x, q, a, b, c]
    assert propose_lookup(tokens, 2, max_ngram=3) == [x, q]
    assert propose_lookup(tokens, 2) == [y, p]
    assert LookupIndex(tokens=tokens).propose(2) == [y, p]
    assert Speculation().max_ngram == DEFAULT_MAX_NGRAM == SpeculativeOptions().max_ngram
    assert 4 <= DEFAULT_MAX_NGRAM <= limits.MAX_NGRAM


def test_the_suffix_never_matches_itself():
    assert propose_lookup([], 4) == []
    assert propose_lookup([4], 4) == []
    assert propose_lookup([1, 2, 3], 4) == []
    # An overlapping earlier occurrence is a real one: "a a" at 0-1 before the suffix at 1-2.
    assert propose_lookup([5, 5, 5], 4) == [5]


def test_proposals_are_cut_at_the_end_of_the_sequence():
    assert propose_lookup([1, 2, 1, 2], 5) == [1, 2]
    assert propose_lookup([3, 1, 2, 7, 1, 2], 10) == [7, 1, 2]


def test_incremental_index_equals_a_brute_force_scan_after_every_token():
    rng = random.Random(0)
    for trial in range(60):
        max_ngram = rng.randint(1, 10)
        min_ngram = rng.randint(1, max_ngram)
        index = LookupIndex(max_ngram, min_ngram)
        alphabet = rng.randint(2, 6)  # small alphabets repeat often
        seq: List[int] = []
        for _ in range(rng.randint(0, 60)):
            token = rng.randrange(alphabet)
            index.append(token)
            seq.append(token)
            num = rng.randint(0, 6)
            assert index.propose(num) == brute_force_lookup(seq, num, max_ngram, min_ngram), (seq, trial)
        assert len(index) == len(seq)
        assert LookupIndex(max_ngram, min_ngram, seq).propose(5) == index.propose(5)


def test_lookup_rejects_bad_sizes():
    with pytest.raises(ValueError, match="min_ngram <= max_ngram"):
        LookupIndex(max_ngram=1, min_ngram=2)
    with pytest.raises(ValueError, match="1 <= min_ngram"):
        propose_lookup([1, 2], 2, max_ngram=2, min_ngram=0)
    with pytest.raises(ValueError, match="num_tokens must be an integer >= 0"):
        propose_lookup([1, 2], -1)


# ---------------------------------------------------------------------------------------------
# Greedy verification


def test_greedy_acceptance_counts_the_leading_matches():
    assert accept_greedy([1, 2, 3], [1, 2, 3, 4]) == 3
    assert accept_greedy([1, 9, 3], [1, 2, 3, 4]) == 1
    assert accept_greedy([5, 2, 3], [1, 2, 3, 4]) == 0  # later matches do not count
    assert accept_greedy([], [7]) == 0
    assert accept_greedy(torch.tensor([4, 4]), torch.tensor([4, 4, 1])) == 2
    with pytest.raises(ValueError, match="expected 3 target tokens for 2 proposals, got 2"):
        accept_greedy([1, 2], [1, 2])


def toy_argmax(prefix: Sequence[int], vocab: int = 5) -> int:
    """A deterministic 'model': the next token is a function of the last three tokens, so the
    output repeats and lookup proposals are often, but not always, right."""
    a, b, c = ([0, 0, 0] + list(prefix))[-3:]
    return (3 * a + 5 * b + 7 * c + (1 if len(prefix) % 11 == 0 else 0)) % vocab


def test_greedy_speculative_loop_with_lookup_emits_exactly_the_plain_greedy_tokens():
    prompt = [1, 2, 3, 4, 1, 2, 3]
    plain = list(prompt)
    while len(plain) < len(prompt) + 80:
        plain.append(toy_argmax(plain))

    index = LookupIndex(3, 1, prompt)
    lengths = AdaptiveLength(4)
    out, passes, accepted_total = list(prompt), 0, 0
    while len(out) < len(plain):
        proposed = index.propose(lengths.next_length())
        # One "verification pass": the target after the prefix and each proposal prefix.
        targets = [toy_argmax(out + proposed[:i]) for i in range(len(proposed) + 1)]
        accepted = accept_greedy(proposed, targets)
        lengths.record(len(proposed), accepted)
        for token in targets[: accepted + 1]:
            out.append(token)
            index.append(token)
        passes += 1
        accepted_total += accepted
    assert out[: len(plain)] == plain
    assert accepted_total > 0 and passes < len(plain) - len(prompt)  # speculation did something


# ---------------------------------------------------------------------------------------------
# Sampling verification: chi-square against the target distribution

N = 20_000
# Chi-square critical values at p = 0.001 for the degrees of freedom used here.
CRITICAL_0001 = {5: 20.515, 35: 66.619}

P0 = torch.tensor([0.30, 0.25, 0.20, 0.12, 0.08, 0.05], dtype=torch.float64)
Q0 = torch.tensor([0.05, 0.10, 0.15, 0.20, 0.25, 0.25], dtype=torch.float64)
# The main model's and the draft's second-token distributions, given the first token (rows).
P1 = torch.tensor(
    [
        [0.40, 0.20, 0.15, 0.10, 0.10, 0.05],
        [0.05, 0.50, 0.15, 0.10, 0.10, 0.10],
        [0.10, 0.10, 0.10, 0.30, 0.20, 0.20],
        [0.20, 0.20, 0.20, 0.20, 0.10, 0.10],
        [0.05, 0.05, 0.05, 0.05, 0.40, 0.40],
        [0.30, 0.05, 0.30, 0.05, 0.25, 0.05],
    ],
    dtype=torch.float64,
)
Q1 = torch.roll(P1, shifts=2, dims=1) * 0.5 + 0.5 / 6
P2 = torch.full((6,), 1 / 6, dtype=torch.float64)  # the bonus position (not counted)
# A round's main-model distributions and draft distributions, given its first proposal.
TARGETS = [torch.stack([P0, P1[x], P2]) for x in range(6)]
DRAFTS = [torch.stack([Q0, Q1[x]]) for x in range(6)]


def chi_square(counts: Counter, probs: torch.Tensor, n: int) -> float:
    expected = probs.reshape(-1) * n
    assert float(expected.min()) >= 5, "too few samples per cell for the chi-square test"
    return sum((counts.get(i, 0) - e) ** 2 / e for i, e in enumerate(expected.tolist()))


# A round: (Python RNG for the draft and plain steps, torch generator of the request) -> tokens.
Round = Callable[[random.Random, torch.Generator], List[int]]


def pick(rng: random.Random, probs: torch.Tensor) -> int:
    """A draw from `probs` with Python's generator (fast; independent of the request's)."""
    return rng.choices(range(probs.shape[0]), weights=probs.tolist())[0]


def draft_round(rng: random.Random, gen: torch.Generator) -> List[int]:
    """One speculative round with two draft proposals x0 ~ Q0, x1 ~ Q1[x0]."""
    x0 = pick(rng, Q0)
    return verify_sampled([x0, pick(rng, Q1[x0])], TARGETS[x0], DRAFTS[x0], gen)


def lookup_round(proposed: Sequence[int]) -> Round:
    """One speculative round on fixed (point-mass) proposals."""

    def rule(rng: random.Random, gen: torch.Generator) -> List[int]:
        return verify_sampled(proposed, TARGETS[proposed[0]][: len(proposed) + 1], None, gen)

    return rule


def first_tokens(rule: Round, n: int = N) -> Counter:
    rng, gen = random.Random(7), torch.Generator().manual_seed(1234)
    return Counter(rule(rng, gen)[0] for _ in range(n))


def two_tokens(rule: Round, n: int = N) -> Counter:
    """The first two tokens of a generation (cell 6 * first + second): one speculative round,
    and when it emitted a single token, the second drawn from the main model (a plain step)."""
    rng, gen = random.Random(8), torch.Generator().manual_seed(99)
    counts: Counter = Counter()
    for _ in range(n):
        out = rule(rng, gen)
        if len(out) == 1:
            out.append(pick(rng, P1[out[0]]))
        counts[6 * out[0] + out[1]] += 1
    return counts


def first_of(joint: Counter) -> Counter:
    return Counter({a: sum(joint.get(6 * a + b, 0) for b in range(6)) for a in range(6)})


JOINT = (P0[:, None] * P1).reshape(-1)  # P(first = a, second = b) = P0(a) P1(b | a)


@pytest.mark.parametrize("name, rule", [("draft", draft_round), ("lookup", lookup_round([1, 4]))])
def test_the_first_two_tokens_follow_the_main_model(name, rule):
    joint = two_tokens(rule)
    assert chi_square(first_of(joint), P0, N) < CRITICAL_0001[5]
    assert chi_square(joint, JOINT, N) < CRITICAL_0001[35]


@pytest.mark.parametrize("proposal", [0, 5])  # the main model's most and least likely token
def test_one_lookup_proposal_leaves_the_token_distributed_as_the_main_model(proposal):
    assert chi_square(first_tokens(lookup_round([proposal])), P0, N) < CRITICAL_0001[5]


def test_the_chi_square_test_rejects_wrong_rules():
    def always_accept(rng: random.Random, gen: torch.Generator) -> List[int]:
        x0 = pick(rng, Q0)
        return [x0, pick(rng, Q1[x0])]

    def resample_from_p(rng: random.Random, gen: torch.Generator) -> List[int]:  # ignores the residual
        x0 = pick(rng, Q0)
        return [x0] if rng.random() < min(1.0, float(P0[x0] / Q0[x0])) else [pick(rng, P0)]

    def lookup_without_residual(rng: random.Random, gen: torch.Generator) -> List[int]:
        # May emit the rejected proposal again.
        return [2] if rng.random() < float(P0[2]) else [pick(rng, P0)]

    def second_always_accepted(rng: random.Random, gen: torch.Generator) -> List[int]:
        out = draft_round(rng, gen)  # the right first token, a wrong second one
        return [out[0], pick(rng, Q1[out[0]])] if len(out) >= 2 else out

    for wrong in (always_accept, resample_from_p, lookup_without_residual):
        assert chi_square(first_tokens(wrong), P0, N) > CRITICAL_0001[5], wrong.__name__
    joint = two_tokens(second_always_accepted)
    assert chi_square(first_of(joint), P0, N) < CRITICAL_0001[5]  # the first token is still right
    assert chi_square(joint, JOINT, N) > CRITICAL_0001[35]


def test_impossible_and_certain_proposals():
    gen = torch.Generator().manual_seed(0)
    impossible = torch.tensor([[0.0, 0.5, 0.5], [1.0, 0.0, 0.0]])
    outs = {tuple(verify_sampled([0], impossible, None, gen)) for _ in range(200)}
    assert outs == {(1,), (2,)}  # always rejected, and never re-emitted
    certain = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert all(verify_sampled([1], certain, None, gen) == [1, 2] for _ in range(50))
    # A draft giving its own proposal probability 0 does not divide by zero: accepted as p > 0.
    draft = torch.tensor([[1.0, 0.0, 0.0]])
    assert all(verify_sampled([1], certain, draft, gen) == [1, 2] for _ in range(50))
    # No proposals: the bonus token alone, drawn from the one target row.
    assert verify_sampled([], torch.tensor([[0.0, 0.0, 1.0]]), None, gen) == [2]


def test_residual_distribution():
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.6, 0.2])
    assert torch.allclose(residual_distribution(p, q, 1), torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    expected = torch.tensor([0.5, 0.0, 0.2], dtype=torch.float64) / 0.7
    assert torch.allclose(residual_distribution(p, None, 1), expected)
    # p <= q everywhere (only through rounding): the residual has no mass, fall back to p.
    assert torch.allclose(residual_distribution(p, p.clone(), 0), p.double())
    point = torch.tensor([0.0, 1.0, 0.0])
    assert torch.allclose(residual_distribution(point, None, 1), point.double())


def test_seeded_verification_is_reproducible_and_uses_the_generator():
    targets = torch.stack([P0, P1[3], P2])

    def run(seed: int) -> List[List[int]]:
        gen = torch.Generator().manual_seed(seed)
        return [verify_sampled([3, 1], targets, torch.stack([Q0, Q1[3]]), gen) for _ in range(30)]

    assert run(5) == run(5)
    assert run(5) != run(6)


def test_verification_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"target_probs must be \[3, vocab\] for 2 proposals"):
        verify_sampled([1, 2], torch.stack([P0, P0]))
    with pytest.raises(ValueError, match=r"draft_probs must be \[2, 6\]"):
        verify_sampled([1, 2], torch.stack([P0, P0, P0]), torch.stack([Q0]))
    with pytest.raises(ValueError, match=r"proposed token ids must be in \[0, 5\]"):
        verify_sampled([6], torch.stack([P0, P0]))


# ---------------------------------------------------------------------------------------------
# Adaptive length


def test_length_grows_after_full_acceptance_up_to_the_maximum():
    lengths = AdaptiveLength(5, start=1)
    for expected in (2, 3, 4, 5, 5):
        n = lengths.next_length()
        lengths.record(n, n)
        assert lengths.length == expected


def test_length_shrinks_after_rejections_down_to_zero_then_probes():
    lengths = AdaptiveLength(8, probe_every=4)
    assert lengths.next_length() == 8
    lengths.record(8, 3)  # partly accepted: one more than the accepted run
    assert lengths.length == 4
    for expected in (2, 1, 0):  # nothing accepted: halve
        lengths.record(lengths.next_length(), 0)
        assert lengths.length == expected
    assert [lengths.next_length() for _ in range(3)] == [0, 0, 0]
    assert lengths.next_length() == 1  # the probe
    assert lengths.next_length() == 1  # still armed: nothing could be proposed yet
    lengths.record(0, 0)
    assert lengths.next_length() == 1
    lengths.record(1, 0)  # a failed probe: wait again
    assert [lengths.next_length() for _ in range(4)] == [0, 0, 0, 1]
    lengths.record(1, 1)  # the request started copying: recover
    assert lengths.length == 2
    lengths.record(2, 2)
    assert lengths.next_length() == 3


def test_a_row_that_copies_nothing_proposes_almost_nothing():
    lengths = AdaptiveLength(8, probe_every=8)
    proposed = 0
    for _ in range(400):
        n = lengths.next_length()
        proposed += n
        lengths.record(n, 0)
    assert proposed == 8 + 4 + 2 + 1 + (400 - 4) // 8


def test_steps_without_proposals_change_nothing_and_zero_maximum_never_proposes():
    lengths = AdaptiveLength(6, start=3)
    lengths.record(0, 0)
    assert lengths.length == 3
    never = AdaptiveLength(0)
    assert [never.next_length() for _ in range(20)] == [0] * 20


def test_adaptive_length_rejects_bad_arguments():
    with pytest.raises(ValueError, match="max_length must be an integer >= 0"):
        AdaptiveLength(-1)
    with pytest.raises(ValueError, match=r"start must be an integer in \[0, 4\]"):
        AdaptiveLength(4, start=5)
    with pytest.raises(ValueError, match="probe_every must be an integer >= 1"):
        AdaptiveLength(4, probe_every=0)
    with pytest.raises(ValueError, match="need 0 <= accepted <= proposed"):
        AdaptiveLength(4).record(2, 3)
