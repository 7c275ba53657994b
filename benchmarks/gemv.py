"""The decode matrix-vector kernel next to the machine's read speed, for 1 to 8 rows.

A decode step multiplies one row of activations per sequence by every weight matrix. This
script times `llama.kernels`' kernel (the variant this CPU runs, or `--variant`; bf16 weights, or
fp32 with `--dtype float32`) and torch's `F.linear` on the matrices of 12 layers of the TinyLlama
geometry (random, 1.05 GB in bf16: far larger than the caches), with 1 and 2 threads, and
the kernel on one 8 MiB matrix that stays in the last-level cache (its arithmetic speed with
the memory out of the way). Results are GB/s of weights, medians of `--repeats`, next to a
plain streaming read (fp32 sum of 1 GiB) in the same run.

Reading the table: a kernel is memory-bound when its "memory" column is close to the plain
read, and compute-bound when it is close to its "cached" column; with more rows every weight
feeds more dot products, so the cached speed falls as the row count grows.

    python benchmarks/gemv.py [--repeats 5] [--rows 1,2,4,8] [--variant avx2] [--dtype float32]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, List

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from llama import kernel_build, kernels  # noqa: E402

DIM, FFN, KV_DIM, LAYERS = 2048, 5632, 256, 12


def layer_shapes() -> List[tuple]:
    """(out, in) of wq, wk, wv, wo, w1, w3, w2 of one TinyLlama layer."""
    return [(DIM, DIM), (KV_DIM, DIM), (KV_DIM, DIM), (DIM, DIM), (FFN, DIM), (FFN, DIM), (DIM, FFN)]


def random_weights(dtype: torch.dtype) -> List[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [
        (torch.randn(*shape, generator=gen) * shape[1] ** -0.5).to(dtype)
        for _ in range(LAYERS)
        for shape in layer_shapes()
    ]


def gb_per_s(multiply: Callable, weights: List[torch.Tensor], rows: int, passes: int, repeats: int) -> float:
    """Median GB/s of weights over `repeats` timings of `passes` passes over `weights`."""
    inputs = {w.shape[1]: torch.randn(rows, w.shape[1]).to(w.dtype) for w in weights}
    nbytes = passes * sum(w.numel() * w.element_size() for w in weights)
    for w in weights[:3]:
        multiply(inputs[w.shape[1]], w)
    speeds = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(passes):
            for w in weights:
                multiply(inputs[w.shape[1]], w)
        speeds.append(nbytes / (time.perf_counter() - start) / 1e9)
    return statistics.median(speeds)


def plain_read(repeats: int) -> float:
    """GB/s of summing a 1 GiB fp32 tensor (median of `repeats`)."""
    x = torch.ones(2**28)
    x.sum()
    speeds = []
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        speeds.append(x.numel() * 4 / (time.perf_counter() - start) / 1e9)
    return statistics.median(speeds)


def main(argv: List[str] = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5, help="timings per cell; medians are reported")
    parser.add_argument("--rows", default="1,2,4,8", help="comma-separated row counts (at most 8)")
    parser.add_argument(
        "--variant", choices=kernel_build.VARIANTS, help="kernel variant (default: the fastest)"
    )
    parser.add_argument(
        "--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="weights and rows of activations"
    )
    opts = parser.parse_args(argv)
    row_counts = [int(r) for r in opts.rows.split(",")]
    if opts.repeats < 1 or not all(1 <= r <= kernels.MAX_ROWS for r in row_counts):
        parser.error(f"--repeats must be >= 1 and every row count between 1 and {kernels.MAX_ROWS}")
    if opts.variant:
        try:
            kernels.set_variant(opts.variant)
        except (ValueError, RuntimeError) as err:
            sys.exit(str(err))
    if not kernels.kernel_available():
        sys.exit("no kernel variant runs on this CPU (or it could not be built): nothing to measure")
    print(
        f"Kernel variant: {kernels.variant()} (CPU runs {', '.join(kernel_build.cpu_variants())}), "
        f"{opts.dtype} weights\n"
    )

    weights = random_weights(getattr(torch, opts.dtype))
    first = weights[0]  # 2048 x 2048
    cached = [first[: 8 * 2**20 // (first.shape[1] * first.element_size())]]  # its first 8 MiB
    table = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        table[("read", threads)] = plain_read(opts.repeats)
        for rows in row_counts:
            table[("memory", rows, threads)] = gb_per_s(kernels._gemv, weights, rows, 1, opts.repeats)
            table[("cached", rows, threads)] = gb_per_s(kernels._gemv, cached, rows, 40, opts.repeats)
            table[("torch", rows, threads)] = gb_per_s(F.linear, weights, rows, 1, opts.repeats)

    print(
        f"Plain read (fp32 sum of 1 GiB): {table[('read', 1)]:.1f} GB/s with 1 thread, "
        f"{table[('read', 2)]:.1f} GB/s with 2 threads.\n"
    )
    print(
        "| rows | kernel, memory, 1 thread | kernel, cached, 1 thread | kernel, memory, 2 threads "
        "| kernel, cached, 2 threads | F.linear, memory, 2 threads |"
    )
    print("|---|---|---|---|---|---|")
    for rows in row_counts:
        cells = [
            table[(kind, rows, t)] for kind, t in (("memory", 1), ("cached", 1), ("memory", 2), ("cached", 2))
        ]
        cells.append(table[("torch", rows, 2)])
        print(f"| {rows} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
