"""The Transformer against an independent fp32 re-computation of the Llama 2 equations.

The reference below is written from the Llama 2 equations (pre-norm RMSNorm, complex-number
rotary embeddings with rope_theta, grouped-query attention by repeating K/V heads, causal
softmax, SwiGLU) with plain tensor operations: no fairscale, no KV cache, no shared code with
llama/model.py.
"""

import math

import pytest
import torch

from llama import distributed
from llama import model as model_module
from llama.model import Attention, ModelArgs, Transformer, apply_rotary, rotary_angles
from tests.tiny import random_state_dict

VOCAB = 97
TOL = 1e-4


def gqa_args(**overrides) -> ModelArgs:
    params = dict(
        dim=64,
        n_layers=2,
        n_heads=8,
        n_kv_heads=2,
        vocab_size=VOCAB,
        multiple_of=32,
        norm_eps=1e-5,
        rope_theta=1e6,
        max_batch_size=4,
        max_seq_len=64,
    )
    params.update(overrides)
    return ModelArgs(**params)


# ---------------------------------------------------------------------------------------------
# Independent reference
# ---------------------------------------------------------------------------------------------


def ref_rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + eps) * weight


def ref_rotate(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Complex-number rotary embedding of x [L, H, D]: pair (2i, 2i+1) is one complex number,
    multiplied by exp(1j * position * theta ** (-2i / D)). Angles in float64."""
    head_dim = x.shape[-1]
    freqs = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = positions.to(torch.float64)[:, None] * freqs[None, :]  # [L, D/2]
    rotation = torch.polar(torch.ones_like(angles), angles)[:, None, :]  # [L, 1, D/2]
    as_complex = torch.view_as_complex(x.to(torch.float64).reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(as_complex * rotation).reshape(x.shape).to(x.dtype)


def ref_logits(
    sd: dict, args: ModelArgs, tokens: torch.Tensor, theta: float = None, positions: torch.Tensor = None
) -> torch.Tensor:
    """Logits [L, vocab] of one sequence `tokens` [L], computed from the full fp32 weights."""
    theta = args.rope_theta if theta is None else theta
    seqlen = tokens.shape[0]
    positions = torch.arange(seqlen) if positions is None else positions
    n_heads = args.n_heads
    n_kv = args.n_kv_heads or n_heads
    head_dim = args.dim // n_heads
    causal = torch.ones(seqlen, seqlen, dtype=torch.bool).tril()

    h = sd["tok_embeddings.weight"][tokens]
    for i in range(args.n_layers):
        p = f"layers.{i}."
        x = ref_rmsnorm(h, sd[p + "attention_norm.weight"], args.norm_eps)
        q = (x @ sd[p + "attention.wq.weight"].T).view(seqlen, n_heads, head_dim)
        k = (x @ sd[p + "attention.wk.weight"].T).view(seqlen, n_kv, head_dim)
        v = (x @ sd[p + "attention.wv.weight"].T).view(seqlen, n_kv, head_dim)
        q, k = ref_rotate(q, positions, theta), ref_rotate(k, positions, theta)
        # repeat_kv: query head j reads kv head j // (n_heads / n_kv).
        k = k.repeat_interleave(n_heads // n_kv, dim=1)
        v = v.repeat_interleave(n_heads // n_kv, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(head_dim)
        scores = scores.masked_fill(~causal, float("-inf"))
        attn = torch.softmax(scores, dim=-1)
        out = torch.einsum("hqk,khd->qhd", attn, v).reshape(seqlen, n_heads * head_dim)
        h = h + out @ sd[p + "attention.wo.weight"].T
        x = ref_rmsnorm(h, sd[p + "ffn_norm.weight"], args.norm_eps)
        gate = x @ sd[p + "feed_forward.w1.weight"].T
        up = x @ sd[p + "feed_forward.w3.weight"].T
        h = h + (gate * torch.sigmoid(gate) * up) @ sd[p + "feed_forward.w2.weight"].T
    return ref_rmsnorm(h, sd["norm.weight"], args.norm_eps) @ sd["output.weight"].T


# ---------------------------------------------------------------------------------------------
# Model under test
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def model_parallel():
    distributed.init_model_parallel()


def build_model(args: ModelArgs, sd: dict, dtype: torch.dtype = torch.float32) -> Transformer:
    model = Transformer(args)
    model.load_state_dict({k: v.to(dtype) for k, v in sd.items()})
    model.to(dtype)
    model.allocate_cache(dtype, "cpu")
    return model.eval()


@pytest.fixture(scope="module")
def gqa():
    args = gqa_args()
    sd = random_state_dict(args, seed=3)
    return args, sd, build_model(args, sd)


def random_tokens(n: int, rows: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, n), generator=torch.Generator().manual_seed(seed))


@torch.inference_mode()
def test_logits_match_independent_recomputation(gqa):
    args, sd, model = gqa
    assert args.n_kv_heads < args.n_heads and args.rope_theta == 1e6
    tokens = random_tokens(40, rows=2, seed=1)
    logits = model(tokens, 0)
    assert logits.dtype == torch.float32 and logits.shape == (2, 40, VOCAB)
    for row in range(2):
        expected = ref_logits(sd, args, tokens[row])
        torch.testing.assert_close(logits[row], expected, atol=TOL, rtol=0)


@torch.inference_mode()
def test_reference_is_sensitive_to_rope_theta(gqa):
    """Sanity check of the oracle: with Llama 2's theta the logits differ far beyond the tolerance,
    so the comparison above really pins rope_theta = 1e6."""
    args, sd, model = gqa
    tokens = random_tokens(40, seed=1)[0]
    llama2 = ref_logits(sd, args, tokens, theta=10000.0)
    assert (llama2 - ref_logits(sd, args, tokens)).abs().max() > 100 * TOL


@torch.inference_mode()
def test_one_token_at_a_time_equals_full_forward(gqa):
    args, sd, model = gqa
    tokens = random_tokens(30, rows=2, seed=2)
    full = model(tokens, 0)
    steps = [model(tokens[:, pos : pos + 1], pos) for pos in range(tokens.shape[1])]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=TOL, rtol=0)


@torch.inference_mode()
def test_multi_token_chunks_at_later_positions_equal_full_forward(gqa):
    args, sd, model = gqa
    tokens = random_tokens(45, rows=2, seed=4)
    full = model(tokens, 0)
    chunks, pos = [], 0
    for size in (3, 8, 1, 12, 5, 16):  # every chunk but the first starts at start_pos > 0
        chunks.append(model(tokens[:, pos : pos + size], pos))
        pos += size
    assert pos == tokens.shape[1]
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=TOL, rtol=0)
    # And the chunked logits still equal the independent reference.
    torch.testing.assert_close(torch.cat(chunks, dim=1)[1], ref_logits(sd, args, tokens[1]), atol=TOL, rtol=0)


@torch.inference_mode()
def test_per_row_start_positions_equal_separate_rows(gqa):
    """Rows at different positions decode together (one token per row, list start_pos) and each
    row's logits equal that row's own full forward."""
    args, sd, model = gqa
    lengths = [5, 11, 2]
    sequences = [random_tokens(n + 4, seed=10 + i)[0] for i, n in enumerate(lengths)]
    # Prefill each row's prompt into its own cache row.
    for row, (seq, n) in enumerate(zip(sequences, lengths)):
        model(seq[None, :n], 0, row_offset=row)
    decoded = []
    for step in range(4):
        batch = torch.stack([seq[n + step] for seq, n in zip(sequences, lengths)])[:, None]
        decoded.append(model(batch, [n + step for n in lengths]))
    decoded = torch.cat(decoded, dim=1)  # [3, 4, vocab]
    for row, (seq, n) in enumerate(zip(sequences, lengths)):
        alone = model(seq[None], 0)[0, n:]
        torch.testing.assert_close(decoded[row], alone, atol=TOL, rtol=0)
        torch.testing.assert_close(decoded[row], ref_logits(sd, args, seq)[n:], atol=TOL, rtol=0)


@torch.inference_mode()
def test_last_only_returns_the_last_position(gqa):
    args, sd, model = gqa
    tokens = random_tokens(20, rows=3, seed=5)
    full = model(tokens, 0)
    last = model(tokens, 0, last_only=True)
    assert last.shape == (3, 1, VOCAB)
    torch.testing.assert_close(last, full[:, -1:], atol=TOL, rtol=0)
    # Also for a chunk at a later position.
    model(tokens[:, :12], 0)
    torch.testing.assert_close(model(tokens[:, 12:], 12, last_only=True), full[:, -1:], atol=TOL, rtol=0)


@pytest.mark.parametrize("query_block", [1, 3, 64])
@torch.inference_mode()
def test_attention_in_query_blocks_matches_the_reference(gqa, monkeypatch, query_block):
    """Multi-token chunks attend in blocks of queries, each reading only the keys up to its last
    position: any block size gives the reference logits, also for a chunk at a later position."""
    args, sd, model = gqa
    monkeypatch.setattr(Attention, "query_block", query_block)
    tokens = random_tokens(23, seed=6)
    torch.testing.assert_close(model(tokens, 0)[0], ref_logits(sd, args, tokens[0]), atol=TOL, rtol=0)
    model(tokens[:, :9], 0)
    later = model(tokens[:, 9:], 9)[0]
    torch.testing.assert_close(later, ref_logits(sd, args, tokens[0])[9:], atol=TOL, rtol=0)


@pytest.mark.parametrize("query_block", [4, 64])
@torch.inference_mode()
def test_packed_prefill_equals_each_sequence_alone(gqa, monkeypatch, query_block):
    """Sequences of different lengths prefilled end to end in one pass: each one's logits and
    KV-cache row are those of the sequence alone (the reference recomputation)."""
    args, sd, model = gqa
    monkeypatch.setattr(Attention, "query_block", query_block)
    lengths = [3, 17, 1, 9]
    sequences = [random_tokens(n, seed=20 + i)[0] for i, n in enumerate(lengths)]
    references = [ref_logits(sd, args, seq) for seq in sequences]

    every = model.forward_packed(sequences)
    assert every.shape == (sum(lengths), VOCAB)
    torch.testing.assert_close(every, torch.cat(references), atol=TOL, rtol=0)

    last = model.forward_packed(sequences, last_only=True)
    assert last.shape == (len(lengths), VOCAB)
    torch.testing.assert_close(last, torch.stack([ref[-1] for ref in references]), atol=TOL, rtol=0)

    # The cache rows hold each sequence: decoding one more token per row continues correctly.
    following = torch.tensor([[5], [6], [7], [8]])
    stepped = model(following, lengths, last_only=True)[:, 0]
    for row, seq in enumerate(sequences):
        extended = torch.cat([seq, following[row]])
        torch.testing.assert_close(stepped[row], ref_logits(sd, args, extended)[-1], atol=TOL, rtol=0)


@torch.inference_mode()
def test_packed_prefill_rejects_what_does_not_fit(gqa):
    args, sd, model = gqa
    with pytest.raises(ValueError, match="at least one token"):
        model.forward_packed([random_tokens(4)[0], torch.tensor([], dtype=torch.long)])
    with pytest.raises(ValueError, match="at least one sequence"):
        model.forward_packed([])
    with pytest.raises(ValueError, match="max_seq_len=64"):
        model.forward_packed([random_tokens(65)[0]])
    with pytest.raises(ValueError, match="max_batch_size=4"):
        model.forward_packed([random_tokens(2)[0]] * 3, row_offset=2)


@torch.inference_mode()
def test_chunks_that_overflow_the_cache_are_rejected(gqa):
    args, sd, model = gqa
    with pytest.raises(ValueError, match="max_seq_len=64"):
        model(random_tokens(10), args.max_seq_len - 5)
    with pytest.raises(ValueError, match="max_batch_size=4"):
        model(random_tokens(3, rows=2), 0, row_offset=3)


# ---------------------------------------------------------------------------------------------
# Rotary embeddings far out: bf16 model, fp32 angles
# ---------------------------------------------------------------------------------------------

FAR = 90_000


def test_rotary_angles_at_90000_are_fp32_in_a_bf16_model():
    head_dim, theta = 128, 1e6
    positions = torch.arange(FAR, FAR + 8)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # as when a bf16 model is built
    try:
        angles = rotary_angles(positions, head_dim, theta)
    finally:
        torch.set_default_dtype(previous)
    assert angles.dtype == torch.float32 and angles.shape == (8, head_dim // 2)

    freqs = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    exact = positions.to(torch.float64)[:, None] * freqs
    # fp32 angles of ~9e4 rad are within a few ulps (ulp = 0.0078 rad) of the exact ones...
    assert (angles.double() - exact).abs().max() < 0.02
    torch.testing.assert_close(angles.cos().double(), exact.cos(), atol=0.02, rtol=0)
    torch.testing.assert_close(angles.sin().double(), exact.sin(), atol=0.02, rtol=0)
    # ...whereas bf16 angles (ulp = 512 rad at this position) would be off by whole radians.
    bf16_angles = positions.to(torch.bfloat16)[:, None] * freqs.to(torch.bfloat16)
    assert (bf16_angles.double() - exact).abs().max() > 1.0


def test_rotating_bf16_heads_at_90000_matches_fp32():
    head_dim, theta = 128, 1e6
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 2, head_dim, generator=g).to(torch.bfloat16)  # [B, L, H, D]
    k = torch.randn(1, 4, 2, head_dim, generator=g).to(torch.bfloat16)
    positions = torch.tensor([[FAR, FAR + 1, FAR + 7, FAR + 1000]])
    angles = rotary_angles(positions, head_dim, theta)
    cos, sin = angles.cos()[:, :, None, :], angles.sin()[:, :, None, :]
    q_rot, k_rot = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    assert q_rot.dtype == torch.bfloat16

    # Same rotation in float64 with exact angles: only bf16 rounding of the result differs.
    exact_q = ref_rotate(q[0].double(), positions[0], theta)
    torch.testing.assert_close(q_rot[0].double(), exact_q, atol=0.05, rtol=0.01)

    # Rotary's defining property survives at 90,000: q.k depends only on the offset between
    # positions, so the scores equal those of the same vectors near position 0.
    near = torch.tensor([[0, 1, 7, 1000]])
    near_angles = rotary_angles(near, head_dim, theta)
    near_cos, near_sin = near_angles.cos()[:, :, None, :], near_angles.sin()[:, :, None, :]
    scores_far = torch.einsum("blhd,bmhd->bhlm", q_rot.float(), k_rot.float())
    q_near, k_near = apply_rotary(q, near_cos, near_sin), apply_rotary(k, near_cos, near_sin)
    scores_near = torch.einsum("blhd,bmhd->bhlm", q_near.float(), k_near.float())
    torch.testing.assert_close(scores_far, scores_near, atol=0.5, rtol=0.02)


@torch.inference_mode()
def test_decode_reads_the_cache_rows_in_place_with_every_device_plan(gqa, monkeypatch):
    """`DECODE_ATTENTION`'s plans ("rows": the CPU's, "range": the GPUs') both attend straight from
    the cache (every attention call's keys and values are views of a layer's cache, never a
    gathered copy) and give the same logits, for consecutive rows (one masked call in "range"),
    rows of different lengths, and rows out of order (one call per row)."""
    args, sd, _ = gqa
    caches, calls = set(), []
    real_attention = model_module.F.scaled_dot_product_attention

    def spy(q, k, v, *rest, **kwargs):
        calls.append(k.untyped_storage().data_ptr() in caches and v.untyped_storage().data_ptr() in caches)
        return real_attention(q, k, v, *rest, **kwargs)

    monkeypatch.setattr(model_module.F, "scaled_dot_product_attention", spy)
    tokens = random_tokens(8, rows=4, seed=5)
    steps = [([0, 1, 2, 3], [p] * 4) for p in range(3)]  # consecutive rows
    steps += [([1], [3]), ([1, 2], [4, 3]), ([3, 0, 2], [3, 3, 4]), ([2, 3], [5, 4])]  # uneven, out of order

    def decode(plan: str) -> list:
        monkeypatch.setitem(model_module.DECODE_ATTENTION, "cpu", plan)
        model = build_model(args, sd)
        caches.clear()
        for layer in model.layers:
            cache = layer.attention.kv_cache
            caches.update(
                {cache.keys.untyped_storage().data_ptr(), cache.values.untyped_storage().data_ptr()}
            )
        outs = []
        for rows, positions in steps:
            rows_t, positions_t = torch.tensor(rows), torch.tensor(positions)
            outs.append(model.forward_decode(tokens[rows_t, positions_t], rows_t, positions_t))
        return outs

    per_row = decode("rows")
    ranged = decode("range")
    assert calls and all(calls), "an attention call read a copy of the cache"
    for a, b in zip(per_row, ranged):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
