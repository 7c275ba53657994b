"""Speculative decoding in the engine (prompt lookup): greedy tokens identical to decoding one
token at a time, alone and batched, in fp32 and in bf16 with the kernels; stop strings, max_tokens,
log-probabilities and cancellation as without speculation; sampled tokens keep the model's
distribution.

Random tiny models fall into loops under greedy decoding, which prompt lookup copies: the tests
also check that proposals were really accepted, so they cannot pass with speculation idle.
"""

import pytest
import torch

from llama import Llama, kernels
from llama.sampling import SamplingParams
from llama.speculation import Speculation
from tests.test_engine import CODE, alone, prompts
from tests.test_generation import chain_next, write_chain_checkpoint
from tests.tiny import make_checkpoint

LOOKUP = Speculation("lookup", num_tokens=4)


def run(engine, ps, max_tokens, speculation=None, **kwargs):
    reuse, engine.prefix_reuse = engine.prefix_reuse, False
    try:
        requests = [
            engine.submit(p, max_tokens=max_tokens, default_stop=None, speculation=speculation, **kwargs)
            for p in ps
        ]
        return [r.result() for r in requests]
    finally:
        engine.prefix_reuse = reuse
        engine.forget_prefixes()


def accepted(engine) -> int:
    return engine.stats()["speculative_accepted"]


def test_greedy_lookup_gives_the_tokens_of_plain_decoding_alone_and_batched(engine, sp):
    ps = prompts(sp)
    before = accepted(engine)
    for prompt in ps[:3]:  # batch 1
        plain = alone(engine, prompt, 40)
        assert run(engine, [prompt], 40, LOOKUP)[0].token_ids == plain
    batched = [c.token_ids for c in run(engine, ps[:4], 40, LOOKUP)]  # 4 rows, proposals shared out
    assert batched == [alone(engine, p, 40) for p in ps[:4]]
    assert accepted(engine) > before  # proposals were made and kept


def test_speculating_and_plain_requests_share_a_step_without_changing_each_other(engine, sp):
    ps = prompts(sp)
    expected = [alone(engine, p, 30) for p in ps[:4]]
    requests = [
        engine.submit(p, max_tokens=30, default_stop=None, speculation=LOOKUP if i % 2 else None)
        for i, p in enumerate(ps[:4])
    ]
    assert [r.result().token_ids for r in requests] == expected
    engine.forget_prefixes()


@pytest.mark.parametrize("use_kernels", [True, False])
def test_bf16_greedy_lookup_and_draft_are_exact(tmp_path, tokenizer_path, sp, use_kernels):
    if use_kernels and not kernels.enabled():
        pytest.skip("no kernel variant runs on this CPU")
    ckpt = make_checkpoint(tmp_path / "ckpt", sp.vocab_size(), seed=3, dim=128, n_heads=2, n_kv_heads=1)
    previous = kernels.enabled()
    kernels.set_enabled(use_kernels)
    try:
        other = make_checkpoint(tmp_path / "draft", sp.vocab_size(), seed=5, dim=64, n_layers=1)
        llama = Llama.build(
            str(ckpt), str(tokenizer_path), 160, 4, dtype="bfloat16", draft_ckpt_dir=str(other)
        )
        engine = llama.engine
        ps = prompts(sp, CODE[:4])
        plain = [c.token_ids for c in run(engine, ps, 48)]
        assert [c.token_ids for c in run(engine, ps, 48, LOOKUP)] == plain
        assert [run(engine, [p], 48, LOOKUP)[0].token_ids for p in ps[:2]] == plain[:2]
        assert accepted(engine) > 0
        drafted = Speculation("draft", num_tokens=3)
        assert [c.token_ids for c in run(engine, ps, 48, drafted)] == plain
        assert run(engine, ps[:1], 48, drafted)[0].token_ids == plain[0]
    finally:
        kernels.set_enabled(previous)


def test_stop_strings_max_tokens_and_logprobs_as_without_speculation(engine, llama, sp):
    prompt = prompts(sp)[0]
    plain = run(engine, [prompt], 40, logprobs=2)[0]
    fast = run(engine, [prompt], 40, LOOKUP, logprobs=2)[0]
    assert fast.token_ids == plain.token_ids and fast.text == plain.text
    assert fast.logprobs == pytest.approx(plain.logprobs, abs=1e-4)
    if kernels.enabled():  # fp32 rows on the matrix-vector kernel: the same bits in any 1-8 rows
        assert fast.logprobs == plain.logprobs
    assert [list(t) for t in fast.top_logprobs] == [list(t) for t in plain.top_logprobs]
    # A stop string inside the generated loop: the text ends before it, as without speculation.
    text = plain.text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    stopped_plain = run(engine, [prompt], 40, stop=[stop])[0]
    stopped_fast = run(engine, [prompt], 40, LOOKUP, stop=[stop])[0]
    assert stopped_fast.text == stopped_plain.text and stopped_fast.finish_reason == "stop"
    assert stopped_fast.token_ids == stopped_plain.token_ids
    for max_tokens in (1, 2, 7, 13):
        result = run(engine, [prompt], max_tokens, LOOKUP)[0]
        assert result.token_ids == plain.token_ids[:max_tokens] and result.finish_reason == "length"
        assert result.usage.completion_tokens == max_tokens


def test_events_stream_one_token_each_and_cancel_mid_run(engine, sp):
    prompt = prompts(sp)[1]
    expected = alone(engine, prompt, 40)
    request = engine.submit(prompt, max_tokens=40, default_stop=None, speculation=LOOKUP)
    got = []
    for event in request:
        assert len(event.token_ids) <= 1
        got += event.token_ids
        if len(got) >= 12:
            request.cancel()
    assert got == expected[: len(got)] and request.result().finish_reason == "cancelled"
    assert engine.stats()["free_slots"] == engine.stats()["max_batch_size"]
    engine.forget_prefixes()


def test_speculation_options_are_checked(engine, sp):
    prompt = prompts(sp)[0]
    for bad, match in [
        (Speculation("beam"), "lookup"),
        (Speculation(num_tokens=0), "num_tokens"),
        (Speculation(num_tokens=8), "num_tokens"),
        (Speculation(max_ngram=2, min_ngram=3), "min_ngram"),
    ]:
        with pytest.raises(ValueError, match=match):
            engine.submit(prompt, max_tokens=4, speculation=bad)


@pytest.fixture(scope="module")
def chain_engine(tmp_path_factory, tokenizer_path, sp):
    ckpt = write_chain_checkpoint(tmp_path_factory.mktemp("chain"), sp.vocab_size())
    return Llama.build(str(ckpt), str(tokenizer_path), 64, 4, dtype="float32").engine


def chain_patterns(engine, prompt, n, seed_base, speculation):
    """How often each pattern of (token i followed the chain) occurs over n seeded samples."""
    sampling = [SamplingParams(temperature=5.0, seed=seed_base + i) for i in range(n)]
    requests = [
        engine.submit(prompt, max_tokens=4, sampling=s, default_stop=None, speculation=speculation)
        for s in sampling
    ]
    counts = torch.zeros(16, dtype=torch.float64)
    for request in requests:
        previous, pattern = prompt[-1], 0
        for i, token in enumerate(request.result().token_ids):
            pattern |= int(token == chain_next(previous)) << i
            previous = token
        counts[pattern] += 1
    return counts


def chi_square_same(plain: torch.Tensor, spec: torch.Tensor) -> None:
    """Assert two count vectors come from one distribution (chi-square at p = 0.001, rare
    categories pooled)."""
    observed = torch.stack([plain, spec])
    expected = observed.sum(0, keepdim=True) * observed.sum(1, keepdim=True) / observed.sum()
    keep = expected.min(0).values >= 5
    pooled = torch.cat([observed[:, keep], observed[:, ~keep].sum(1, keepdim=True)], dim=1)
    expected = pooled.sum(0, keepdim=True) * pooled.sum(1, keepdim=True) / pooled.sum()
    nonzero = expected.min(0).values > 0
    statistic = float(((pooled[:, nonzero] - expected[:, nonzero]) ** 2 / expected[:, nonzero]).sum())
    dof = int(nonzero.sum()) - 1
    critical = {2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32, 8: 26.12, 9: 27.88,
                10: 29.59, 11: 31.26, 12: 32.91, 13: 34.53, 14: 36.12, 15: 37.70, 16: 39.25}  # fmt: skip
    assert dof >= 3 and statistic < critical[dof], (statistic, dof, observed)


def chain_prompt():
    chain = [500]
    while len(chain) < 12:
        chain.append(chain_next(chain[-1]))
    return [1] + chain + [500]


def test_sampled_lookup_keeps_the_distribution_of_the_model(chain_engine):
    """Sampling at a temperature where the chain model follows its chain about 3 times in 4: the
    prompt holds the chain, so lookup proposes it and the verification rule accepts or rejects.
    How often each of the four tokens follows the chain must be distributed as without
    speculation (chi-square at p = 0.001 over the 16 patterns), and the rule must have both
    accepted and rejected proposals."""
    prompt = chain_prompt()
    n = 400
    before = chain_engine.stats()
    spec = chain_patterns(chain_engine, prompt, n, 0, Speculation("lookup", num_tokens=3))
    after = chain_engine.stats()
    chi_square_same(chain_patterns(chain_engine, prompt, n, 10**6, None), spec)
    proposed = after["speculative_proposed"] - before["speculative_proposed"]
    kept = after["speculative_accepted"] - before["speculative_accepted"]
    assert proposed > n and 0.2 * proposed < kept < 0.95 * proposed, (proposed, kept)


@pytest.fixture(scope="module")
def self_drafted(checkpoint_dir, tokenizer_path):
    """The tiny checkpoint with itself as its draft."""
    return Llama.build(
        str(checkpoint_dir), str(tokenizer_path), 128, 4, dtype="float32", draft_ckpt_dir=str(checkpoint_dir)
    )


def test_a_model_drafting_for_itself_is_always_accepted(self_drafted, sp):
    engine = self_drafted.engine
    ps = prompts(sp)[:4]
    plain = [c.token_ids for c in run(engine, ps, 30)]
    before = engine.stats()
    draft = Speculation("draft", num_tokens=3)
    assert [c.token_ids for c in run(engine, ps, 30, draft)] == plain  # batched
    assert run(engine, ps[:1], 30, draft)[0].token_ids == plain[0]  # alone
    after = engine.stats()
    proposed = after["speculative_proposed"] - before["speculative_proposed"]
    assert proposed > 30 and after["speculative_accepted"] - before["speculative_accepted"] == proposed
    # The library methods take it too.
    text = self_drafted.text_completion(["def fib(n):"], temperature=0, max_gen_len=20)
    same = self_drafted.text_completion(["def fib(n):"], temperature=0, max_gen_len=20, speculation=draft)
    assert same == text


def test_a_different_draft_model_changes_no_token(tmp_path, checkpoint_dir, tokenizer_path, sp):
    other = make_checkpoint(tmp_path / "draft", sp.vocab_size(), seed=9, dim=32, n_layers=1)
    llama = Llama.build(
        str(checkpoint_dir), str(tokenizer_path), 128, 4, dtype="float32", draft_ckpt_dir=str(other)
    )
    engine = llama.engine
    ps = prompts(sp)[:4]
    plain = [c.token_ids for c in run(engine, ps, 30)]
    assert [c.token_ids for c in run(engine, ps, 30, Speculation("draft", num_tokens=4))] == plain
    assert engine.stats()["speculative_proposed"] > 0
    # With prefix reuse the draft's cache rows are brought up to the main model's before drafting.
    engine.prefix_reuse = True
    first = engine.submit(ps[0] + plain[0][:5], max_tokens=10, default_stop=None).result().token_ids
    again = engine.submit(
        ps[0] + plain[0][:5], max_tokens=10, default_stop=None, speculation=Speculation("draft", num_tokens=2)
    ).result()
    assert again.token_ids == first and again.usage.cached_tokens > 0
    engine.forget_prefixes()


def test_draft_speculation_needs_a_draft_model(engine, sp):
    with pytest.raises(ValueError, match="draft_ckpt_dir"):
        engine.submit(prompts(sp)[0], max_tokens=4, speculation=Speculation("draft"))


def test_sampled_drafts_keep_the_distribution_of_the_model(tmp_path, tokenizer_path, sp):
    """The chain model with a random draft of the same vocabulary: the draft's proposals are
    sampled from its own (different) distribution and mostly rejected, and the output still has
    the main model's distribution."""
    main = write_chain_checkpoint(tmp_path / "chain", sp.vocab_size())
    draft = make_checkpoint(tmp_path / "draft", sp.vocab_size(), seed=4)
    engine = Llama.build(
        str(main), str(tokenizer_path), 64, 4, dtype="float32", draft_ckpt_dir=str(draft)
    ).engine
    n = 400
    spec = chain_patterns(engine, chain_prompt(), n, 0, Speculation("draft", num_tokens=2))
    proposed = engine.stats()["speculative_proposed"]
    chi_square_same(chain_patterns(engine, chain_prompt(), n, 10**6, None), spec)
    assert proposed > n / 2
