"""What checking k proposed tokens in one pass costs, against a one-token decode step.

Speculative decoding runs the main model once over a row's last token and its k proposals
(k + 1 tokens, the packed segment pass `Transformer.forward_segments` with logits at every
position) instead of once per token. With per-token acceptance probability a, one pass emits
(1 - a^(k+1)) / (1 - a) tokens on average; it pays off when that exceeds cost(k) / cost(1), the
time of the pass over the time of a plain one-token step (`Transformer.forward_decode`). This
script times both on a model of the given geometry (random weights, default the TinyLlama-1.1B
geometry in bf16) with `--context` tokens already in the cache, alternating the cases round by
round, and prints per k: ms per pass, the ratio to the one-token step, the break-even acceptance
rate and the expected speedup at a few acceptance rates. It also times `verify_sampled` (the
speculative sampling rule) over the full vocabulary, the per-row bookkeeping a pass adds.

    python benchmarks/verify_cost.py [--model tinyllama] [--context 256] [--ks 1,2,4,7,8] [--rounds 10]
"""

import argparse
import datetime
import functools
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
for path in (str(REPO), str(REPO / "benchmarks")):
    if path not in sys.path:
        sys.path.insert(0, path)

import torch  # noqa: E402
from bench import EOS_ID, MODELS, versions  # noqa: E402

from llama import checkpoint, distributed, kernels  # noqa: E402
from llama.model import ModelArgs, Transformer, pack_segments  # noqa: E402
from llama.speculation import verify_sampled  # noqa: E402

ACCEPTANCE_COLUMNS = (0.5, 0.7, 0.9)


def random_model(geometry: str, max_seq_len: int, dtype: torch.dtype) -> Transformer:
    """A model of `geometry` (a `bench.MODELS` key) with random weights in `dtype`, one cache row,
    built the way `Llama.build` loads a checkpoint (meta model, then the tensors assigned)."""
    distributed.init_model_parallel(1)
    args = ModelArgs(**MODELS[geometry], max_batch_size=1, max_seq_len=max_seq_len)
    model = checkpoint.empty_model(args)
    gen = torch.Generator().manual_seed(0)
    state = {}
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            state[name] = torch.ones(param.shape, dtype=dtype)
            continue
        scale = 1.0 if name == "tok_embeddings.weight" else param.shape[-1] ** -0.5
        state[name] = (torch.randn(param.shape, generator=gen) * scale).to(dtype)
    state["output.weight"][EOS_ID] = 0
    checkpoint.assign_weights(model, state, dtype, torch.device("cpu"))
    del state
    model.allocate_cache(dtype, "cpu")
    return model.eval()


def break_even(ratio: float, k: int) -> Optional[float]:
    """The acceptance rate a at which a pass over k proposals, `ratio` times as slow as a
    one-token step, emits `ratio` tokens on average: sum_{i<=k} a^i = ratio (bisection). 0 when
    the pass costs no more than a step; None when even a = 1 (k + 1 tokens) does not pay."""
    if ratio <= 1.0:
        return 0.0
    if ratio >= k + 1:
        return None
    low, high = 0.0, 1.0
    for _ in range(60):
        mid = (low + high) / 2
        if expected_tokens(mid, k) < ratio:
            low = mid
        else:
            high = mid
    return (low + high) / 2


def expected_tokens(a: float, k: int) -> float:
    """Tokens one verification pass of k proposals emits on average at acceptance rate a."""
    return sum(a**i for i in range(k + 1))


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@torch.inference_mode()
def measure(model: Transformer, context: int, ks: Sequence[int], rounds: int) -> Dict[str, List[float]]:
    """Per round and case: seconds of the pass over k proposals ("k=K"), of the one-token step
    run just before it ("decode"), and their ratio ("ratio k=K"). A ratio from two passes a moment
    apart holds up on a shared machine better than a ratio of medians taken minutes apart."""
    gen = torch.Generator().manual_seed(1)
    vocab = model.params.vocab_size
    prompt = torch.randint(3, vocab, (context,), generator=gen)
    model.forward_packed([prompt], last_only=True)  # the context, in cache row 0

    decode_args = (torch.tensor([5]), torch.tensor([0]), torch.tensor([context]))

    def decode() -> object:
        return model.forward_decode(*decode_args)

    passes: Dict[int, Callable[[], object]] = {}
    for k in ks:
        tokens = torch.randint(3, vocab, (k + 1,), generator=gen)
        segments = pack_segments([(0, context, k + 1)])
        passes[k] = functools.partial(model.forward_segments, tokens, segments, last_only=False)
    decode()
    for run in passes.values():  # warm-up: kernels built, memory touched
        run()
    times: Dict[str, List[float]] = {"decode": []}
    for _ in range(rounds):
        for k, run in passes.items():
            step = timed(decode)
            verify = timed(run)
            times["decode"].append(step)
            times.setdefault(f"k={k}", []).append(verify)
            times.setdefault(f"ratio k={k}", []).append(verify / step)
    return times


def sampling_cost(vocab: int, ks: Sequence[int], repeats: int = 20) -> Dict[int, float]:
    """Median seconds of `verify_sampled` on k point-mass proposals over `vocab` tokens, with
    main-model distributions that accept every proposal (the longest path)."""
    gen = torch.Generator().manual_seed(2)
    out = {}
    for k in ks:
        probs = torch.softmax(torch.randn(k + 1, vocab, generator=gen), dim=-1)
        proposed = probs[:k].argmax(-1).tolist()
        probs[torch.arange(k), proposed] = 1e9  # near-certain acceptance
        probs = probs / probs.sum(-1, keepdim=True)
        run = functools.partial(verify_sampled, proposed, probs, None, gen)
        out[k] = statistics.median(timed(run) for _ in range(repeats))
    return out


def machine_line() -> str:
    """CPU model, its vector instruction sets (avx2/fma/f16c/avx512*/amx*), cores, kernel variant."""
    model, flags = platform.processor() or "unknown CPU", []
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        info = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        model = info.get("Model name", model).strip()
        flags = [
            f
            for f in info.get("Flags", "").split()
            if f in ("avx2", "fma", "f16c") or f.startswith(("avx512", "amx"))
        ]
    except OSError:
        pass
    return (
        f"{model} ({' '.join(flags) or 'no AVX2'}), {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} thread{'' if torch.get_num_threads() == 1 else 's'}, "
        f"kernel variant {kernels.variant()}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}"
    )


def report(
    argv: Sequence[str],
    opts: argparse.Namespace,
    dtype: torch.dtype,
    times: Dict[str, List[float]],
    sampling: Dict[int, float],
    loads: Sequence[float],
) -> str:
    decode = statistics.median(times["decode"])
    lines = [
        f"### Speculative decoding: verification cost ({opts.model}, "
        f"{str(dtype).removeprefix('torch.')}, {datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC)",
        "",
        f"`python benchmarks/verify_cost.py {' '.join(argv)}` on {machine_line()}; {versions()}. "
        f"Load average {loads[0]:.1f} before and {loads[1]:.1f} after the run (the machine is shared). "
        f"{opts.context} tokens in the cache, batch 1; {opts.rounds} rounds, each timing a one-token "
        "step right before each verification pass; medians over the rounds (the cost ratio is the "
        "median of the per-pair ratios).",
        "",
        f"One-token decode step (`forward_decode`): {1000 * decode:.1f} ms "
        f"(min {1000 * min(times['decode']):.1f}).",
        "",
        "| proposals k | tokens in the pass | ms per pass (min) | cost vs one-token step (median of pairs) "
        "| break-even acceptance "
        + "".join(f"| speedup at a={a} " for a in ACCEPTANCE_COLUMNS)
        + "| `verify_sampled` ms |",
        "|---" * (5 + len(ACCEPTANCE_COLUMNS)) + "|---|",
    ]
    for k in opts.ks:
        t = statistics.median(times[f"k={k}"])
        ratio = statistics.median(times[f"ratio k={k}"])
        even = break_even(ratio, k)
        speedups = "".join(f"| {expected_tokens(a, k) / ratio:.2f}x " for a in ACCEPTANCE_COLUMNS)
        lines.append(
            f"| {k} | {k + 1} | {1000 * t:.1f} ({1000 * min(times[f'k={k}']):.1f}) | {ratio:.2f} "
            f"| {'never' if even is None else f'{even:.3f}'} {speedups}| {1000 * sampling[k]:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tinyllama", choices=sorted(MODELS))
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--context", type=int, default=256, help="tokens already in the cache")
    parser.add_argument("--ks", default="1,2,4,7,8", help="comma-separated numbers of proposals")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="append the markdown section to this file")
    args = sys.argv[1:] if argv is None else argv
    opts = parser.parse_args(args)
    opts.ks = [int(k) for k in opts.ks.split(",")]
    if opts.context < 1 or opts.rounds < 1 or min(opts.ks) < 1:
        parser.error("--context, --rounds and every k must be >= 1")
    if opts.threads:
        torch.set_num_threads(opts.threads)
    dtype = getattr(torch, opts.dtype)
    load_before = os.getloadavg()[0]
    print(f"building a random {opts.model} model in {opts.dtype} ...", file=sys.stderr)
    model = random_model(opts.model, opts.context + max(opts.ks) + 2, dtype)
    times = measure(model, opts.context, opts.ks, opts.rounds)
    sampling = sampling_cost(model.params.vocab_size, opts.ks)
    text = report(args, opts, dtype, times, sampling, (load_before, os.getloadavg()[0]))
    print(text)
    if opts.out:
        with open(opts.out, "a", encoding="utf-8") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
