"""The CPU kernels (every instruction-set variant this CPU runs) against fp64/fp32 recomputations,
row by row against themselves, and their fallback to torch."""

import os
import platform

import pytest
import torch
import torch.nn.functional as F

from llama import distributed, kernel_build, kernels
from llama.model import ModelArgs, Transformer, apply_rotary, rotary_angles
from tests.tiny import random_state_dict, tiny_params

ON_X86_64 = platform.machine().lower() in ("x86_64", "amd64")
RUNNABLE_HERE = kernel_build.cpu_variants()


@pytest.fixture(params=kernel_build.VARIANTS)
def variant(request):
    """Each test taking this fixture runs once per kernel variant, with that variant active: every
    variant this CPU runs (on an AVX-512 machine the avx2 one too). A variant this CPU lacks, or
    lists but refuses when a test call runs, is skipped with the reason; with none runnable, an
    x86-64 CI machine fails instead of skipping everything."""
    name = request.param
    if name not in RUNNABLE_HERE:
        if RUNNABLE_HERE:
            pytest.skip(f"this CPU cannot run {name}; the {RUNNABLE_HERE[0]} variant is tested in its place")
        if os.environ.get("CI", "").lower() == "true" and ON_X86_64:
            pytest.fail("no kernel variant runs on this x86-64 CI machine: the kernels would go untested")
        pytest.skip("no kernel variant runs on this CPU")
    library = kernel_build.load(name)  # raises if it cannot be built: a build failure is never a skip
    refused = kernel_build.prove_library(library)
    if refused is not None:
        pytest.skip(f"this CPU lists the instruction sets of {name} but does not run them: {refused}")
    previous = kernels.variant()
    kernels.set_variant(name)
    yield name
    if previous is not None:
        kernels.set_variant(previous)


@pytest.fixture(autouse=True)
def kernels_enabled():
    kernels.set_enabled(True)
    yield
    kernels.set_enabled(True)


def fp32_pair(rows: int, n_out: int, n_in: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, n_in, generator=g), torch.randn(n_out, n_in, generator=g) * n_in**-0.5


def bf16_pair(rows: int, n_out: int, n_in: int, seed: int = 0):
    x, w = fp32_pair(rows, n_out, n_in, seed)
    return x.to(torch.bfloat16), w.to(torch.bfloat16)


def assert_within_bf16_rounding(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """`out` is the exact product of the bf16 inputs, rounded once to bf16 (half an ulp, 2**-8
    relative), up to fp32 accumulation error."""
    exact = F.linear(x.double(), w.double())
    magnitude = F.linear(x.double().abs(), w.double().abs())
    allowed = exact.abs() * 2**-8 + magnitude * 1e-6
    error = (out.double() - exact).abs()
    assert out.dtype == torch.bfloat16
    assert (error <= allowed).all(), f"max excess error {(error - allowed).max().item():.3g}"


@pytest.mark.parametrize("rows", range(1, kernels.MAX_ROWS + 1))
@pytest.mark.parametrize("n_out,n_in", [(64, 2048), (37, 100), (300, 96), (1, 31), (9, 32)])
def test_kernel_is_the_bf16_product(rows, n_out, n_in, variant):
    # Shapes cover: many full 32-wide steps, a masked tail, output counts that are not a
    # multiple of the row block, and a single output row.
    x, w = bf16_pair(rows, n_out, n_in, seed=rows)
    assert kernels.kernel_applies(x, w)
    assert_within_bf16_rounding(kernels.linear(x, w), x, w)


@pytest.mark.parametrize("rows", range(1, kernels.MAX_ROWS + 1))
@pytest.mark.parametrize("n_out,n_in", [(64, 2048), (37, 100), (300, 96), (1, 31), (9, 7)])
def test_kernel_is_the_fp32_product(rows, n_out, n_in, variant):
    # The same shapes as in bf16 (full 16- and 8-wide steps, a masked tail, odd output counts),
    # checked against the float64 product: fp32 accumulation error only.
    x, w = fp32_pair(rows, n_out, n_in, seed=rows)
    assert kernels.kernel_applies(x, w)
    out = kernels.linear(x, w)
    exact = F.linear(x.double(), w.double())
    magnitude = F.linear(x.double().abs(), w.double().abs())
    assert out.dtype == torch.float32 and out.shape == (rows, n_out)
    assert ((out.double() - exact).abs() <= magnitude * n_in * 2**-24).all()


@pytest.mark.parametrize("n_out,n_in", [(2053, 1000), (300, 96)])
def test_fp32_row_is_the_same_alone_or_with_up_to_7_others_unlike_torch(n_out, n_in, variant):
    # torch's fp32 product picks its reduction by the row count, so its rows change in the last
    # bits between 1, 2-3 and 4+ rows; the kernel gives every row the same bits. Fused calls too.
    x, w = fp32_pair(kernels.MAX_ROWS, n_out, n_in, seed=n_out)
    extra = fp32_pair(1, 24, n_in, seed=1)[1]
    alone = torch.cat([kernels.linear(x[i : i + 1], w) for i in range(kernels.MAX_ROWS)])
    for rows in range(2, kernels.MAX_ROWS + 1):
        assert torch.equal(kernels.linear(x[:rows], w), alone[:rows]), f"{rows} rows"
        fused = kernels.fused_linear(x[:rows], [w, extra])
        assert torch.equal(fused[0], alone[:rows]) and torch.equal(fused[1], kernels.linear(x[:rows], extra))


def test_kernel_keeps_leading_dims_and_reads_non_contiguous_input(variant):
    x, w = bf16_pair(6, 48, 64)
    x3 = x.view(2, 3, 64)
    out = kernels.linear(x3, w)
    assert out.shape == (2, 3, 48)
    assert_within_bf16_rounding(out.view(6, 48), x, w)
    strided = torch.cat([x, x], dim=1)[:, ::2]  # a non-contiguous view with the same values
    assert_within_bf16_rounding(kernels.linear(strided, w), strided.contiguous(), w)


def test_kernel_agrees_with_torch_bf16_matmul(variant):
    x, w = bf16_pair(1, 512, 1024, seed=3)
    ours, torch_bf16 = kernels.linear(x, w).float(), F.linear(x, w).float()
    torch.testing.assert_close(ours, torch_bf16, rtol=2**-7, atol=1e-3)


@pytest.mark.parametrize("pair", [bf16_pair, fp32_pair])
def test_kernel_result_does_not_depend_on_the_thread_count(pair, variant):
    x, w = pair(2, 257, 320)
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
    ["float16", "mixed_dtypes", "too_many_rows", "requires_grad", "transposed_weight"],
)
def test_kernel_not_used_outside_its_domain(case):
    x, w = bf16_pair(kernels.MAX_ROWS + 1 if case == "too_many_rows" else 2, 24, 64)
    if case == "float16":
        x, w = x.half(), w.half()
    if case == "mixed_dtypes":
        x = x.float()
    if case == "requires_grad":
        w.requires_grad_(True)
    if case == "transposed_weight":
        w = w.t().contiguous().t()
    assert not kernels.kernel_applies(x, w)
    if case != "mixed_dtypes":  # which torch refuses too
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


@torch.inference_mode()
def test_model_decode_with_kernel_matches_torch_path(variant):
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


@pytest.mark.parametrize(
    "heads,kv_heads,head_dim,lengths",
    [
        (8, 1, 64, [1]),
        (8, 2, 64, [17, 5, 300, 64]),  # uneven rows, lengths that are not multiples of 16
        (6, 2, 32, [40, 3]),  # the demo model's head size
        (4, 4, 128, [33, 2]),  # no grouping, Code Llama's head size
        (16, 2, 128, [1000]),
    ],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decode_attention_matches_fp64(heads, kv_heads, head_dim, lengths, dtype, variant):
    g = torch.Generator().manual_seed(len(lengths) * heads + head_dim)
    batch, max_len = len(lengths), max(lengths) + 7
    q = torch.randn(batch, heads, head_dim, generator=g).to(dtype)
    # Cache rows of a larger cache (rows 1..batch): the kernel follows the strides.
    cache_k = (torch.randn(batch + 1, kv_heads, max_len, head_dim, generator=g) * 2).to(dtype)[1:]
    cache_v = torch.randn(batch + 1, kv_heads, max_len, head_dim, generator=g).to(dtype)[1:]
    assert kernels.attention_applies(q, cache_k)
    lengths_t = torch.tensor(lengths)
    out = kernels.decode_attention(q, cache_k, cache_v, lengths_t)
    expected = fp64_attention(q, cache_k, cache_v, lengths)
    assert out.dtype == dtype and out.shape == q.shape
    # fp32 arithmetic, then (bf16) one rounding to bf16, 2**-8 relative.
    rtol, atol = (2**-8, 1e-4) if dtype == torch.bfloat16 else (1e-5, 1e-5)
    assert ((out.double() - expected).abs() <= expected.abs() * rtol + atol).all()
    # Positions past a row's own length do not matter.
    for row, length in enumerate(lengths):
        cache_k[row, :, length:] = 1e4
        cache_v[row, :, length:] = -1e4
    torch.testing.assert_close(kernels.decode_attention(q, cache_k, cache_v, lengths_t), out, rtol=0, atol=0)


@pytest.mark.parametrize("case", ["float16", "mixed_dtypes", "head_dim_48", "disabled"])
def test_decode_attention_not_used_outside_its_domain(case):
    head_dim = 48 if case == "head_dim_48" else 64
    q = torch.zeros(1, 2, head_dim, dtype=torch.bfloat16)
    cache = torch.zeros(1, 1, 8, head_dim, dtype=torch.bfloat16)
    if case == "float16":
        q, cache = q.half(), cache.half()
    if case == "mixed_dtypes":
        q = q.float()
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


@pytest.mark.parametrize(
    "length,heads,kv_heads,head_dim,start",
    [
        (1, 8, 1, 64, 0),
        (37, 8, 2, 64, 3),  # a chunk after cached positions; 37 is no multiple of 8 or 16
        (45, 6, 2, 32, 5),  # the demo model's head size
        (20, 4, 4, 128, 0),  # no grouping (Code Llama 7B/13B), Code Llama's head size
        (70, 3, 3, 128, 17),  # 3 heads per group: a task of 8 rows spans tokens
        (40, 16, 2, 128, 300),
    ],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_prefill_attention_matches_fp64(length, heads, kv_heads, head_dim, start, dtype, variant):
    g = torch.Generator().manual_seed(length + start)
    q = torch.randn(length, heads, head_dim, generator=g).to(dtype)
    size = start + length + 9
    # Row 1 of a two-row cache: the kernel follows the strides.
    cache_k = (torch.randn(2, kv_heads, size, head_dim, generator=g) * 2).to(dtype)[1]
    cache_v = torch.randn(2, kv_heads, size, head_dim, generator=g).to(dtype)[1]
    assert kernels.prefill_attention_applies(q, cache_k)
    out = kernels.prefill_attention(q, cache_k, cache_v, start)
    expected = fp64_causal_attention(q, cache_k, cache_v, start)
    assert out.dtype == dtype and out.shape == q.shape
    # fp32 arithmetic, then (bf16) one rounding to bf16, 2**-8 relative.
    rtol, atol = (2**-8, 1e-4) if dtype == torch.bfloat16 else (1e-5, 1e-5)
    assert ((out.double() - expected).abs() <= expected.abs() * rtol + atol).all()
    # Positions after the chunk (future tokens) do not matter.
    cache_k[:, start + length :] = 1e4
    cache_v[:, start + length :] = -1e4
    torch.testing.assert_close(kernels.prefill_attention(q, cache_k, cache_v, start), out, rtol=0, atol=0)


@pytest.mark.parametrize("case", ["float16", "mixed_dtypes", "head_dim_48", "disabled"])
def test_prefill_attention_not_used_outside_its_domain(case):
    head_dim = 48 if case == "head_dim_48" else 64
    q = torch.zeros(3, 2, head_dim, dtype=torch.bfloat16)
    cache = torch.zeros(1, 8, head_dim, dtype=torch.bfloat16)
    if case == "float16":
        q, cache = q.half(), cache.half()
    if case == "mixed_dtypes":
        q = q.float()
    if case == "disabled":
        kernels.set_enabled(False)
    assert not kernels.prefill_attention_applies(q, cache)


@torch.inference_mode()
def test_model_attention_kernels_match_torch_path(monkeypatch, variant):
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
    model.fuse_decode_layers = False  # the layer-by-layer step (tests/test_fused_decode.py: the same logits)
    prompts = [torch.randint(3, 300, (n,), generator=torch.Generator().manual_seed(n)) for n in (3, 20, 9)]
    steps = torch.randint(3, 300, (3, 5), generator=torch.Generator().manual_seed(7))

    def run(use_kernel: bool) -> torch.Tensor:
        kernels.set_enabled(use_kernel)
        model.allocate_cache(torch.bfloat16, "cpu")
        outs = [model.forward_packed(prompts, last_only=True)[:, None]]
        for i in range(steps.shape[1]):
            positions = [len(p) + i for p in prompts]
            outs.append(model(steps[:, i : i + 1], positions, last_only=True))
        # The engine's decode step: any cache rows, in any order, read in place.
        rows = torch.tensor([2, 0])
        positions = torch.tensor([len(prompts[2]), len(prompts[0])]) + steps.shape[1]
        decoded = model.forward_decode(torch.tensor([5, 6]), rows, positions)
        outs.append(torch.stack([decoded[1], torch.zeros_like(decoded[0]), decoded[0]])[:, None])
        return torch.cat(outs, dim=1)

    with_kernel = run(True)
    assert len(calls) == 2 * (steps.shape[1] + 1)  # every layer of every decode step
    assert len(prefills) == 2 * len(prompts)  # every layer, every packed prompt
    torch_only = run(False)
    assert len(calls) == 2 * (steps.shape[1] + 1) and len(prefills) == 2 * len(prompts)
    scale = torch_only.abs().max()
    assert (with_kernel - torch_only).abs().max() <= 0.05 * scale


# ---------------------------------------------------------------------------------------------
# Rotary embedding (eager bf16)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 1, 32, 64), (2, 7, 4, 128), (1, 300, 3, 32)])
def test_rotary_kernel_equals_the_torch_rotation_bit_for_bit(shape, variant):
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


def test_rotary_kernel_matches_fp64(variant):
    g = torch.Generator().manual_seed(11)
    x = (torch.randn(2, 5, 3, 64, generator=g) * 4).to(torch.bfloat16)
    angles = rotary_angles(torch.randint(0, 10_000, (2, 5), generator=g), 64, 1e4)[:, :, None, :]
    cos, sin = angles.cos(), angles.sin()
    out = kernels.rotary(x, cos, sin).double()
    a, b = x.double()[..., 0::2], x.double()[..., 1::2]
    c, s = cos.double(), sin.double()
    expected = torch.stack([a * c - b * s, a * s + b * c], dim=-1).flatten(-2)
    # fp32 products and sum, then one bf16 rounding (2**-8 relative).
    magnitude = (a.abs() + b.abs()).repeat_interleave(2, dim=-1)
    assert ((out - expected).abs() <= expected.abs() * 2**-8 + magnitude * 1e-6).all()


# ---------------------------------------------------------------------------------------------
# A row's result does not depend on the other rows of the call
# ---------------------------------------------------------------------------------------------


def test_a_variant_runs_on_every_x86_64_cpu_with_avx2():
    if not {"avx2", "fma"} <= kernel_build.cpu_flags():
        pytest.skip("this CPU has no AVX2+FMA")
    assert kernels.kernel_available()
    assert kernels.variant() in RUNNABLE_HERE


def test_the_preferred_variant_is_the_fastest_this_cpu_runs(monkeypatch):
    monkeypatch.delenv("CODELLAMA_KERNEL_VARIANT", raising=False)
    monkeypatch.setattr(kernel_build, "cpu_variants", lambda: ["avx512bf16", "avx2"])
    assert kernels._preferred_variants() == ["avx512bf16", "avx2"]
    monkeypatch.setenv("CODELLAMA_KERNEL_VARIANT", "avx2")
    assert kernels._preferred_variants() == ["avx2"]
    monkeypatch.setenv("CODELLAMA_KERNEL_VARIANT", "sse9")
    with pytest.raises(ValueError, match="CODELLAMA_KERNEL_VARIANT"):
        kernels._preferred_variants()
    with pytest.raises(ValueError, match="unknown kernel variant"):
        kernels.set_variant("sse9")


def cancelling_pair(rows: int, n_out: int, n_in: int, seed: int = 0):
    """Like `bf16_pair`, with magnitudes spread over 2**-8 .. 2**8: sums cancel, so a different
    summation order shows in the bf16 results, not only in the fp32 bits they round away."""
    g = torch.Generator().manual_seed(seed)
    spread = 2.0 ** torch.randint(-8, 9, (rows, n_in), generator=g)
    x = (torch.randn(rows, n_in, generator=g) * spread).to(torch.bfloat16)
    w = (torch.randn(n_out, n_in, generator=g) * n_in**-0.5).to(torch.bfloat16)
    return x, w


@pytest.mark.parametrize("n_out,n_in", [(2053, 1000), (1024, 256)])
def test_gemv_row_is_the_same_alone_or_with_up_to_7_others(n_out, n_in, variant):
    x, w = cancelling_pair(kernels.MAX_ROWS, n_out, n_in, seed=n_out)
    alone = torch.cat([kernels.linear(x[i : i + 1], w) for i in range(kernels.MAX_ROWS)])
    for rows in range(2, kernels.MAX_ROWS + 1):
        assert torch.equal(kernels.linear(x[:rows], w), alone[:rows]), f"{rows} rows"
    assert_within_bf16_rounding(alone, x, w)


def test_decode_attention_row_is_the_same_alone_or_with_up_to_7_others(variant):
    g = torch.Generator().manual_seed(4)
    lengths = torch.tensor([5, 40, 17, 1, 33, 64, 9, 20])
    q = torch.randn(8, 4, 64, generator=g).to(torch.bfloat16)
    cache_k = torch.randn(8, 2, 64, 64, generator=g).to(torch.bfloat16)
    cache_v = torch.randn(8, 2, 64, 64, generator=g).to(torch.bfloat16)
    alone = torch.cat(
        [
            kernels.decode_attention(q[b : b + 1], cache_k[b : b + 1], cache_v[b : b + 1], lengths[b : b + 1])
            for b in range(8)
        ]
    )
    for rows in range(2, 9):
        out = kernels.decode_attention(q[:rows], cache_k[:rows], cache_v[:rows], lengths[:rows])
        assert torch.equal(out, alone[:rows]), f"{rows} rows"


def test_decode_attention_reads_any_cache_rows_in_place(variant):
    """Rows picked by index (out of order, repeated, a middle row) give what a gathered copy of
    those rows gives, and match fp64; the cache is read where it is."""
    g = torch.Generator().manual_seed(11)
    cache_k = torch.randn(6, 2, 80, 64, generator=g).to(torch.bfloat16)
    cache_v = torch.randn(6, 2, 80, 64, generator=g).to(torch.bfloat16)
    rows = torch.tensor([4, 0, 4, 2])
    lengths = torch.tensor([80, 3, 17, 41])
    q = torch.randn(4, 8, 64, generator=g).to(torch.bfloat16)
    in_place = kernels.decode_attention(q, cache_k, cache_v, lengths, rows)
    gathered = kernels.decode_attention(q, cache_k[rows], cache_v[rows], lengths)
    assert torch.equal(in_place, gathered)
    expected = fp64_attention(q, cache_k[rows], cache_v[rows], lengths.tolist())
    assert ((in_place.double() - expected).abs() <= expected.abs() * 2**-8 + 1e-4).all()


@pytest.mark.parametrize("row", [-1, 6])
def test_decode_attention_refuses_a_row_outside_the_cache(row, variant):
    q = torch.zeros(2, 2, 64, dtype=torch.bfloat16)
    cache = torch.zeros(6, 1, 8, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="do not fit"):
        kernels.decode_attention(q, cache, cache, torch.tensor([3, 3]), torch.tensor([1, row]))


def test_prefill_attention_token_is_the_same_alone_or_with_up_to_7_others(variant):
    g = torch.Generator().manual_seed(6)
    start, heads, kv_heads, head_dim = 5, 6, 2, 128
    q = torch.randn(8, heads, head_dim, generator=g).to(torch.bfloat16)
    cache_k = torch.randn(kv_heads, 32, head_dim, generator=g).to(torch.bfloat16)
    cache_v = torch.randn(kv_heads, 32, head_dim, generator=g).to(torch.bfloat16)
    alone = torch.cat(
        [kernels.prefill_attention(q[i : i + 1], cache_k, cache_v, start + i) for i in range(8)]
    )
    for tokens in range(2, 9):
        out = kernels.prefill_attention(q[:tokens], cache_k, cache_v, start)
        assert torch.equal(out, alone[:tokens]), f"{tokens} tokens"


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(8, 1, 64), (3, 3, 128), (72, 1, 64)])
def test_prefill_attention_token_is_the_same_in_any_chunking(heads, kv_heads, head_dim, variant):
    """A prompt of several key blocks (64 keys) and tiles, prefilled in one chunk or in chunks of
    other sizes (as prefix reuse and chunked prefill cut it): every token's output is identical.
    72 query heads on one kv head are more rows than a tile of 64 holds."""
    g = torch.Generator().manual_seed(heads)
    length = 300
    q = torch.randn(length, heads, head_dim, generator=g).to(torch.bfloat16)
    cache_k = (torch.randn(kv_heads, length + 5, head_dim, generator=g) * 2).to(torch.bfloat16)
    cache_v = torch.randn(kv_heads, length + 5, head_dim, generator=g).to(torch.bfloat16)
    whole = kernels.prefill_attention(q, cache_k, cache_v, 0)
    expected = fp64_causal_attention(q, cache_k, cache_v, 0)
    assert ((whole.double() - expected).abs() <= expected.abs() * 2**-8 + 1e-4).all()
    for cuts in ([64, 128, 192, 256], [1, 63, 65, 200, 299], [100, 137]):
        bounds = [0, *cuts, length]
        parts = [kernels.prefill_attention(q[a:b], cache_k, cache_v, a) for a, b in zip(bounds, bounds[1:])]
        assert torch.equal(torch.cat(parts), whole), cuts


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(8, 2, 64), (4, 4, 128), (6, 2, 128), (6, 2, 32)])
def test_decode_attention_equals_prefill_attention_for_the_same_token(heads, kv_heads, head_dim, variant):
    """Both kernels attend in the same tiles: a token decoded after its prompt gets exactly the
    attention output that prefilling it with the prompt gives."""
    g = torch.Generator().manual_seed(heads * head_dim)
    length = 200
    q = torch.randn(length, heads, head_dim, generator=g).to(torch.bfloat16)
    cache_k = torch.randn(3, kv_heads, length, head_dim, generator=g).to(torch.bfloat16)
    cache_v = torch.randn(3, kv_heads, length, head_dim, generator=g).to(torch.bfloat16)
    prefilled = kernels.prefill_attention(q, cache_k[2], cache_v[2], 0)
    for positions in ([0, 63, 64, 199], [130, 5]):
        decoded = kernels.decode_attention(
            q[positions], cache_k, cache_v, torch.tensor(positions) + 1, torch.tensor([2] * len(positions))
        )
        assert torch.equal(decoded, prefilled[positions]), positions


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_long_decode_is_split_into_segments_yet_equals_prefill_fp64_and_itself_on_one_thread(dtype, variant):
    """Past 4096 keys a row's keys are attended in segments (spread over threads when decoding) and
    combined in order: the decoded token still equals the prefilled one bit for bit, on one thread
    or two, and matches fp64."""
    g = torch.Generator().manual_seed(21)
    length, heads, head_dim = 9000, 4, 64
    q = torch.randn(length, heads, head_dim, generator=g).to(dtype)
    cache_k = (torch.randn(1, 1, length, head_dim, generator=g) * 2).to(dtype)
    cache_v = torch.randn(1, 1, length, head_dim, generator=g).to(dtype)
    threads = torch.get_num_threads()
    for position in (4095, 4096, 8191, 8999):
        lengths = torch.tensor([position + 1])
        decoded = kernels.decode_attention(q[position : position + 1], cache_k, cache_v, lengths)
        prefilled = kernels.prefill_attention(q[position : position + 1], cache_k[0], cache_v[0], position)
        assert torch.equal(decoded, prefilled), position
        torch.set_num_threads(1)
        try:
            alone = kernels.decode_attention(q[position : position + 1], cache_k, cache_v, lengths)
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(alone, decoded), position
    expected = fp64_attention(q[-1:], cache_k, cache_v, [length])
    rtol, atol = (2**-8, 1e-4) if dtype == torch.bfloat16 else (1e-5, 1e-5)
    assert ((decoded.double() - expected).abs() <= expected.abs() * rtol + atol).all()


def test_prefill_attention_rescales_when_a_later_block_holds_the_largest_score(variant):
    """Keys grow with their position, so each key block of a long row holds larger scores than all
    before it: the running maximum, sum and weighted sum are rescaled at every block."""
    g = torch.Generator().manual_seed(3)
    length, heads, head_dim = 260, 4, 64
    q = (torch.rand(length, heads, head_dim, generator=g) + 0.5).to(torch.bfloat16)
    growth = torch.linspace(0.0, 3.0, length)[None, :, None]
    cache_k = (torch.rand(1, length, head_dim, generator=g) * growth).to(torch.bfloat16)
    cache_v = torch.randn(1, length, head_dim, generator=g).to(torch.bfloat16)
    out = kernels.prefill_attention(q, cache_k, cache_v, 0)
    expected = fp64_causal_attention(q, cache_k, cache_v, 0)
    assert ((out.double() - expected).abs() <= expected.abs() * 2**-8 + 1e-4).all()


def test_rotary_token_is_the_same_alone_or_with_up_to_7_others(variant):
    g = torch.Generator().manual_seed(8)
    x = torch.randn(1, 8, 4, 64, generator=g).to(torch.bfloat16)
    angles = rotary_angles(torch.arange(8)[None] * 37, 64, 1e4)[:, :, None, :]
    cos, sin = angles.cos(), angles.sin()
    alone = torch.cat(
        [kernels.rotary(x[:, i : i + 1], cos[:, i : i + 1], sin[:, i : i + 1]) for i in range(8)], 1
    )
    for tokens in range(2, 9):
        assert torch.equal(kernels.rotary(x[:, :tokens], cos[:, :tokens], sin[:, :tokens]), alone[:, :tokens])


# ---------------------------------------------------------------------------------------------
# The C entry points refuse calls that would read or write outside the buffers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [0, 9, 1000])
def test_decode_attention_refuses_a_length_outside_the_cache(length, variant):
    q = torch.zeros(2, 2, 64, dtype=torch.bfloat16)
    cache = torch.zeros(2, 1, 8, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="do not fit"):
        kernels.decode_attention(q, cache, cache, torch.tensor([3, length]))


def test_entry_points_refuse_buffers_shorter_than_the_sizes(variant):
    x, w = bf16_pair(2, 16, 64)
    out = torch.empty(2, 16, dtype=torch.bfloat16)
    ptrs = (x.data_ptr(), w.data_ptr(), out.data_ptr())
    with pytest.raises(ValueError, match="do not fit"):  # weight buffer claimed shorter than N * K
        kernels._run(
            "codellama_gemv_bf16", ptrs[0], 128, ptrs[1], 16 * 64 - 1, ptrs[2], 32, 2, 16, 64, unsupported=""
        )
    with pytest.raises(ValueError, match="do not fit"):  # K larger than the rows
        kernels._run(
            "codellama_gemv_bf16", ptrs[0], 128, ptrs[1], 1024, ptrs[2], 32, 2, 16, 65, unsupported=""
        )
    with pytest.raises(ValueError, match="do not fit"):  # a negative size
        kernels._run(
            "codellama_gemv_bf16", ptrs[0], 128, ptrs[1], 1024, ptrs[2], 32, 2, -16, 64, unsupported=""
        )
    x, w = fp32_pair(2, 16, 64)
    out = torch.empty(2, 16)
    ptrs = (x.data_ptr(), w.data_ptr(), out.data_ptr())
    with pytest.raises(ValueError, match="do not fit"):  # fp32: weight buffer claimed shorter than N * K
        kernels._run(
            "codellama_gemv_f32", ptrs[0], 128, ptrs[1], 16 * 64 - 1, ptrs[2], 32, 2, 16, 64, unsupported=""
        )
    with pytest.raises(ValueError, match="do not fit"):  # fp32: output claimed shorter than M * N
        kernels._run(
            "codellama_gemv_f32", ptrs[0], 128, ptrs[1], 1024, ptrs[2], 31, 2, 16, 64, unsupported=""
        )
    q = torch.zeros(4, 2, 64, dtype=torch.bfloat16)
    cache = torch.zeros(1, 8, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="do not fit"):  # a cache row of 8 positions, 4 + 6 claimed
        kernels._run(
            "codellama_prefill_attention_bf16",
            q.data_ptr(), q.numel(), cache.data_ptr(), cache.data_ptr(), cache.numel(),
            q.data_ptr(), q.numel(), None, 0, 1, 0, 6, 4, 2, 1, 64, 8, 8 * 64, 0.125, unsupported="",
        )  # fmt: skip
    x = torch.zeros(3, 2, 64, dtype=torch.bfloat16)
    angles = torch.zeros(2, 32)
    with pytest.raises(ValueError, match="do not fit"):  # angles for 2 tokens, 3 claimed
        kernels._run(
            "codellama_rotary_bf16",
            x.data_ptr(), x.numel(), angles.data_ptr(), angles.data_ptr(), angles.numel(),
            x.data_ptr(), x.numel(), 3, 2, 64, unsupported="",
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Many bf16 rows on a CPU without bf16 instructions: fp32 matmul on widened weight chunks
# ---------------------------------------------------------------------------------------------


def test_many_bf16_rows_are_the_fp32_product_rounded_once(variant):
    x, w = bf16_pair(20, kernels.WIDEN_ROWS * 2 + 37, 96, seed=9)  # three chunks, the last short
    out = kernels.linear(x.view(4, 5, 96), w).view(20, -1)
    assert kernels.widens_bf16_matmul(x, w) == (variant == "avx2")
    assert_within_bf16_rounding(out, x, w)
    if variant == "avx2":
        assert torch.equal(out, F.linear(x.float(), w.float()).to(torch.bfloat16))
    kernels.set_enabled(False)
    assert not kernels.widens_bf16_matmul(x, w)


def test_bf16_is_the_cpu_default_where_a_kernel_variant_runs(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(distributed.torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    expected = torch.bfloat16 if kernels.variant() is not None else torch.float32
    assert distributed.resolve_dtype(None, cpu) == expected
    kernels.set_enabled(False)  # torch's own bf16 matmul without bf16 instructions is slow
    assert distributed.resolve_dtype(None, cpu) == torch.float32
