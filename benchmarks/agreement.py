"""How long greedy bf16 generation follows an fp32 run of the same checkpoint.

With random weights many logits lie within bf16 rounding of each other, so a bf16 engine and
its fp32 recomputation part ways after a few tokens whatever the kernels do; what can be
compared is how long each bf16 path stays on the fp32 tokens. For `--prompts` random prompts
of 128 tokens this generates `--tokens` greedy tokens in fp32 and in bf16 with the hand-written
kernels on and off, and prints, per prompt and on average, the number of leading tokens each
bf16 path shares with fp32.

    python benchmarks/agreement.py [--prompts 20] [--tokens 16] [--seed 100]

Uses the benchmark checkpoint (`bench.py` creates it in `benchmarks/.cache` on first use).
"""

import argparse
import statistics
import sys
from pathlib import Path
from typing import List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # noqa: E402
import torch  # noqa: E402

from llama import Llama, kernels  # noqa: E402


def shared_prefix(a: List[int], b: List[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts", type=int, default=20, help="random prompts (128 tokens each)")
    parser.add_argument("--tokens", type=int, default=16, help="greedy tokens per prompt")
    parser.add_argument("--seed", type=int, default=100, help="seed of the first prompt")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--cache-dir", type=Path, default=bench.REPO / "benchmarks" / ".cache")
    opts = parser.parse_args(argv)
    if opts.prompts < 1 or opts.tokens < 1:
        parser.error("--prompts and --tokens must be >= 1")
    torch.set_num_threads(opts.threads)
    ckpt = bench.ensure_checkpoint(opts.cache_dir, "tinyllama")

    def build(dtype: str) -> Llama:
        return Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), 1024, 1, dtype=dtype)

    fp32, bf16 = build("float32"), build("bfloat16")
    shared = {"kernels on": [], "kernels off": []}
    print("| prompt seed | bf16, kernels on | bf16, kernels off |\n|---|---|---|")
    for seed in range(opts.seed, opts.seed + opts.prompts):
        prompt = bench.random_prompts([bench.DECODE_PROMPT], seed)
        want = fp32.generate(prompt, opts.tokens, temperature=0.0)[0][0]
        for label, enabled in (("kernels on", True), ("kernels off", False)):
            kernels.set_enabled(enabled)
            shared[label].append(
                shared_prefix(bf16.generate(prompt, opts.tokens, temperature=0.0)[0][0], want)
            )
        kernels.set_enabled(True)
        print(f"| {seed} | {shared['kernels on'][-1]} | {shared['kernels off'][-1]} |", flush=True)
    on, off = (statistics.mean(shared[k]) for k in ("kernels on", "kernels off"))
    print(f"| mean of {opts.prompts} | {on:.1f} of {opts.tokens} | {off:.1f} of {opts.tokens} |")


if __name__ == "__main__":
    main()
