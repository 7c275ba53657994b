"""The RMSNorm kernel: bit for bit the torch operations of `llama.model.RMSNorm` (fp32 values and
bf16 result), within fp32 rounding of an fp64 recomputation for either order of torch's sum, and
the model's norms taking it with unchanged logits."""

import pytest
import torch

from llama import kernels, model
from tests.test_kernels import bf16_model, kernels_enabled, variant  # noqa: F401 (fixtures)

DIMS = [16, 64, 96, 100, 2048, 5120, 17, kernels.RMS_NORM_MAX_DIM]


def rows_of(rows: int, dim: int, seed: int) -> torch.Tensor:
    """bf16 rows whose magnitudes differ from row to row (1e-3 to 30)."""
    gen = torch.Generator().manual_seed(seed)
    scale = 10 ** (torch.rand(rows, 1, generator=gen) * 4.5 - 3)
    return (torch.randn(rows, dim, generator=gen) * scale).to(torch.bfloat16)


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("rows", [1, 3, 40])
def test_rms_norm_kernel_is_the_torch_formula_bit_for_bit(dim, rows, variant):  # noqa: F811
    x = rows_of(rows, dim, seed=dim + rows)
    weight = torch.randn(dim, generator=torch.Generator().manual_seed(dim)).to(torch.bfloat16)
    assert kernels.rms_norm_applies(x, weight)
    normed = torch.empty(rows, dim)
    out = kernels.rms_norm(x, weight, 1e-5, normed)
    want = model.normalize(x.float(), 1e-5)
    assert torch.equal(normed, want)
    assert torch.equal(out, want.type_as(x) * weight)


@pytest.mark.parametrize("lanes", [8, 16])
def test_rms_norm_kernel_matches_fp64_for_either_sum_order(lanes, variant):  # noqa: F811
    x = rows_of(5, 2048, seed=lanes)
    weight = torch.ones(2048, dtype=torch.bfloat16)
    out, normed = torch.empty_like(x), torch.empty(5, 2048)
    kernels._run(
        "codellama_rms_norm_bf16",
        x.data_ptr(), x.numel(), weight.data_ptr(), 2048, out.data_ptr(), out.numel(),
        normed.data_ptr(), normed.numel(), 5, 2048, 1e-5, lanes, unsupported="",
    )  # fmt: skip
    xd = x.double()
    exact = xd / (xd.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()
    # A sum of 2048 fp32 terms and a few roundings: well within 2^-18 relative.
    assert ((normed.double() - exact).abs() <= exact.abs() * 2**-18).all()
    with pytest.raises(RuntimeError):  # torch has no 4-lane fp32 vectors here
        kernels._run(
            "codellama_rms_norm_bf16",
            x.data_ptr(), x.numel(), weight.data_ptr(), 2048, out.data_ptr(), out.numel(),
            None, 0, 5, 2048, 1e-5, 4, unsupported="",
        )  # fmt: skip


def test_rms_norm_kernel_refuses_buffers_that_do_not_fit(variant):  # noqa: F811
    x = rows_of(2, 64, seed=1)
    with pytest.raises(ValueError, match="do not fit"):  # a weight of 32 for rows of 64
        kernels.rms_norm(x, torch.ones(32, dtype=torch.bfloat16), 1e-5)
    with pytest.raises(ValueError, match="contiguous fp32"):
        kernels.rms_norm(
            x, torch.ones(64, dtype=torch.bfloat16), 1e-5, torch.empty(2, 64, dtype=torch.bfloat16)
        )


def test_rms_norm_kernel_applies_to_bf16_rows_it_sums_like_torch_only():
    x, weight = rows_of(2, 64, seed=2), torch.ones(64, dtype=torch.bfloat16)
    assert kernels.rms_norm_applies(x, weight)
    assert not kernels.rms_norm_applies(x.float(), weight.float())
    assert not kernels.rms_norm_applies(x, weight[:32])
    long_rows = torch.ones(1, kernels.RMS_NORM_MAX_DIM + 1, dtype=torch.bfloat16)
    assert not kernels.rms_norm_applies(long_rows, long_rows[0])  # torch splits that sum over threads
    kernels.set_enabled(False)
    assert not kernels.rms_norm_applies(x, weight)


def test_norm_falls_back_to_torch_when_the_kernel_disagrees_here(monkeypatch, variant):  # noqa: F811
    model.norm_kernel_agrees.cache_clear()
    monkeypatch.setattr(kernels, "rms_norm", lambda x, weight, eps, normed=None: torch.zeros_like(x))
    try:
        with pytest.warns(RuntimeWarning, match="does not reproduce torch's sum"):
            assert not model.norm_kernel_agrees(64, 1e-6, kernels.variant())
        norm = model.RMSNorm(64).to(torch.bfloat16).requires_grad_(False)  # eps 1e-6
        x = rows_of(3, 64, seed=3)
        assert kernels.rms_norm_applies(x, norm.weight)
        assert torch.equal(norm(x), model.normalize(x.float(), norm.eps).type_as(x) * norm.weight)
    finally:
        model.norm_kernel_agrees.cache_clear()


@torch.inference_mode()
def test_model_norms_take_the_kernel_with_unchanged_logits(monkeypatch, variant):  # noqa: F811
    bf16 = bf16_model(seed=5)
    assert model.norm_kernel_agrees(bf16.params.dim, bf16.params.norm_eps, kernels.variant())  # checked once
    calls = []
    kernel = kernels.rms_norm
    monkeypatch.setattr(kernels, "rms_norm", lambda *args: calls.append(1) or kernel(*args))
    tokens = torch.randint(3, 300, (2, 5), generator=torch.Generator().manual_seed(5))

    def run() -> torch.Tensor:
        bf16.allocate_cache(torch.bfloat16, "cpu")
        prefill = bf16(tokens, 0)
        step = bf16.forward_decode(torch.tensor([4, 8]), torch.tensor([1, 0]), torch.tensor([5, 5]))
        return torch.cat([prefill.flatten(), step.flatten()])

    with_kernel = run()
    assert len(calls) == 2 * (2 * len(bf16.layers) + 1)  # every norm of the prefill and the step
    monkeypatch.setattr(kernels, "rms_norm_applies", lambda x, weight: False)
    assert torch.equal(run(), with_kernel)
    assert len(calls) == 2 * (2 * len(bf16.layers) + 1)
