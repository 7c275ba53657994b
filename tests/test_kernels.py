"""The AVX512-BF16 kernels against fp64/fp32 recomputations, and their fallback to torch."""

import pytest
import torch
import torch.nn.functional as F

from llama import distributed, kernels
from llama.model import ModelArgs, Transformer, apply_rotary, rotary_angles
from tests.tiny import random_state_dict, tiny_params

needs_kernel = pytest.mark.skipif(
    not kernels.kernel_available(), reason="this CPU has no AVX512-BF16 (the kernel is never used here)"
)


@pytest.fixture(autouse=True)
def kernels_enabled():
    kernels.set_enabled(True)
    yield
    kernels.set_enabled(True)


def bf16_pair(rows: int, n_out: int, n_in: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n_in, generator=g).to(torch.bfloat16)
    w = (torch.randn(n_out, n_in, generator=g) * n_in**-0.5).to(torch.bfloat16)
    return x, w


def assert_within_bf16_rounding(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """`out` is the exact product of the bf16 inputs, rounded once to bf16 (half an ulp, 2**-8
    relative), up to fp32 accumulation error."""
    exact = F.linear(x.double(), w.double())
    magnitude = F.linear(x.double().abs(), w.double().abs())
    allowed = exact.abs() * 2**-8 + magnitude * 1e-6
    error = (out.double() - exact).abs()
    assert out.dtype == torch.bfloat16
    assert (error <= allowed).all(), f"max excess error {(error - allowed).max().item():.3g}"


@needs_kernel
@pytest.mark.parametrize("rows", range(1, kernels.MAX_ROWS + 1))
@pytest.mark.parametrize("n_out,n_in", [(64, 2048), (37, 100), (300, 96), (1, 31), (9, 32)])
def test_kernel_is_the_bf16_product(rows, n_out, n_in):
    # Shapes cover: many full 32-wide steps, a masked tail, output counts that are not a
    # multiple of the row block, and a single output row.
    x, w = bf16_pair(rows, n_out, n_in, seed=rows)
    assert kernels.kernel_applies(x, w)
    assert_within_bf16_rounding(kernels.linear(x, w), x, w)


@needs_kernel
def test_kernel_keeps_leading_dims_and_reads_non_contiguous_input():
    x, w = bf16_pair(6, 48, 64)
    x3 = x.view(2, 3, 64)
    out = kernels.linear(x3, w)
    assert out.shape == (2, 3, 48)
    assert_within_bf16_rounding(out.view(6, 48), x, w)
    strided = torch.cat([x, x], dim=1)[:, ::2]  # a non-contiguous view with the same values
    assert_within_bf16_rounding(kernels.linear(strided, w), strided.contiguous(), w)


@needs_kernel
def test_kernel_agrees_with_torch_bf16_matmul():
    x, w = bf16_pair(1, 512, 1024, seed=3)
    ours, torch_bf16 = kernels.linear(x, w).float(), F.linear(x, w).float()
    torch.testing.assert_close(ours, torch_bf16, rtol=2**-7, atol=1e-3)


@needs_kernel
def test_kernel_result_does_not_depend_on_the_thread_count():
    x, w = bf16_pair(2, 257, 320)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernels.linear(x, w)
        torch.set_num_threads(2)
        two = kernels.linear(x, w)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(one, two)  # each output is one thread's sum: no order change


def test_fallback_is_exactly_torch():
    x, w = bf16_pair(4, 40, 64)
    kernels.set_enabled(False)
    assert not kernels.kernel_applies(x, w)
    assert torch.equal(kernels.linear(x, w), F.linear(x, w))


@pytest.mark.parametrize(
    "case",
    ["float32", "too_many_rows", "requires_grad", "transposed_weight"],
)
def test_kernel_not_used_outside_its_domain(case):
    x, w = bf16_pair(kernels.MAX_ROWS + 1 if case == "too_many_rows" else 2, 24, 64)
    if case == "float32":
        x, w = x.float(), w.float()
    if case == "requires_grad":
        w.requires_grad_(True)
    if case == "transposed_weight":
        w = w.t().contiguous().t()
    assert not kernels.kernel_applies(x, w)
    assert torch.equal(kernels.linear(x, w).detach(), F.linear(x, w).detach())


def test_gradients_flow_through_the_fallback():
    x, w = bf16_pair(1, 8, 32)
    w = w.float().requires_grad_(True)
    kernels.linear(x.float(), w).sum().backward()
    torch.testing.assert_close(w.grad, x.float().expand(8, 32))


def bf16_model(seed: int = 0) -> Transformer:
    distributed.init_model_parallel()
    params = tiny_params(vocab_size=300, dim=96, n_heads=6, n_kv_heads=2, n_layers=2, multiple_of=32)
    args = ModelArgs(max_seq_len=32, max_batch_size=4, **params)
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = Transformer(args)
    model.load_state_dict(random_state_dict(args, seed))
    model.to(torch.bfloat16).allocate_cache(torch.bfloat16, "cpu")
    return model.eval()


@needs_kernel
@torch.inference_mode()
def test_model_decode_with_kernel_matches_torch_path():
    """Prefill (torch matmuls) then per-row decode steps (kernel): same logits as with torch only."""
    model = bf16_model()
    tokens = torch.randint(3, 300, (3, 6), generator=torch.Generator().manual_seed(1))
    steps = torch.randint(3, 300, (3, 4), generator=torch.Generator().manual_seed(2))

    def run(use_kernel: bool) -> torch.Tensor:
        kernels.set_enabled(use_kernel)
        model.allocate_cache(torch.bfloat16, "cpu")
        outs = [model(tokens, 0, last_only=True)]
        for i in range(steps.shape[1]):
            positions = [6 + i, 6 + i, 6 + i]
            outs.append(model(steps[:, i : i + 1], positions, last_only=True))
        return torch.cat(outs, dim=1)

    with_kernel, torch_only = run(True), run(False)
    # bf16 activations: the two paths differ by bf16 rounding of intermediate products.
    scale = torch_only.abs().max()
    assert (with_kernel - torch_only).abs().max() <= 0.05 * scale


# ---------------------------------------------------------------------------------------------
# Decode attention
# ---------------------------------------------------------------------------------------------


def fp64_attention(q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, lengths) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v per row over its first lengths[b] positions, in float64, with
    query head h reading kv head h // (heads / kv_heads): written out with plain tensor ops."""
    batch, heads, head_dim = q.shape
    rep = heads // cache_k.shape[1]
    out = torch.empty(batch, heads, head_dim, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            keys = cache_k[b, h // rep, : int(lengths[b])].double()
            values = cache_v[b, h // rep, : int(lengths[b])].double()
            weights = torch.softmax(keys @ q[b, h].double() / head_dim**0.5, dim=0)
            out[b, h] = weights @ values
    return out


@needs_kernel
@pytest.mark.parametrize(
    "heads,kv_heads,head_dim,lengths",
    [
        (8, 1, 64, [1]),
        (8, 2, 64, [17, 5, 300, 64]),  # uneven rows, lengths that are not multiples of 16
        (4, 4, 128, [33, 2]),  # no grouping, Code Llama's head size
        (16, 2, 128, [1000]),
    ],
)
def test_decode_attention_matches_fp64(heads, kv_heads, head_dim, lengths):
    g = torch.Generator().manual_seed(len(lengths) * heads + head_dim)
    batch, max_len = len(lengths), max(lengths) + 7
    q = torch.randn(batch, heads, head_dim, generator=g).to(torch.bfloat16)
    # Cache rows of a larger cache (rows 1..batch): the kernel follows the strides.
    cache_k = (torch.randn(batch + 1, kv_heads, max_len, head_dim, generator=g) * 2).to(torch.bfloat16)[1:]
    cache_v = torch.randn(batch + 1, kv_heads, max_len, head_dim, generator=g).to(torch.bfloat16)[1:]
    assert kernels.attention_applies(q, cache_k)
    lengths_t = torch.tensor(lengths)
    out = kernels.decode_attention(q, cache_k, cache_v, lengths_t)
    expected = fp64_attention(q, cache_k, cache_v, lengths)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    # fp32 arithmetic, then one rounding to bf16 (2**-8 relative).
    assert ((out.double() - expected).abs() <= expected.abs() * 2**-8 + 1e-4).all()
    # Positions past a row's own length do not matter.
    for row, length in enumerate(lengths):
        cache_k[row, :, length:] = 1e4
        cache_v[row, :, length:] = -1e4
    torch.testing.assert_close(kernels.decode_attention(q, cache_k, cache_v, lengths_t), out, rtol=0, atol=0)


@pytest.mark.parametrize("case", ["float32", "head_dim_32", "disabled"])
def test_decode_attention_not_used_outside_its_domain(case):
    head_dim = 32 if case == "head_dim_32" else 64
    q = torch.zeros(1, 2, head_dim, dtype=torch.bfloat16)
    cache = torch.zeros(1, 1, 8, head_dim, dtype=torch.bfloat16)
    if case == "float32":
        q, cache = q.float(), cache.float()
    if case == "disabled":
        kernels.set_enabled(False)
    assert not kernels.attention_applies(q, cache)


def fp64_causal_attention(
    q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, start: int
) -> torch.Tensor:
    """The token at position start + i attends to positions 0 .. start + i: `fp64_attention` of
    each token alone over the first start + i + 1 positions of the cache row."""
    return torch.cat(
        [fp64_attention(q[i : i + 1], cache_k[None], cache_v[None], [start + i + 1]) for i in range(len(q))]
    )


@needs_kernel
@pytest.mark.parametrize(
    "length,heads,kv_heads,head_dim,start",
    [
        (1, 8, 1, 64, 0),
        (37, 8, 2, 64, 3),  # a chunk after cached positions; 37 is no multiple of 8 or 16
        (20, 4, 4, 128, 0),  # no grouping (Code Llama 7B/13B), Code Llama's head size
        (70, 3, 3, 128, 17),  # 3 heads per group: a task of 8 rows spans tokens
        (40, 16, 2, 128, 300),
    ],
)
def test_prefill_attention_matches_fp64(length, heads, kv_heads, head_dim, start):
    g = torch.Generator().manual_seed(length + start)
    q = torch.randn(length, heads, head_dim, generator=g).to(torch.bfloat16)
    size = start + length + 9
    # Row 1 of a two-row cache: the kernel follows the strides.
    cache_k = (torch.randn(2, kv_heads, size, head_dim, generator=g) * 2).to(torch.bfloat16)[1]
    cache_v = torch.randn(2, kv_heads, size, head_dim, generator=g).to(torch.bfloat16)[1]
    assert kernels.prefill_attention_applies(q, cache_k)
    out = kernels.prefill_attention(q, cache_k, cache_v, start)
    expected = fp64_causal_attention(q, cache_k, cache_v, start)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    # fp32 arithmetic, then one rounding to bf16 (2**-8 relative).
    assert ((out.double() - expected).abs() <= expected.abs() * 2**-8 + 1e-4).all()
    # Positions after the chunk (future tokens) do not matter.
    cache_k[:, start + length :] = 1e4
    cache_v[:, start + length :] = -1e4
    torch.testing.assert_close(kernels.prefill_attention(q, cache_k, cache_v, start), out, rtol=0, atol=0)


@pytest.mark.parametrize("case", ["float32", "head_dim_32", "disabled"])
def test_prefill_attention_not_used_outside_its_domain(case):
    head_dim = 32 if case == "head_dim_32" else 64
    q = torch.zeros(3, 2, head_dim, dtype=torch.bfloat16)
    cache = torch.zeros(1, 8, head_dim, dtype=torch.bfloat16)
    if case == "float32":
        q, cache = q.float(), cache.float()
    if case == "disabled":
        kernels.set_enabled(False)
    assert not kernels.prefill_attention_applies(q, cache)


@needs_kernel
@torch.inference_mode()
def test_model_attention_kernels_match_torch_path(monkeypatch):
    """A bf16 model with 64-wide heads prefilling packed prompts, then decoding rows at different
    positions: the same logits with the attention kernels as with torch's
    scaled_dot_product_attention."""
    calls, prefills = [], []
    kernel = kernels._decode_attention
    monkeypatch.setattr(kernels, "_decode_attention", lambda *args: calls.append(1) or kernel(*args))
    prefill = kernels.prefill_attention
    monkeypatch.setattr(kernels, "prefill_attention", lambda *args: prefills.append(1) or prefill(*args))
    distributed.init_model_parallel()
    params = tiny_params(vocab_size=300, dim=256, n_heads=4, n_kv_heads=2, n_layers=2, multiple_of=32)
    args = ModelArgs(max_seq_len=64, max_batch_size=3, **params)
    assert args.head_dim == 64
    with torch.device("cpu"):
        model = Transformer(args)
    model.load_state_dict(random_state_dict(args, 5))
    model.to(torch.bfloat16).eval()
    prompts = [torch.randint(3, 300, (n,), generator=torch.Generator().manual_seed(n)) for n in (3, 20, 9)]
    steps = torch.randint(3, 300, (3, 5), generator=torch.Generator().manual_seed(7))

    def run(use_kernel: bool) -> torch.Tensor:
        kernels.set_enabled(use_kernel)
        model.allocate_cache(torch.bfloat16, "cpu")
        outs = [model.forward_packed(prompts, last_only=True)[:, None]]
        for i in range(steps.shape[1]):
            positions = [len(p) + i for p in prompts]
            outs.append(model(steps[:, i : i + 1], positions, last_only=True))
        return torch.cat(outs, dim=1)

    with_kernel = run(True)
    assert len(calls) == 2 * steps.shape[1]  # every layer of every decode step
    assert len(prefills) == 2 * len(prompts)  # every layer, every packed prompt
    torch_only = run(False)
    assert len(calls) == 2 * steps.shape[1] and len(prefills) == 2 * len(prompts)
    scale = torch_only.abs().max()
    assert (with_kernel - torch_only).abs().max() <= 0.05 * scale


# ---------------------------------------------------------------------------------------------
# Rotary embedding (eager bf16)
# ---------------------------------------------------------------------------------------------


@needs_kernel
@pytest.mark.parametrize("shape", [(1, 1, 32, 64), (2, 7, 4, 128), (1, 300, 3, 32)])
def test_rotary_kernel_equals_the_torch_rotation_bit_for_bit(shape):
    g = torch.Generator().manual_seed(shape[1])
    x = (torch.randn(*shape, generator=g) * 4).to(torch.bfloat16)
    positions = torch.randint(0, 100_000, shape[:2], generator=g)
    angles = rotary_angles(positions, shape[-1], 1e6)[:, :, None, :]
    cos, sin = angles.cos(), angles.sin()
    assert kernels.rotary_applies(x, cos)
    out = kernels.rotary(x, cos, sin)
    kernels.set_enabled(False)
    assert not kernels.rotary_applies(x, cos)
    expected = apply_rotary(x, cos, sin)  # the torch path
    assert torch.equal(out, expected)


def test_rotary_kernel_needs_one_angle_row_per_token():
    x = torch.zeros(2, 3, 4, 64, dtype=torch.bfloat16)
    assert not kernels.rotary_applies(x, torch.zeros(1, 3, 1, 32))  # broadcast over the batch
    assert not kernels.rotary_applies(x.float(), torch.zeros(2, 3, 1, 32))
