"""The hand-written int8/int4 matrix-vector kernels (every instruction-set variant this CPU runs)
against fp64 recomputations from the dequantized weights, the path a quantized layer takes on
this CPU, and a quantized model's decode steps against the same model with dequantized weights."""

import pytest
import torch

from llama import int4_pack, kernel_build, kernels, layout, quantization, quantized_backends
from llama.quantization import QuantizedWeight, make_scheme
from tests.test_kernels import bf16_model, kernels_enabled, variant  # noqa: F401 (fixtures)

CPU = torch.device("cpu")

# (out_features, in_features): a single output row, row counts that are not multiples of the
# kernels' row blocks, inputs that are not a multiple of the vector width (int8), and int4 rows
# whose groups fill no block, one block, or blocks and a shorter last block.
INT8_SHAPES = [(37, 100), (300, 96), (64, 2048), (1, 31), (9, 33), (5, 5632)]
INT4_SHAPES = [
    (48, 96, 32),
    (70, 192, 64),
    (9, 384, 128),
    (3, 2048, 32),
    (33, 640, 128),
    (17, 1056, 32),
    (5, 5632, 64),
    (1, 64, 64),
]


def fp64_weight(parts, scheme) -> torch.Tensor:
    """The weight the stored parts stand for, in fp64, from the layout's definition."""
    codes = parts["weight"]
    if scheme.mode == "int8":
        return codes.double() * parts["scales"].double()[:, None]
    values = torch.empty(codes.shape[0], codes.shape[1] * 2, dtype=torch.float64)
    values[:, 0::2] = (codes % 16).double()
    values[:, 1::2] = (codes // 16).double()
    group = scheme.group_size
    scales = parts["scales"].double().repeat_interleave(group, dim=1)
    zeros = parts["zeros"].double().repeat_interleave(group, dim=1)
    return (values - 8) * scales + zeros


def assert_close_to_fp64(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mode: str) -> None:
    """`out` is x @ weight^T computed in fp32 and rounded once to x's dtype: bf16 outputs within
    half a bf16 step (2**-8 relative), plus the fp32 arithmetic's error relative to the sum of the
    products' magnitudes (int4 meets fp32 activations as two bf16 parts, 16 significant bits)."""
    exact = x.double() @ weight.T
    magnitude = x.double().abs() @ weight.abs().T
    rounding = 2**-8 if x.dtype == torch.bfloat16 else 0.0
    arithmetic = 2**-16 if mode == "int4" else 2**-20
    allowed = exact.abs() * rounding + magnitude * arithmetic
    error = (out.double() - exact).abs()
    assert out.dtype == x.dtype
    assert (error <= allowed).all(), f"max excess error {(error - allowed).max().item():.3g}"


def quantized(out_features: int, in_features: int, mode: str, group: int = None, seed: int = 0):
    scheme = make_scheme(mode, group)
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=gen) * in_features**-0.5
    weight += torch.randn(out_features, 1, generator=gen) * 0.05  # groups whose zero is not 0
    parts = quantization.quantize(weight, scheme)
    return parts, scheme, QuantizedWeight(parts, scheme, in_features, CPU)


@pytest.mark.parametrize("rows", range(1, kernels.MAX_ROWS + 1))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_kernel_matches_fp64(rows, dtype, variant):  # noqa: F811
    for n_out, n_in in INT8_SHAPES:
        parts, scheme, weight = quantized(n_out, n_in, "int8", seed=rows)
        x = torch.randn(rows, n_in, generator=torch.Generator().manual_seed(n_in)).to(dtype)
        assert weight.path(x) == "kernel", (n_out, n_in)
        assert_close_to_fp64(weight.linear(x), x, fp64_weight(parts, scheme), "int8")


@pytest.mark.parametrize("rows", range(1, kernels.MAX_ROWS + 1))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_kernel_matches_fp64(rows, dtype, variant):  # noqa: F811
    for n_out, n_in, group in INT4_SHAPES:
        parts, scheme, weight = quantized(n_out, n_in, "int4", group, seed=rows)
        x = torch.randn(rows, n_in, generator=torch.Generator().manual_seed(n_in)).to(dtype)
        assert weight.path(x) == "kernel", (n_out, n_in, group)
        assert_close_to_fp64(weight.linear(x), x, fp64_weight(parts, scheme), "int4")


@pytest.mark.parametrize("mode,group", [("int8", None), ("int4", 32), ("int4", 128)])
def test_rows_do_not_depend_on_their_batch_or_the_thread_count(mode, group, variant):  # noqa: F811
    _, _, weight = quantized(75, 640, mode, group)
    x = torch.randn(kernels.MAX_ROWS, 640, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    together = weight.linear(x)
    for row in range(x.shape[0]):
        assert torch.equal(weight.linear(x[row : row + 1]), together[row : row + 1])
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = weight.linear(x)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(one, together)


def test_int4_leading_dims_and_rows_beyond_the_kernel_in_passes(variant):  # noqa: F811
    """[B, L, K] activations keep their leading dims; 20 rows (up to `CPU_OP_MAX_ROWS`) run the
    int4 kernel in passes, each row as if alone."""
    parts, scheme, weight = quantized(40, 256, "int4", 64)
    x = torch.randn(4, 5, 256, generator=torch.Generator().manual_seed(5))
    assert weight.path(x) == "kernel"
    out = weight.linear(x)
    assert out.shape == (4, 5, 40)
    assert_close_to_fp64(out.view(20, 40), x.view(20, 256), fp64_weight(parts, scheme), "int4")
    assert torch.equal(out[1, 2], weight.linear(x[1, 2:3])[0])


@pytest.mark.parametrize("mode,group", [("int8", None), ("int4", 64)])
def test_the_kernel_path_is_taken_on_this_cpu(mode, group, monkeypatch):
    """On a CPU that runs a kernel variant, decode-sized calls multiply with the kernel: never
    torch's weight-only operator, never a dequantized weight. Fails on a silent fallback."""
    if not kernel_build.cpu_variants():
        pytest.skip("this CPU runs no kernel variant")
    assert kernels.kernel_available(), "a kernel variant is listed for this CPU but was not built"
    parts, scheme, weight = quantized(96, 256, mode, group)
    assert weight.backend.name == f"codellama-{mode}-cpu" and weight.backend.kernel == mode
    if mode == "int4":  # only the kernels' packing is kept: 4 bits a weight and 4 bytes a group
        assert weight.kernel_packed and [name for name, _ in weight.named_buffers()] == ["codes"]
        assert weight.codes.shape == (int4_pack.padded_rows(96), int4_pack.kernel_row_bytes(256, 64))
    calls = []
    for name in ("int8_gemv", "int4_gemv"):
        original = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, f=original, n=name: calls.append(n) or f(*a))
    monkeypatch.setattr(quantization, "dequantize", lambda *a, **k: pytest.fail("dequantized the weight"))
    monkeypatch.setattr(QuantizedWeight, "_int4_op", lambda *a, **k: pytest.fail("took torch's int4 op"))
    for rows in (1, 3, kernels.MAX_ROWS):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(rows, 256).to(dtype)
            assert weight.uses_kernel(x) and not weight.uses_op(x)
            assert_close_to_fp64(weight.linear(x), x, fp64_weight(parts, scheme), mode)
    assert calls == [f"{mode}_gemv"] * 6


@pytest.mark.parametrize("mode,group", [("int8", None), ("int4", 64)])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_activation_spoils_its_row_only(mode, group, bad, variant):  # noqa: F811
    """As in torch's product, a NaN or infinite activation makes its row's outputs non-finite (the
    int8 kernel scales each row by its largest value), and leaves the other rows as they were."""
    parts, scheme, weight = quantized(24, 192, mode, group)
    x = torch.randn(3, 192, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    clean = weight.linear(x)
    x[1, 17] = bad
    out = weight.linear(x)
    assert not torch.isfinite(out[1]).any()
    assert torch.equal(out[[0, 2]], clean[[0, 2]])


@pytest.mark.parametrize("mode,group", [("int8", None), ("int4", 32)])
def test_more_rows_keep_torch_or_dequantize(mode, group):
    parts, scheme, weight = quantized(64, 128, mode, group)
    many = torch.randn(quantized_backends.CPU_OP_MAX_ROWS + 1, 128)
    assert weight.path(many) == "dequantize"
    assert_close_to_fp64(weight.linear(many), many, fp64_weight(parts, scheme), "int8")  # fp32 weights
    middle = torch.randn(kernels.MAX_ROWS + 1, 128)
    assert weight.path(middle) == ("op" if mode == "int8" else "kernel")
    with torch.no_grad():  # outside the kernels' domain: autograd, or the kernels turned off
        assert weight.path(torch.randn(1, 128, requires_grad=True)) == "kernel"
    assert weight.path(torch.randn(1, 128, requires_grad=True)) != "kernel"
    kernels.set_enabled(False)
    try:
        assert weight.path(torch.randn(1, 128)) == ("op" if mode == "int8" else "dequantize")
    finally:
        kernels.set_enabled(True)


@pytest.mark.parametrize("mode,group", [("int8", None), ("int4", 32), ("int4", 64)])
def test_kernel_packing_reads_back_the_stored_parts(mode, group):
    parts, scheme, weight = quantized(70, 448, mode, group)
    for name, tensor in parts.items():
        assert torch.equal(weight.parts()[name], tensor), name
    plain = QuantizedWeight(parts, scheme, 448, CPU, torch_ops=False)
    assert torch.equal(weight.dequantize(torch.float32), plain.dequantize(torch.float32))
    # bf16: each fp32 weight rounded once
    assert torch.equal(weight.dequantize(torch.bfloat16), weight.dequantize(torch.float32).to(torch.bfloat16))


def test_kernels_refuse_buffers_that_do_not_fit(variant):  # noqa: F811
    parts, scheme, weight = quantized(16, 128, "int4", 32)
    x = torch.randn(1, 128)
    with pytest.raises(ValueError, match="do not fit"):
        kernels.int4_gemv(x, weight.codes[:15].clone(), 16, 128, 32)  # a row short
    with pytest.raises(ValueError, match="activations of 100 features"):
        kernels.int4_gemv(torch.randn(1, 100), weight.codes, 16, 128, 32)
    with pytest.raises(RuntimeError, match="groups of 48"):
        kernels.int4_gemv(x[:, :96], weight.codes, 16, 96, 48)
    int8 = quantization.quantize(torch.randn(16, 128), make_scheme("int8"))
    with pytest.raises(ValueError, match="do not fit"):
        kernels.int8_gemv(x, int8["weight"], int8["scales"][:8].clone())
    with pytest.raises(RuntimeError, match="9 rows"):
        kernels.int8_gemv(torch.randn(9, 128), int8["weight"], int8["scales"])
    with pytest.raises(ValueError, match="groups of a multiple of 8 inputs dividing 96"):
        int4_pack.kernel_pack(torch.zeros(4, 48, dtype=torch.uint8), *torch.zeros(2, 4, 1), 64)


def quantize_model(model, scheme) -> None:
    """Replace every linear weight of `model` by a `QuantizedWeight` (the kernels' backend)."""
    for key, _ in list(model.named_parameters()):
        if layout.is_linear_weight(key):
            module_name, _, name = key.rpartition(".")
            module = model.get_submodule(module_name)
            tensor = getattr(module, name)
            weight = QuantizedWeight(quantization.quantize(tensor, scheme), scheme, tensor.shape[1], CPU)
            delattr(module, name)
            setattr(module, name, weight)


def dequantize_model(model, dtype) -> None:
    """Replace every `QuantizedWeight` of `model` by a plain parameter holding its dequantized
    weight in `dtype` (torch's F.linear then multiplies)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, QuantizedWeight):
                delattr(module, name)
                setattr(module, name, torch.nn.Parameter(child.dequantize(dtype), requires_grad=False))


@pytest.mark.parametrize("mode,group", [("int8", None), ("int4", 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.inference_mode()
def test_quantized_model_decodes_like_its_dequantized_weights(mode, group, dtype, variant):  # noqa: F811
    """Decode steps of 3 rows (every linear call a kernel call) give the logits of the same model
    with the dequantized weights multiplied by torch."""
    scheme = make_scheme(mode, group)
    quantized_model = bf16_model(seed=1).to(dtype)
    quantize_model(quantized_model, scheme)
    reference = bf16_model(seed=1).to(dtype)
    quantize_model(reference, scheme)
    dequantize_model(reference, dtype)
    tokens = torch.randint(3, 300, (3, 6), generator=torch.Generator().manual_seed(2))
    logits = {}
    for label, model in (("kernels", quantized_model), ("dequantized", reference)):
        model.allocate_cache(dtype, "cpu")
        steps = [model(tokens[:, i : i + 1], i, last_only=True) for i in range(tokens.shape[1])]
        logits[label] = torch.cat(steps, dim=1).float()
    weights = [m for m in quantized_model.modules() if isinstance(m, QuantizedWeight)]
    assert len(weights) == 2 * 7 + 1 and all(w.backend.kernel == mode for w in weights)
    scale = logits["dequantized"].abs().max()
    # fp32: the two differ by fp32 arithmetic only; bf16: by bf16 roundings of intermediates.
    limit = 1e-4 if dtype == torch.float32 else 0.05
    assert (logits["kernels"] - logits["dequantized"]).abs().max() <= limit * scale
    if dtype == torch.float32:
        assert torch.equal(logits["kernels"].argmax(-1), logits["dequantized"].argmax(-1))


def test_quantized_kernels_trace_under_torch_compile(variant):  # noqa: F811
    """The kernels are custom operators: a compiled function calling them gives the eager result."""
    _, _, int8 = quantized(40, 128, "int8")
    _, _, int4 = quantized(40, 128, "int4", 32)
    x = torch.randn(2, 128).to(torch.bfloat16)

    def step(x):
        return int8.linear(x), int4.linear(x)

    try:
        compiled = torch.compile(step, fullgraph=True)
        with torch.inference_mode():
            for got, want in zip(compiled(x), step(x)):
                assert torch.equal(got, want)
    finally:
        torch._dynamo.reset()
