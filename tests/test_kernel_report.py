"""`python -m llama.kernels`: the instruction sets of this CPU, the variants proven by running, the
selected variant and the path of every operation per dtype, as the model takes them."""

import os
import subprocess
import sys
from pathlib import Path

import torch

from llama import alignment, kernel_build, kernel_report, kernels, quantization

REPO = Path(__file__).resolve().parents[1]


def run_report(*args, **env) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(REPO), **env}
    for name, value in env.items():
        if value is None:
            environment.pop(name)
    return subprocess.run(
        [sys.executable, "-m", "llama.kernels", *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
        env=environment,
    )


def test_report_names_instruction_sets_proofs_variant_and_paths():
    result = run_report(CODELLAMA_KERNEL_VARIANT=None, CODELLAMA_KERNELS=None)
    assert result.returncode == 0, result.stderr
    assert "RuntimeWarning" not in result.stderr  # the module runs once, not twice
    out = result.stdout
    flags = kernel_build.cpu_flags()
    for name in kernel_report.INSTRUCTION_SETS:
        assert (f" {name} " in out or f" {name}\n" in out) if name in flags else f"{name} (no)" in out
    runnable = kernel_build.cpu_variants()
    for variant in kernel_build.VARIANTS:
        line = next(line for line in out.splitlines() if line.strip().startswith(f"{variant}:"))
        assert line.endswith(": ran") == (variant in runnable), line
    if "avx2" in flags and "fma" in flags:
        assert f"selected kernel variant: {runnable[0]}" in out
        for dtype in ("bf16", "fp32"):
            gemv_line = f"decode GEMV (1-8 rows)            {dtype}         codellama gemv kernel"
            assert f"{gemv_line} ({runnable[0]})" in out
    for operation in ("decode GEMV", "dense matmul", "decode attention", "prefill attention", "rotary"):
        assert (
            sum(line.strip().startswith(operation) for line in out.splitlines()) == 2
        ), operation  # fp32, bf16
    for mode in ("int8", "int4"):  # fp32/bf16 activations, 1/64/512 rows
        assert sum(f"{mode} x " in line for line in out.splitlines()) == 6, mode
        if runnable:  # the hand-written kernels for decoding
            assert (
                f"{mode} linear, 1 row                {mode} x bf16  codellama {mode} kernel ({runnable[0]}"
                in out
            )
        # More rows than the weight-only operators are measured to win for: dequantize, except that
        # torch's int8 operator (the same stored codes) beats torch's bf16 matmul on a CPU without
        # bf16 instructions. The int4 kernel packing has no torch operator.
        takes_int8_op = mode == "int8" and "avx512bf16" not in runnable
        many_rows = "aten._weight_int8pack_mm" if takes_int8_op else "dequantize the whole weight"
        assert f"{mode} linear, 512 rows             {mode} x bf16  {many_rows}" in out
    if runnable:  # attention reads every cache in place: fp32, bf16, int8 codes
        for kind in ("decode", "prefill"):
            for dtype in ("fp32", "bf16"):
                assert (
                    f"{kind} attention".ljust(34) + f"{dtype}         codellama {kind}-attention kernel"
                    in out
                )
            assert f"int8 KV cache: {kind} attention".ljust(34) + "bf16         codellama int8-cache" in out
    if not runnable:
        assert "aten._weight_int4pack_mm_for_cpu (bf16 activations)" in out  # torch's int4 fast path
    assert "FALLBACK" not in out
    for operation in ("bf16 matmul (oneDNN)", "aten._weight_int8pack_mm", "round trip"):
        assert any(operation in line and line.endswith(": ran") for line in out.splitlines()), operation
    assert "aten._weight_int4pack_mm at every row count" in out  # the CUDA table
    placement = "on transparent huge pages" if alignment.huge_pages_available() else "base pages"
    assert any(line.startswith("weight placement: ") and placement in line for line in out.splitlines())


def test_report_follows_the_variant_override_and_the_off_switch():
    forced = run_report("--no-torch-proof", CODELLAMA_KERNEL_VARIANT="avx2", CODELLAMA_KERNELS=None)
    assert forced.returncode == 0, forced.stderr
    if "avx2" in kernel_build.cpu_variants():
        assert "selected kernel variant: avx2 (CODELLAMA_KERNEL_VARIANT=avx2)" in forced.stdout
    off = run_report("--no-torch-proof", CODELLAMA_KERNELS="0", CODELLAMA_KERNEL_VARIANT=None)
    assert off.returncode == 0, off.stderr
    assert "kernels turned off (CODELLAMA_KERNELS=0)" in off.stdout
    assert "codellama gemv kernel" not in off.stdout
    assert "int4 linear, 1 row                int4 x bf16  dequantize the whole weight" in off.stdout


def test_reported_quantized_paths_are_the_ones_taken(monkeypatch):
    """The report's int4 line at one row names the kernel (or torch's op where no variant runs);
    a forward of one row takes it and does not dequantize."""
    calls = []
    monkeypatch.setattr(quantization.QuantizedWeight, "dequantize", lambda *a, **k: calls.append(1))
    kernels.set_enabled(True)
    path = kernel_report._quantized_path("int4", 1, torch.bfloat16)
    if kernels.kernel_available():
        assert path.startswith(f"codellama int4 kernel ({kernels.variant()}")
        gemv = kernels.int4_gemv
        monkeypatch.setattr(kernels, "int4_gemv", lambda *a: calls.append("kernel") or gemv(*a))
    else:
        assert path.startswith("aten._weight_int4pack_mm_for_cpu")
    scheme = quantization.make_scheme("int4", 32)
    weight = quantization.QuantizedWeight(
        quantization.quantize(torch.randn(64, 64), scheme), scheme, 64, torch.device("cpu")
    )
    weight.linear(torch.randn(1, 64, dtype=torch.bfloat16))
    assert calls == (["kernel"] if kernels.kernel_available() else [])
