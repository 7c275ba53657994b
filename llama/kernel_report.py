"""What this machine runs: the CPU's instruction sets, which of them were proven by running code,
the kernel variant in use, and the path each operation takes per dtype (`python -m llama.kernels`;
the benchmarks print it next to their numbers).

Every path is read from the same decision functions the model calls (`llama.kernels`,
`llama.quantization`), on small tensors, so the report cannot drift from what runs. torch's own
operations that may use instructions the CPU lists (oneDNN's bf16 matmul uses AMX where the CPU
offers it; the weight-only kernels) are run once in a child process, so an illegal instruction is
reported instead of killing this one.
"""

import argparse
import os
import platform
import subprocess
import sys
from typing import List, Optional, Tuple

import torch

from llama import alignment, int4_pack, kernel_build, kernels, kv_cache, quantization, quantized_backends

# Instruction sets worth knowing for these kernels and torch's, as /proc/cpuinfo names them.
INSTRUCTION_SETS = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx_vnni",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)

# Run in a child process by `torch_proofs`: each step prints its name before and "ok" after, so a
# step that kills the process is the last one named.
_TORCH_PROOF_SCRIPT = r"""
import torch
torch.set_num_threads(1)
def step(name, run):
    print("start", name, flush=True)
    run()
    print("ok", name, flush=True)
a = torch.randn(64, 256).to(torch.bfloat16)
step("bf16 matmul (oneDNN)", lambda: torch.mm(a, a.T))
codes = torch.randint(-127, 128, (64, 256), dtype=torch.int8)
scales = torch.ones(64, dtype=torch.bfloat16)
step("aten._weight_int8pack_mm", lambda: torch.ops.aten._weight_int8pack_mm(a, codes, scales))
def int4():
    from llama import int4_pack
    usable, found = int4_pack.cpu_round_trip()
    assert usable, found
step("aten._weight_int4pack_mm_for_cpu round trip", int4)
"""


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo, else what `platform` says."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def torch_proofs() -> List[Tuple[str, str]]:
    """(operation, "ran" or what happened) for torch's operations that depend on the CPU's
    instruction sets, each run once on small inputs in a child process."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
    try:
        child = subprocess.run(
            [sys.executable, "-c", _TORCH_PROOF_SCRIPT], capture_output=True, text=True, timeout=300, env=env
        )
    except (OSError, subprocess.SubprocessError) as err:
        return [("torch operations", f"not checked: {err}")]
    results, started = [], None
    for line in child.stdout.splitlines():
        word, _, name = line.partition(" ")
        if word == "start":
            started = name
        elif word == "ok":
            results.append((name, "ran"))
            started = None
    if started is not None:
        if child.returncode < 0:
            why = f"killed by {kernel_build.signal_name(-child.returncode)}"
        else:
            why = (child.stderr.strip().splitlines() or ["failed"])[-1][:200]
        results.append((started, f"FAILED: {why}"))
    return results


def _dense_paths(rows: int, dtype: torch.dtype) -> str:
    x, w = torch.zeros(rows, 64, dtype=dtype), torch.zeros(32, 64, dtype=dtype)
    if kernels.kernel_applies(x, w):
        return f"codellama gemv kernel ({kernels.variant()})"
    if kernels.widens_bf16_matmul(x, w):
        return f"torch fp32 F.linear on bf16 weights widened {kernels.WIDEN_ROWS} rows at a time"
    return f"torch F.linear ({str(dtype).removeprefix('torch.')})"


def _attention_path(dtype: torch.dtype, prefill: bool) -> str:
    if prefill:
        q, cache = torch.zeros(4, 2, 128, dtype=dtype), torch.zeros(1, 8, 128, dtype=dtype)
        used = kernels.prefill_attention_applies(q, cache)
    else:
        q, cache = torch.zeros(1, 2, 128, dtype=dtype), torch.zeros(1, 1, 8, 128, dtype=dtype)
        used = kernels.attention_applies(q, cache)
    name = "prefill" if prefill else "decode"
    return (
        f"codellama {name}-attention kernel ({kernels.variant()})"
        if used
        else "torch scaled_dot_product_attention"
    )


def _int8_cache_attention_path(dtype: torch.dtype, prefill: bool) -> str:
    cache = kv_cache.Int8KVCache(1, 1, 8, 128, dtype, torch.device("cpu"))
    if prefill:
        used = cache.prefill_kernel_applies(torch.zeros(4, 2, 128, dtype=dtype))
    else:
        used = cache.decode_kernel_applies(torch.zeros(1, 2, 128, dtype=dtype))
    name = "prefill" if prefill else "decode"
    if used:
        return f"codellama int8-cache {name}-attention kernel ({kernels.variant()}), in place"
    return "dequantize the visible positions, then torch scaled_dot_product_attention"


def _rotary_path(dtype: torch.dtype) -> str:
    x = torch.zeros(1, 4, 2, 64, dtype=dtype)
    used = kernels.rotary_applies(x, torch.zeros(1, 4, 1, 32))
    return f"codellama rotary kernel ({kernels.variant()})" if used else "torch elementwise operations"


def _decode_step_path(dtype: torch.dtype) -> str:
    """How an eager decode step on one rank with a cache in `dtype` runs its layers (`llama.fused_decode`)."""
    x, weight = torch.zeros(1, 1, 128, dtype=dtype), torch.zeros(128, 128, dtype=dtype)
    queries, cache = torch.zeros(1, 1, 2, 64, dtype=dtype), torch.zeros(1, 1, 64, 64, dtype=dtype)
    one_call = (
        dtype == torch.bfloat16
        and kernels.kernel_applies(x, weight)
        and kernels.rms_norm_applies(x, weight[0])
        and kernels.rotary_applies(queries, torch.zeros(1, 1, 1, 32))
        and kernels.attention_applies(queries[:, 0], cache)
    )
    if one_call:
        return f"one codellama decode-layer call per layer ({kernels.variant()}), silu(gate) * up by torch"
    return "layer by layer: one call per operation above"


def _quantized_path(mode: str, rows: int, dtype: torch.dtype) -> str:
    scheme = quantization.make_scheme(mode, 32 if mode == "int4" else None)
    parts = quantization.quantize(torch.zeros(64, 64), scheme)
    weight = quantization.QuantizedWeight(parts, scheme, 64, torch.device("cpu"), torch_ops=kernels.enabled())
    path = weight.path(torch.zeros(rows, 64, dtype=dtype))
    if path == "kernel":
        passes = f", in passes of {kernels.MAX_ROWS} rows" if rows > kernels.MAX_ROWS else ""
        return f"codellama {mode} kernel ({kernels.variant()}, {str(dtype).removeprefix('torch.')}{passes})"
    if path == "op":
        return f"{weight.backend.op} (bf16 activations)"
    return f"dequantize the whole weight to {str(dtype).removeprefix('torch.')}, then F.linear"


def operation_paths() -> List[Tuple[str, str, str]]:
    """(operation, dtype, path) for every operation and dtype, on this CPU as configured now."""
    paths = []
    for dtype, label in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        paths.append(("decode GEMV (1-8 rows)", label, _dense_paths(1, dtype)))
        paths.append(("dense matmul (prefill, 512 rows)", label, _dense_paths(512, dtype)))
        paths.append(("decode attention", label, _attention_path(dtype, prefill=False)))
        paths.append(("prefill attention", label, _attention_path(dtype, prefill=True)))
        paths.append(("rotary", label, _rotary_path(dtype)))
        paths.append(("decode step (1-8 rows, one rank)", label, _decode_step_path(dtype)))
        paths.append(("int8 KV cache: decode attention", label, _int8_cache_attention_path(dtype, False)))
        paths.append(("int8 KV cache: prefill attention", label, _int8_cache_attention_path(dtype, True)))
    for mode in ("int8", "int4"):
        for act, act_label in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
            for rows in (1, 64, 512):
                paths.append(
                    (
                        f"{mode} linear, {rows} row{'s' if rows > 1 else ''}",
                        f"{mode} x {act_label}",
                        _quantized_path(mode, rows, act),
                    )
                )
    return paths


def report(prove_torch: bool = True) -> str:
    """The whole report as text (see the module docstring); `prove_torch` runs torch's operations
    in a child process (a few seconds)."""
    flags = kernel_build.cpu_flags()
    lines = [
        f"CPU: {cpu_name()} ({platform.machine()}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        "instruction sets (/proc/cpuinfo): "
        + " ".join(f"{name}{'' if name in flags else ' (no)'}" for name in INSTRUCTION_SETS),
        "kernel variants (proven by running a test call in a child process):",
    ]
    for name in kernel_build.VARIANTS:
        refused = kernel_build.prove(name)
        lines.append(f"  {name}: {'ran' if refused is None else 'not used: ' + refused}")
    forced = os.environ.get("CODELLAMA_KERNEL_VARIANT")
    selected = kernels.variant() if kernels.enabled() else None
    lines.append(
        f"selected kernel variant: {selected or 'none (torch operations only)'}"
        + (f" (CODELLAMA_KERNEL_VARIANT={forced})" if forced else " (CODELLAMA_KERNEL_VARIANT unset)")
        + ("" if kernels.enabled() else "; kernels turned off (CODELLAMA_KERNELS=0)")
    )
    if prove_torch:
        lines.append("torch operations (run once in a child process):")
        lines += [f"  {name}: {result}" for name, result in torch_proofs()]
    layout = int4_pack.cpu_layout()
    lines.append(
        "torch's CPU int4 packing read back as: "
        + (layout.name if layout is not None else "unknown layout (codes read back through the kernel)")
    )
    lines.append(f"weight placement: {weight_placement()}")
    lines.append("quantized-linear backends on this CPU:")
    lines += [f"  {line}" for line in quantized_backends.describe("cpu")]
    lines.append("quantized-linear backends on CUDA (the table; not run here):")
    lines += [f"  {line}" for line in _cuda_table()]
    lines.append("paths per operation and dtype:")
    width = max(len(op) for op, _, _ in operation_paths())
    for operation, dtype, path in operation_paths():
        lines.append(f"  {operation:<{width}}  {dtype:<11}  {path}")
    return "\n".join(lines)


def weight_placement() -> str:
    """Where loading puts the linear layers' weights on the CPU (`alignment.place_weight`)."""
    setting = alignment.thp_setting() or "not reported by this system"
    refusal = alignment.huge_pages_refusal()
    if refusal is None:
        return (
            f"weights of {alignment.HUGE_PAGE >> 20} MiB or more on transparent huge pages "
            f"(madvise; system setting: {setting})"
        )
    return f"64-byte aligned, base pages ({refusal}; system setting: {setting})"


def _cuda_table() -> List[str]:
    lines = []
    for mode in ("int8", "int4"):
        entry = quantized_backends.TABLE[("cuda", mode)][0]
        lines.append(f"{mode}: {entry.op} at every row count; load: {entry.packing}")
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    """`python -m llama.kernels [--no-torch-proof]`: print the report; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m llama.kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--no-torch-proof", action="store_true", help="skip running torch's operations in a child process"
    )
    args = parser.parse_args(argv)
    print(report(prove_torch=not args.no_torch_proof))
    return 0
