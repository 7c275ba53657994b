"""Several weights multiplied by the same activations in one kernel call (bf16, int8, int4): each
output bit for bit what the weight's own call gives (and within bf16 rounding of fp64), the
checks of the fused entry points, and a model's decode step taking the fused calls for the
query/key/value and gate/up projections with unchanged logits."""

import pytest
import torch

from llama import kernels, model, quantization
from llama.quantization import QuantizedWeight, make_scheme
from tests.test_kernels import (  # noqa: F401 (fixtures)
    assert_within_bf16_rounding,
    bf16_model,
    kernels_enabled,
    variant,
)
from tests.test_quantized_kernels import assert_close_to_fp64, fp64_weight, quantize_model

CPU = torch.device("cpu")

# (output rows of each weight, inputs): a layer's q/k/v shapes (rows not multiples of the row
# blocks, a single row), inputs with a tail past the vector width, and MAX_FUSED weights.
BF16_CASES = [((64, 13, 7), 100), ((96, 32, 32), 2048), ((1, 5), 31), ((40, 40, 9, 3), 64)]


def random_bf16(rows: int, sizes, n_in: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n_in, generator=gen).to(torch.bfloat16)
    weights = [(torch.randn(n, n_in, generator=gen) * n_in**-0.5).to(torch.bfloat16) for n in sizes]
    return x, weights


@pytest.mark.parametrize("rows", range(1, kernels.MAX_ROWS + 1))
def test_fused_bf16_outputs_are_the_separate_kernel_calls_bit_for_bit(rows, variant):  # noqa: F811
    for case, (sizes, n_in) in enumerate(BF16_CASES):
        x, weights = random_bf16(rows, sizes, n_in, seed=rows * 10 + case)
        assert kernels.fused_linear_applies(x, weights)
        outs = kernels.fused_linear(x, weights)
        assert [tuple(o.shape) for o in outs] == [(rows, n) for n in sizes]
        for out, weight in zip(outs, weights):
            assert torch.equal(out, kernels.linear(x, weight))
            assert_within_bf16_rounding(out, x, weight)


def test_fused_bf16_keeps_leading_dims(variant):  # noqa: F811
    x, weights = random_bf16(6, (48, 16), 64, seed=3)
    outs = kernels.fused_linear(x.view(2, 3, 64), weights)
    for out, weight in zip(outs, weights):
        assert out.shape == (2, 3, weight.shape[0])
        assert torch.equal(out.reshape(6, -1), kernels.linear(x, weight))


def quantized_weights(mode: str, group, sizes, n_in: int, seed: int):
    scheme = make_scheme(mode, group)
    gen = torch.Generator().manual_seed(seed)
    result = []
    for n in sizes:
        weight = torch.randn(n, n_in, generator=gen) * n_in**-0.5 + torch.randn(n, 1, generator=gen) * 0.05
        parts = quantization.quantize(weight, scheme)
        result.append((parts, QuantizedWeight(parts, scheme, n_in, CPU)))
    return scheme, result


@pytest.mark.parametrize("rows", range(1, kernels.MAX_ROWS + 1))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "mode,group,n_in", [("int8", None, 100), ("int8", None, 2048), ("int4", 32, 96), ("int4", 64, 2048)]
)
def test_fused_quantized_outputs_are_the_separate_kernel_calls_bit_for_bit(
    rows, dtype, mode, group, n_in, variant  # noqa: F811
):
    sizes = (64, 13, 7, 1)
    scheme, weights = quantized_weights(mode, group, sizes, n_in, seed=rows)
    x = torch.randn(rows, n_in, generator=torch.Generator().manual_seed(rows)).to(dtype)
    quantized = [w for _, w in weights]
    assert quantization.fused_linear_applies(x, quantized)
    outs = quantization.fused_linear(x, quantized)
    assert [tuple(o.shape) for o in outs] == [(rows, n) for n in sizes]
    for out, (parts, weight) in zip(outs, weights):
        assert torch.equal(out, weight.linear(x))
        assert_close_to_fp64(out, x, fp64_weight(parts, scheme), mode)


def test_fusing_applies_only_where_every_separate_call_takes_the_kernel():
    x, weights = random_bf16(2, (16, 8), 64, seed=1)
    assert kernels.fused_linear_applies(x, weights)
    assert not kernels.fused_linear_applies(x, weights[:1])  # nothing to fuse
    assert not kernels.fused_linear_applies(x, weights * 3)  # more than MAX_FUSED
    assert kernels.fused_linear_applies(x.float(), [w.float() for w in weights])  # fp32 has the kernel too
    assert not kernels.fused_linear_applies(x.half(), [w.half() for w in weights])
    assert not kernels.fused_linear_applies(x.float(), [weights[0].float(), weights[1]])  # mixed dtypes
    assert not kernels.fused_linear_applies(x.repeat(5, 1), weights)  # more than MAX_ROWS rows
    assert not kernels.fused_linear_applies(x, [weights[0], weights[1][:, :32]])  # other inputs
    kernels.set_enabled(False)
    assert not kernels.fused_linear_applies(x, weights)
    kernels.set_enabled(True)
    _, int8 = quantized_weights("int8", None, (8, 8), 64, seed=1)
    _, int4 = quantized_weights("int4", 32, (8,), 64, seed=1)
    q8, q4 = [w for _, w in int8], [w for _, w in int4]
    assert not kernels.fused_linear_applies(x, q8)
    assert quantization.fused_linear_applies(x, q8)
    assert not quantization.fused_linear_applies(x, [q8[0], q4[0]])  # two schemes
    assert not quantization.fused_linear_applies(x.repeat(5, 1), q8)  # more than MAX_ROWS rows
    assert not quantization.fused_linear_applies(x, weights)


def test_fused_entry_points_refuse_tables_that_do_not_fit(variant):  # noqa: F811
    x, weights = random_bf16(2, (16, 8), 64, seed=2)
    out = torch.empty(2, 24, dtype=torch.bfloat16)

    def call(table_weights, sizes, out_len=None, count=None):
        table = kernels.fused_table(table_weights, sizes)
        count = len(table_weights) if count is None else count
        out_len = out.numel() if out_len is None else out_len
        kernels._run(
            "codellama_gemv_bf16_fused",
            x.data_ptr(), x.numel(), table, count, out.data_ptr(), out_len, 2, 64, unsupported="",
        )  # fmt: skip

    call(weights, [16, 8])
    assert torch.equal(out[:, 16:], kernels.linear(x, weights[1]))
    with pytest.raises(ValueError, match="do not fit"):  # the second weight claimed 9 rows
        call(weights, [16, 9])
    with pytest.raises(ValueError, match="do not fit"):  # an output of 24 columns, 47 elements
        call(weights, [16, 8], out_len=47)
    with pytest.raises(RuntimeError):  # no weight
        call(weights, [16, 8], count=0)
    with pytest.raises(ValueError, match="1 to 4 weights"):
        kernels.int8_gemv_fused(x, [])
    _, int8 = quantized_weights("int8", None, (8, 8), 64, seed=1)
    short = int8[1][1].scales[:4].clone()
    with pytest.raises(ValueError, match="do not fit"):  # 8 rows, 4 scales
        kernels.int8_gemv_fused(x, [(int8[0][1].codes, int8[0][1].scales), (int8[1][1].codes, short)])
    with pytest.raises(ValueError, match="share their inputs"):
        kernels.int8_gemv_fused(x, [(int8[0][1].codes, int8[0][1].scales), (int8[1][1].codes[:, :32], short)])


def count_calls(monkeypatch, *names: str) -> dict:
    """Count the calls of `kernels`' entry-point wrappers `names` from now on."""
    counts = {name: 0 for name in names}
    for name in names:
        original = getattr(kernels, name)

        def counted(*args, name=name, original=original):
            counts[name] += 1
            return original(*args)

        monkeypatch.setattr(kernels, name, counted)
    return counts


def decode(model_: model.Transformer, dtype: torch.dtype) -> torch.Tensor:
    """Prefill two rows (one step each, torch or kernel) and decode three steps with
    `forward_decode` (rows in a different order, different positions): the decode logits."""
    model_.allocate_cache(dtype, "cpu")
    prompts = [torch.randint(3, 300, (n,), generator=torch.Generator().manual_seed(n)) for n in (5, 11)]
    model_.forward_packed(prompts, last_only=True)
    rows, positions, token = torch.tensor([1, 0]), torch.tensor([11, 5]), torch.tensor([7, 9])
    steps = []
    for _ in range(3):
        logits = model_.forward_decode(token, rows, positions)
        steps.append(logits)
        token, positions = logits.argmax(-1), positions + 1
    return torch.stack(steps)


@torch.inference_mode()
def test_bf16_decode_step_takes_two_fused_calls_per_layer_with_the_same_logits(
    monkeypatch, variant  # noqa: F811
):
    bf16 = bf16_model(seed=3)
    counts = count_calls(monkeypatch, "_fused_gemv", "_gemv")
    fused = decode(bf16, torch.bfloat16)
    layers = len(bf16.layers)
    # Per decode step and layer: q/k/v and gate/up fused, wo and w2 alone; then the output layer
    # (and once in the prefill, for the prompts' last tokens).
    assert counts == {"_fused_gemv": 3 * 2 * layers, "_gemv": 3 * (2 * layers + 1) + 1}
    monkeypatch.setattr(kernels, "fused_linear_applies", lambda x, weights: False)
    separate = decode(bf16, torch.bfloat16)
    assert counts["_fused_gemv"] == 3 * 2 * layers  # no more fused calls
    assert torch.equal(fused, separate)


@pytest.mark.parametrize("mode,group", [("int8", None), ("int4", 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.inference_mode()
def test_quantized_decode_step_takes_two_fused_calls_per_layer_with_the_same_logits(
    mode, group, dtype, monkeypatch, variant  # noqa: F811
):
    quantized_model = bf16_model(seed=4).to(dtype)
    quantize_model(quantized_model, make_scheme(mode, group))
    fused_name, single_name = f"_gemv_{mode}_fused", f"_gemv_{mode}"
    counts = count_calls(monkeypatch, fused_name, single_name)
    fused = decode(quantized_model, dtype)
    layers = len(quantized_model.layers)
    assert counts[fused_name] == 3 * 2 * layers  # q/k/v and gate/up of every layer, every step
    singles_fused = counts[single_name]
    monkeypatch.setattr(quantization, "fused_linear_applies", lambda x, weights: False)
    separate = decode(quantized_model, dtype)
    assert counts[fused_name] == 3 * 2 * layers  # no more fused calls
    # The same prefill both times; separately, the 5 weights fused in a layer take 5 calls.
    assert counts[single_name] - singles_fused == singles_fused + 3 * 5 * layers
    assert torch.equal(fused, separate)


def test_fused_calls_trace_under_torch_compile(variant):  # noqa: F811
    """The fused calls are custom operators: a compiled function calling them gives the eager result."""
    x, weights = random_bf16(2, (40, 8), 128, seed=6)
    _, int8 = quantized_weights("int8", None, (40, 8), 128, seed=6)
    _, int4 = quantized_weights("int4", 32, (40, 8), 128, seed=6)
    q8, q4 = [w for _, w in int8], [w for _, w in int4]

    def step(x):
        return (
            *kernels.fused_linear(x, weights),
            *quantization.fused_linear(x, q8),
            *quantization.fused_linear(x, q4),
        )

    try:
        compiled = torch.compile(step, fullgraph=True)
        with torch.inference_mode():
            for got, want in zip(compiled(x), step(x)):
                assert torch.equal(got, want)
    finally:
        torch._dynamo.reset()
