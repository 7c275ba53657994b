"""How to multiply by a quantized weight on this CPU: the hand-written int8/int4 kernels, torch's
weight-only kernels and dequantizing then `F.linear`, against the 16-bit and fp32 weights.

Times one TinyLlama layer's matrices (wq, wk, wv, wo, w1, w3, w2: 44 M weights, random) for
a number of activation rows (1-16: decode steps of that batch size; 128-512: prefill), with
activations in fp32 (the default on CPUs without bf16 instructions) and bf16. Columns:
`F.linear` on fp32 and bf16 weights; `llama.quantization.linear` on int8 and int4 (group size
64) weights with the hand-written kernels (`kernel`: the backend `choose` takes, whatever path it
takes for that row count; `llama.kernels.variant()`, or `--variant`), with torch's weight-only
kernels at every row count (`torch op`), and dequantizing into a reused buffer, then `F.linear`.
Medians of `--repeats` rounds in which the variants alternate, milliseconds per layer; then the
same times as GB/s of the weights as held in memory (int8 44 MB, int4 25 MB, bf16 88 MB).
`llama.quantized_backends` picks, per row count, the fastest way from this table.

    python benchmarks/quantized_linear.py [--rows 1,2,4,8,16,64,512] [--threads 2] [--variant avx2]
"""

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from llama import kernel_build, kernel_report, kernels, quantization, quantized_backends  # noqa: E402

DIM, FFN, KV_DIM = 2048, 5632, 256
SHAPES = [(DIM, DIM), (KV_DIM, DIM), (KV_DIM, DIM), (DIM, DIM), (FFN, DIM), (FFN, DIM), (DIM, FFN)]


def timed_once(run: Callable[[], None]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def weight_bytes(weights: List) -> int:
    """Bytes of a layer's weights as held in memory (a `QuantizedWeight`'s buffers)."""
    if isinstance(weights[0], torch.Tensor):
        return sum(w.numel() * w.element_size() for w in weights)
    return sum(b.numel() * b.element_size() for w in weights for b in w.buffers())


def layer_variants() -> Dict[str, List]:
    """Each way of holding the layer's weights: plain tensors or `QuantizedWeight`s."""
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(*shape, generator=gen) * shape[1] ** -0.5 for shape in SHAPES]
    device = torch.device("cpu")
    variants: Dict[str, List] = {
        "fp32 F.linear": weights,
        "bf16 F.linear": [w.to(torch.bfloat16) for w in weights],
    }
    for mode, group in (("int8", None), ("int4", 64)):
        scheme = quantization.make_scheme(mode, group)
        parts = [quantization.quantize(w, scheme) for w in weights]
        key = ("cpu", mode)
        table = quantized_backends.TABLE[key]
        torch_op = quantized_backends.TORCH_CPU_INT8 if mode == "int8" else quantized_backends.TORCH_CPU_INT4
        for label, entries, ops in (
            ("kernel", table, True),
            ("torch op", (dataclasses.replace(torch_op, max_rows=None),), True),
            ("dequant+F.linear", table, False),
        ):
            quantized_backends.TABLE[key] = entries
            try:
                variants[f"{mode} {label}"] = [
                    quantization.QuantizedWeight(p, scheme, w.shape[1], device, torch_ops=ops)
                    for p, w in zip(parts, weights)
                ]
            finally:
                quantized_backends.TABLE[key] = table
    return variants


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", default="1,2,4,8,16,64,512")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--variant", choices=kernel_build.VARIANTS, help="kernel variant (default: fastest)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.variant:
        kernels.set_variant(args.variant)
    variants = layer_variants()
    names = list(variants)
    sizes = {name: weight_bytes(weights) for name, weights in variants.items()}
    print(kernel_report.report() + "\n")  # the instruction sets and paths behind the numbers
    print(f"torch {torch.__version__}, {args.threads} threads; ms per TinyLlama layer (44 M weights)\n")
    for act_dtype in (torch.float32, torch.bfloat16):
        print(f"activations {str(act_dtype).removeprefix('torch.')}")
        print("| rows | " + " | ".join(names) + " |")
        print("|---" * (len(names) + 1) + "|")
        bandwidth: List[str] = []
        for rows in [int(r) for r in args.rows.split(",")]:
            x = {k: torch.randn(rows, k).to(act_dtype) for k in (DIM, FFN)}
            runs = {}
            for name in names:
                weights = variants[name]
                is_plain = isinstance(weights[0], torch.Tensor)
                if is_plain and weights[0].dtype != act_dtype:
                    continue

                def run(weights=weights, x=x, is_plain=is_plain) -> None:
                    with torch.inference_mode():
                        for w in weights:
                            F.linear(x[w.shape[1]], w) if is_plain else w.linear(x[w.shape[1]])

                run()  # warm-up
                runs[name] = run
            times: Dict[str, List[float]] = {name: [] for name in runs}
            for _ in range(args.repeats):  # the variants alternate, so a drift of the machine hits all
                for name, run in runs.items():
                    times[name].append(timed_once(run))
            medians = {n: statistics.median(t) for n, t in times.items()}
            cells = [f"{1e3 * medians[n]:.2f}" if n in medians else "-" for n in names]
            print(f"| {rows} | " + " | ".join(cells) + " |", flush=True)
            speeds = [f"{sizes[n] / medians[n] / 1e9:.1f}" if n in medians else "-" for n in names]
            bandwidth.append(f"| {rows} | " + " | ".join(speeds) + " |")
        print(f"\nGB/s of weights as held ({', '.join(f'{n} {sizes[n] / 1e6:.0f} MB' for n in names)})")
        print("| rows | " + " | ".join(names) + " |")
        print("|---" * (len(names) + 1) + "|")
        print("\n".join(bandwidth) + "\n")


if __name__ == "__main__":
    main()
