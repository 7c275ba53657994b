"""Per-row sampling: validation, filters against hand-computed distributions, penalties against
their formulas, seeded rows independent of their batch, and the reference sampler's draws."""

from collections import Counter

import pytest
import torch

from llama import limits
from llama.generation import sample_top_p as reference_name
from llama.sampling import RowSampler, SamplingParams, sample_rows, sample_top_p, token_logprobs

VOCAB = 32


def sampler(prompt=(), vocab=VOCAB, **params) -> RowSampler:
    return RowSampler(SamplingParams(**params), list(prompt), vocab, torch.device("cpu"))


@pytest.mark.parametrize(
    "params, message",
    [
        (dict(temperature=-0.1), r"temperature must be a number in \[0, 100\]"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature=float("inf")), "temperature"),
        (dict(temperature=1e308), r"temperature must be a number in \[0, 100\]"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.01), r"top_p must be in \(0, 1\]"),
        (dict(top_p=float("nan")), "top_p"),
        (dict(top_k=-1), r"top_k must be an integer in \[0, 2147483647\]"),
        (dict(top_k=2.5), "top_k must be an integer in"),
        (dict(top_k=2**63), "top_k must be an integer in"),
        (dict(min_p=-0.01), r"min_p must be in \[0, 1\]"),
        (dict(min_p=1.5), r"min_p must be in \[0, 1\]"),
        (dict(repetition_penalty=0.0), r"repetition_penalty must be in \[0.01, 100\]"),
        (dict(repetition_penalty=1e-39), r"repetition_penalty must be in \[0.01, 100\]"),
        (dict(repetition_penalty=1e39), r"repetition_penalty must be in \[0.01, 100\]"),
        (dict(presence_penalty=2.5), r"presence_penalty must be in \[-2, 2\]"),
        (dict(frequency_penalty=-2.01), r"frequency_penalty must be in \[-2, 2\]"),
        (dict(logit_bias={VOCAB: 1.0}), r"token id 32 is outside the vocabulary.*\[0, 31\]"),
        (dict(logit_bias={-1: 1.0}), "outside the vocabulary"),
        (dict(logit_bias={3: 100.5}), r"logit_bias\[3\] must be in \[-100, 100\]"),
        (dict(logit_bias={3: 1e39}), r"logit_bias\[3\] must be in \[-100, 100\]"),
        (dict(logit_bias={3: float("-inf")}), r"logit_bias\[3\] must be in \[-100, 100\]"),
        (dict(logit_bias={i: 1.0 for i in range(1025)}), "logit_bias holds at most 1024 entries"),
        (dict(logit_bias=[(3, 1.0)]), "logit_bias must map token ids"),
        (dict(seed="7"), "seed must be None or an integer"),
        (dict(seed=1.5), "seed must be None or an integer"),
        (dict(seed=-1), "seed must be None or an integer"),
        (dict(seed=2**64), "seed must be None or an integer"),
    ],
)
def test_each_invalid_parameter_names_itself_and_its_range(params, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**params).validate(VOCAB)
    with pytest.raises(ValueError, match=message):
        sampler(**params)


def test_valid_parameters_pass():
    SamplingParams().validate(VOCAB)
    SamplingParams(
        temperature=1.5, top_p=1.0, top_k=5, min_p=1.0, repetition_penalty=0.5, presence_penalty=-2,
        frequency_penalty=2, logit_bias={0: -100, 31: 100}, seed=2**64 - 1,
    ).validate(VOCAB)  # fmt: skip
    assert SamplingParams().is_greedy and not SamplingParams(temperature=0.1).is_greedy


def test_greedy_ignores_the_seed_and_top_k_1_is_greedy():
    logits = torch.randn(6, VOCAB, generator=torch.Generator().manual_seed(0))
    argmax = logits.argmax(-1)
    for seed in (None, 1, 2):
        assert torch.equal(sample_rows(logits, [sampler(seed=seed) for _ in range(6)]), argmax)
    top1 = [sampler(temperature=1.3, top_k=1, seed=row if row % 2 else None) for row in range(6)]
    assert torch.equal(sample_rows(logits, top1), argmax)


def test_edge_values_inside_the_bounds_sample_finite_tokens():
    """Values a client may send that used to overflow a step: a denormal temperature is greedy,
    a tiny nucleus keeps the top token, a top_k beyond the vocabulary keeps every token, and the
    extreme penalties and biases still give a valid distribution."""
    assert reference_name is sample_top_p  # the reference's import path still works
    logits = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(1)) * 30
    argmax = logits.argmax(-1)
    for temperature in (1e-39, 5e-324, limits.GREEDY_TEMPERATURE / 2):
        assert SamplingParams(temperature=temperature).is_greedy
        rows = [sampler(temperature=temperature, seed=row if row % 2 else None) for row in range(4)]
        assert torch.equal(sample_rows(logits, rows), argmax)
    rows = [sampler(temperature=0.7, top_p=5e-324, seed=row if row % 2 else None) for row in range(4)]
    assert torch.equal(sample_rows(logits, rows), argmax)
    rows = [sampler(temperature=limits.GREEDY_TEMPERATURE, top_p=1e-30) for row in range(4)]
    assert torch.equal(sample_rows(logits, rows), argmax)
    extreme = [
        sampler(temperature=limits.MAX_TEMPERATURE, top_k=limits.MAX_TOP_K, seed=1),
        sampler(temperature=limits.GREEDY_TEMPERATURE, repetition_penalty=limits.MIN_REPETITION_PENALTY,
                prompt=[1, 2, 3], seed=2),
        sampler(temperature=1.0, repetition_penalty=limits.MAX_REPETITION_PENALTY, prompt=[4], seed=3),
        sampler(temperature=0.5, logit_bias={i: -limits.MAX_LOGIT_BIAS for i in range(VOCAB)}, seed=4),
    ]  # fmt: skip
    tokens = sample_rows(logits, extreme)
    assert ((tokens >= 0) & (tokens < VOCAB)).all()


# p = [0.5, 0.25, 0.15, 0.07, 0.03]
TINY_PROBS = torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03])


@pytest.mark.parametrize(
    "params, kept",
    [
        (dict(top_k=2), [0, 1]),
        # mass before each token: 0, .5, .75, .9, .97 -> top_p .8 keeps the first three
        (dict(top_p=0.8), [0, 1, 2]),
        # min_p scales the most likely probability: thresholds .1 and .2
        (dict(min_p=0.2), [0, 1, 2]),
        (dict(min_p=0.4), [0, 1]),
        # top_k first, then top_p within the renormalised top k: .556, .278, .167 -> the mass
        # before token 2 is .833 > .8 (without the renormalisation it would be .75 and kept)
        (dict(top_k=3, top_p=0.8), [0, 1]),
        (dict(), [0, 1, 2, 3, 4]),
    ],
)
def test_filters_sample_the_hand_computed_distribution(params, kept):
    expected = torch.zeros(5)
    expected[kept] = TINY_PROBS[kept] / TINY_PROBS[kept].sum()
    logits = TINY_PROBS.log()
    draws = 3000
    # Unseeded rows: one batch, the global generator.
    torch.manual_seed(0)
    batch = sample_rows(
        logits.expand(draws, 5).contiguous(), [sampler(vocab=5, temperature=1.0, **params)] * draws
    )
    # A seeded row: its own generator, one draw at a time.
    seeded = sampler(vocab=5, temperature=1.0, seed=3, **params)
    alone = [int(sample_rows(logits[None], [seeded])[0]) for _ in range(300)]
    assert set(alone) <= set(kept)
    counts = Counter(batch.tolist())
    assert sorted(counts) == kept
    for token in kept:
        assert abs(counts[token] / draws - float(expected[token])) < 0.035, (token, counts)


def test_penalties_follow_their_formulas():
    logits = torch.tensor([2.0, -1.0, 0.5, -0.5, 3.0, 0.0])
    row = sampler(
        prompt=[0, 1],
        vocab=6,
        repetition_penalty=1.5,
        presence_penalty=0.5,
        frequency_penalty=0.25,
        logit_bias={4: -1.5, 5: 2.0},
    )
    for token in (2, 2, 3):
        row.observe(token)
    # bias: token 4 -> 1.5, token 5 -> 2.0; repetition over the prompt and output {0, 1, 2, 3}:
    # positive / 1.5, negative * 1.5; then per generated token count c: - 0.25 c - 0.5 [c > 0].
    expected = torch.tensor(
        [2.0 / 1.5, -1.0 * 1.5, 0.5 / 1.5 - 2 * 0.25 - 0.5, -0.5 * 1.5 - 1 * 0.25 - 0.5, 1.5, 2.0]
    )
    torch.testing.assert_close(row.apply_penalties(logits), expected, rtol=0, atol=1e-6)
    # Through sample_rows: the penalties move the argmax from token 4 to token 5, and the
    # caller's logits are left as they were.
    batch = torch.stack([logits, logits])
    before = batch.clone()
    assert sample_rows(batch, [row, sampler(vocab=6)]).tolist() == [5, 4]
    assert torch.equal(batch, before)


def test_negative_additive_penalties_favour_repeats():
    row = sampler(vocab=3, presence_penalty=-1.0, frequency_penalty=-0.5)
    row.observe(2)
    row.observe(2)
    assert row.apply_penalties(torch.zeros(3)).tolist() == [0.0, 0.0, 2.0]


def test_logit_bias_minus_100_bans_a_token():
    logits = torch.tensor([0.0, 1.0, 0.5, 12.0])
    rows = [sampler(vocab=4, temperature=1.0, logit_bias={3: -100}) for _ in range(2000)]
    torch.manual_seed(0)
    drawn = sample_rows(logits.expand(2000, 4).contiguous(), rows)
    assert 3 not in drawn.tolist() and set(drawn.tolist()) == {0, 1, 2}
    assert sample_rows(logits[None], [sampler(vocab=4, logit_bias={3: -100})]).tolist() == [1]


def step_logits(steps: int, rows: int, seed: int) -> torch.Tensor:
    return 2 * torch.randn(steps, rows, VOCAB, generator=torch.Generator().manual_seed(seed))


def test_same_seed_gives_the_same_tokens_alone_and_in_any_batch():
    params = dict(temperature=0.9, top_k=20, top_p=0.95, min_p=0.02, presence_penalty=0.4,
                  repetition_penalty=1.2, logit_bias={5: 3.0}, seed=1234)  # fmt: skip
    steps = 25
    mine = step_logits(steps, 1, seed=0)[:, 0]
    others = step_logits(steps, 3, seed=1)

    alone_row = sampler(prompt=[1, 2, 3], **params)
    alone = []
    for step in range(steps):
        token = int(sample_rows(mine[step][None], [alone_row])[0])
        alone_row.observe(token)
        alone.append(token)

    batched_row = sampler(prompt=[1, 2, 3], **params)
    neighbours = [
        sampler(),  # greedy
        sampler(temperature=1.0, top_p=0.9),  # global generator
        sampler(temperature=0.7, top_k=3, frequency_penalty=1.0, seed=99),  # another seeded row
    ]
    torch.manual_seed(5)
    batched = []
    for step in range(steps):
        position = step % 4  # the row moves around the batch
        logits = others[step].clone()
        logits = torch.cat([logits[:position], mine[step][None], logits[position:]])
        rows = neighbours[:position] + [batched_row] + neighbours[position:]
        tokens = sample_rows(logits, rows)
        for row, token in zip(rows, tokens.tolist()):
            row.observe(token)
        batched.append(int(tokens[position]))
        torch.rand(step + 1)  # other users of the global generator do not matter either
    assert batched == alone
    assert len(set(alone)) > 5  # it really sampled


def test_temperature_top_p_rows_equal_the_reference_sampler():
    logits = step_logits(6, 4, seed=2)
    rows = [sampler(temperature=0.7, top_p=0.9) for _ in range(4)]
    torch.manual_seed(42)
    reference = [sample_top_p(torch.softmax(step / 0.7, dim=-1), 0.9) for step in logits]
    torch.manual_seed(42)
    ours = [sample_rows(step, rows) for step in logits]
    for expected, got in zip(reference, ours):
        assert torch.equal(expected, got)
    # The reference's greedy decoding is the argmax.
    assert torch.equal(sample_rows(logits[0], [sampler() for _ in range(4)]), logits[0].argmax(-1))


def test_mixed_unseeded_rows_share_one_draw_with_their_own_filters():
    logits = TINY_PROBS.log().expand(2000, 5).contiguous()
    rows = [sampler(vocab=5, temperature=1.0, top_k=1 + row % 2) for row in range(2000)]
    torch.manual_seed(1)
    drawn = sample_rows(logits, rows).tolist()
    assert set(drawn[0::2]) == {0} and set(drawn[1::2]) == {0, 1}


def test_token_logprobs_match_an_fp64_log_softmax():
    logits = step_logits(1, 3, seed=3)[0]
    tokens = torch.tensor([4, 0, 31])
    exact = torch.log_softmax(logits.double(), dim=-1)
    chosen, top = token_logprobs(logits, tokens, top=3)
    torch.testing.assert_close(chosen.double(), exact.gather(-1, tokens[:, None])[:, 0], rtol=0, atol=1e-5)
    ids, values = top
    assert torch.equal(ids, exact.argsort(dim=-1, descending=True)[:, :3])
    torch.testing.assert_close(values.double(), exact.gather(-1, ids), rtol=0, atol=1e-5)
    assert token_logprobs(logits, tokens, top=0)[1] is None
    with pytest.raises(ValueError, match="top must be an integer in"):
        token_logprobs(logits, tokens, top=-1)


def test_bad_shapes_and_prompts_are_errors():
    with pytest.raises(ValueError, match="one row per sampler"):
        sample_rows(torch.zeros(2, VOCAB), [sampler()])
    with pytest.raises(ValueError, match="prompt token ids"):
        sampler(prompt=[VOCAB], repetition_penalty=1.1)


def test_seeded_rows_repeat_and_differ_by_seed():
    logits = torch.zeros(1, VOCAB)

    def draws(seed):
        row = sampler(temperature=1.0, seed=seed)
        return [int(sample_rows(logits, [row])[0]) for _ in range(20)]

    assert draws(7) == draws(7) != draws(8)
