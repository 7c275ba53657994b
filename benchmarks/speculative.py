"""Prompt-lookup speculation on the demo model: decode speed with and without, batch 1 and 4 streams.

Workloads (greedy, batch 1, prefix reuse off so every run prefills cold):

- `edit`: a class, then another class whose `__init__` line is the same: the model should re-emit
  the body (copying is right).
- `infill`: a prefix-suffix-middle infill (`llama.prompts.infilling_prompt_tokens`) whose middle, the
  second class's `__init__` body, exists in the first class of the file (copying is right).
- `test`: a test written after its function, the first asserts given (copying is right).
- `held-out`: signatures and docstrings of four held-out standard-library functions, completed
  (the prompt is unlike its continuation: copying is not right); the four runs are summed.
- `held-out-sampled`: the same four prompts sampled at temperature 1, three fixed seeds each (the
  same seeds with and without speculation); the greedy continuations of the small demo model loop,
  which lookup catches, while sampled ones rarely repeat, so here copying is really not right. The
  tokens differ between settings (the sampled rule keeps the distribution, not the draws): compare
  decode tokens/s, and read the acceptance to see it is low.

The demo model is small: check the samples the script prints on stderr before reading the numbers as
copying (it tends to repeat its own lines, which prompt lookup also catches).

For each workload (`--workloads`, default all but `held-out-sampled`) and proposal length k in
{off, 2, 4, 7} (`--ks`), rounds alternating the settings, it reports
medians of: decode tokens/s = (generated tokens - 1) / (time of the last token - time of the first
token), so the cold prefill that yields the first token is left out; acceptance = accepted /
proposed tokens (deltas of the engine's counters); tokens per main-model pass = generated tokens /
(generated tokens - accepted tokens), the prefill pass that yields the first token counted as one;
the speedup of decode tokens/s over k off in the same round. The script asserts that every
greedy speculative run yields exactly the token ids of the run without speculation.

Then, when edit, infill and test are all selected, 4 streams (four copying prompts submitted
together, the engine stepping in this thread): total generated tokens / wall time from submission to
the last token (prefills included), with and without.

    OMP_WAIT_POLICY=passive python benchmarks/speculative.py [--rounds 3] [--threads 1] [--out FILE]
        [--workloads edit,infill,test,held-out,held-out-sampled] [--ks off,2,4,7]
"""

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
for path in (str(REPO), str(REPO / "benchmarks")):
    if path not in sys.path:
        sys.path.insert(0, path)

import torch  # noqa: E402
from bench import versions  # noqa: E402

from llama import Llama, kernel_build, kernel_report, kernels  # noqa: E402
from llama.prompts import infilling_prompt_tokens  # noqa: E402
from llama.sampling import SamplingParams  # noqa: E402
from llama.speculation import Speculation  # noqa: E402

DEMO = REPO / "models" / "demo"
KS: Tuple[Optional[int], ...] = (None, 2, 4, 7)  # None: no speculation
DEFAULT_WORKLOADS = ("edit", "infill", "test", "held-out")
SAMPLED_TEMPERATURE = 1.0
SAMPLED_SEEDS = (11, 12, 13)  # per prompt; the same in every setting so the work is comparable

SPLIT = '''def split(p):
    """Split a pathname.  Returns tuple "(head, tail)" where "tail" is
    everything after the final slash.  Either part may be empty."""
    p = os.fspath(p)
    sep = _get_sep(p)
    i = p.rfind(sep) + 1
    head, tail = p[:i], p[i:]
    if head and head != sep*len(head):
        head = head.rstrip(sep)
    return head, tail

'''

POINT = """class Point:
    def __init__(self, x, y, z):
        self.x = x
        self.y = y
        self.z = z

    def copy(self):
        return Point(self.x, self.y, self.z)

    def __repr__(self):
        return "Point(%r, %r, %r)" % (self.x, self.y, self.z)

"""

# Signatures and docstrings of held-out functions (never trained on), verbatim from CPython 3.11.
HELD_OUT = [
    'def filter(names, pat):\n    """Construct a list from those elements of the iterable NAMES that match '
    'PAT."""\n',
    'def escape(pathname):\n    """Escape all special characters.\n    """\n',
    'def heappush(heap, item):\n    """Push item onto heap, maintaining the heap invariant."""\n',
    'def heappop(heap):\n    """Pop the smallest item off the heap, maintaining the heap invariant."""\n',
]


Item = Tuple[List[int], Optional[int], Optional[SamplingParams]]  # prompt ids, stop id, sampling


def workloads(llama: Llama) -> Dict[str, List[Item]]:
    """Name -> [(prompt ids, default stop id, sampling or None for greedy)]: the copying workloads,
    the held-out one and the held-out one sampled."""
    tok = llama.tokenizer

    def text(prompt: str, sampling: Optional[SamplingParams] = None) -> Item:
        return tok.encode(prompt, bos=True, eos=False), tok.eos_id, sampling

    return {
        "edit": [text(POINT + "\nclass Vector:\n    def __init__(self, x, y, z):\n")],
        "infill": [
            (
                infilling_prompt_tokens(
                    tok,
                    POINT + "\nclass Vector:\n    def __init__(self, x, y, z):\n",
                    "\n    def copy(self):\n        return Vector(self.x, self.y, self.z)\n",
                ),
                tok.eot_id,
                None,
            )
        ],
        "test": [
            text(
                SPLIT + "\ndef test_split():\n    assert split('a/b') == ('a', 'b')\n"
                "    assert split('/a/b') == ('/a', 'b')\n    assert split("
            )
        ],
        "held-out": [text(p) for p in HELD_OUT],
        "held-out-sampled": [
            text(p, SamplingParams(temperature=SAMPLED_TEMPERATURE, seed=seed))
            for p in HELD_OUT
            for seed in SAMPLED_SEEDS
        ],
    }


def stream_prompts(llama: Llama, work: Dict[str, List[Item]]):
    """Four different copying prompts for the concurrent case."""
    tok = llama.tokenizer
    fourth = (tok.encode(SPLIT + "\ndef split_path(p):\n", bos=True, eos=False), tok.eos_id, None)
    return [work["edit"][0], work["infill"][0], work["test"][0], fourth]


def counters(llama: Llama) -> Tuple[int, int]:
    stats = llama.engine.stats()
    return stats["speculative_proposed"], stats["speculative_accepted"]


def spec(k: Optional[int], method: str = "lookup") -> Optional[Speculation]:
    return None if k is None else Speculation(method, num_tokens=k)


def run_one(
    llama: Llama,
    prompt: List[int],
    stop: Optional[int],
    k: Optional[int],
    max_tokens: int,
    method: str = "lookup",
    sampling: Optional[SamplingParams] = None,
):
    """One cold batch-1 run: (token ids, first-token time, last-token time, proposed, accepted)."""
    engine = llama.engine
    engine.forget_prefixes()
    before = counters(llama)
    stamps: List[float] = []
    request = engine.submit(
        prompt, max_tokens=max_tokens, sampling=sampling, default_stop=stop, speculation=spec(k, method)
    )
    for event in request:  # iterating drives the engine in this thread
        if event.token_ids:
            stamps.append(time.perf_counter())
    ids = request.result().token_ids
    after = counters(llama)
    return ids, stamps[0], stamps[-1], after[0] - before[0], after[1] - before[1]


def run_streams(llama: Llama, prompts, k: Optional[int], max_tokens: int) -> Tuple[List[List[int]], float]:
    """The prompts submitted together, stepped in this thread: (token ids per prompt, wall time)."""
    engine = llama.engine
    engine.forget_prefixes()
    start = time.perf_counter()
    requests = [
        engine.submit(p, max_tokens=max_tokens, default_stop=stop, speculation=spec(k))
        for p, stop, _ in prompts
    ]
    results = [r.result().token_ids for r in requests]
    return results, time.perf_counter() - start


def machine_line(dtype: str) -> str:
    """CPU model, vector instruction sets, threads, torch, dtype, kernel variant, OMP policy."""
    flags = kernel_build.cpu_flags()
    sets = [f for f in sorted(flags) if f in ("avx2", "fma", "f16c") or f.startswith(("avx512", "amx"))]
    threads = torch.get_num_threads()
    variant = kernels.variant() if kernels.enabled() else "none (kernels off)"
    return (
        f"{kernel_report.cpu_name()} ({' '.join(sets) or 'no AVX2'}), {os.cpu_count()} cores, "
        f"{threads} thread{'' if threads == 1 else 's'}, torch {torch.__version__}, {dtype}, "
        f"kernel variant {variant}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}"
    )


def show_samples(llama: Llama, work, max_tokens: int) -> None:
    """Print each workload's first prompt tail and continuation (stderr), to check it copies."""
    tok = llama.tokenizer
    for name, items in work.items():
        prompt, stop, sampling = items[0]
        ids, *_ = run_one(llama, prompt, stop, None, max_tokens, sampling=sampling)
        print(f"--- {name}: prompt ends {tok.decode(prompt)[-80:]!r}", file=sys.stderr)
        print(tok.decode(ids), file=sys.stderr)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every demo-model speculation benchmark takes: rounds, tokens, threads, dtype."""
    parser.add_argument("--rounds", type=int, default=3, help="rounds alternating the settings; medians")
    parser.add_argument("--max_tokens", type=int, default=112, help="tokens to generate per request")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--dtype", default="float32", help="weights and compute dtype (the demo runs fp32)")


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_arguments(parser)
    parser.add_argument("--out", help="append the markdown section to this file (default: print it)")
    parser.add_argument(
        "--workloads", default=",".join(DEFAULT_WORKLOADS), help="comma-separated workloads to run"
    )
    parser.add_argument("--ks", default="off,2,4,7", help="comma-separated proposal lengths, off for none")
    args = parser.parse_args(argv)
    ks = tuple(None if k == "off" else int(k) for k in args.ks.split(","))
    if ks[0] is not None:
        parser.error("--ks must start with off (speedups are against it)")
    torch.set_num_threads(args.threads)
    print(kernel_report.report(), file=sys.stderr)  # what this machine runs, in full
    llama = Llama.build(str(DEMO), str(DEMO / "tokenizer.model"), 320, 4, dtype=args.dtype)
    llama.engine.prefix_reuse = False
    every = workloads(llama)
    unknown = sorted(set(args.workloads.split(",")) - set(every))
    if unknown:
        parser.error(f"unknown workloads {unknown}; choose among {sorted(every)}")
    work = {n: every[n] for n in args.workloads.split(",")}
    show_samples(llama, work, args.max_tokens)
    streams = stream_prompts(llama, every) if {"edit", "infill", "test"} <= set(work) else None

    reference: Dict[Tuple[str, int], List[int]] = {}
    # name -> k -> per-round lists
    rate: Dict[str, Dict[Optional[int], List[float]]] = {n: {k: [] for k in ks} for n in work}
    speedup: Dict[str, Dict[Optional[int], List[float]]] = {n: {k: [] for k in ks} for n in work}
    accept: Dict[str, Dict[Optional[int], List[float]]] = {n: {k: [] for k in ks} for n in work}
    per_pass: Dict[str, Dict[Optional[int], List[float]]] = {n: {k: [] for k in ks} for n in work}
    generated: Dict[str, Dict[Optional[int], List[int]]] = {n: {k: [] for k in ks} for n in work}
    stream_rate: Dict[Optional[int], List[float]] = {k: [] for k in ks}
    stream_ref: Optional[List[List[int]]] = None
    load_before = os.getloadavg()[0]
    run_one(llama, every["edit"][0][0], None, 4, 8)  # warm-up
    for round_ in range(args.rounds):
        order = ks if round_ % 2 == 0 else tuple(reversed(ks))
        for name, items in work.items():
            for k in order:
                tokens = decode_time = 0.0
                total = proposed = accepted = 0
                for i, (prompt, stop, sampling) in enumerate(items):
                    ids, first, last, p, a = run_one(
                        llama, prompt, stop, k, args.max_tokens, sampling=sampling
                    )
                    if (
                        sampling is None
                    ):  # sampled tokens differ with speculation, their distribution does not
                        reference.setdefault((name, i), ids)
                        assert ids == reference[(name, i)], f"{name}[{i}] k={k}: tokens differ from k off"
                    tokens += len(ids) - 1
                    decode_time += last - first
                    total += len(ids)
                    proposed += p
                    accepted += a
                generated[name][k].append(total)
                rate[name][k].append(tokens / decode_time)
                accept[name][k].append(accepted / proposed if proposed else 0.0)
                per_pass[name][k].append(total / (total - accepted))
            base = rate[name][None][-1]
            for k in ks:
                speedup[name][k].append(rate[name][k][-1] / base)
        for k in order if streams else ():
            results, wall = run_streams(llama, streams, k, args.max_tokens)
            stream_ref = stream_ref or results
            assert results == stream_ref, f"4 streams k={k}: tokens differ from k off"
            stream_rate[k].append(sum(len(r) for r in results) / wall)
        this_round = "; ".join(
            f"{n} " + " ".join(f"{k or 'off'}:{rate[n][k][-1]:.0f}" for k in ks) for n in work
        )
        print(f"round {round_ + 1}/{args.rounds} decode tokens/s: {this_round}", file=sys.stderr)
    load_after = os.getloadavg()[0]

    med = statistics.median
    policy = f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']} " if "OMP_WAIT_POLICY" in os.environ else ""
    name_k = lambda k: "off" if k is None else str(k)  # noqa: E731
    lines = [
        f"### Speculative decoding: prompt lookup on the demo model ({args.dtype}, "
        f"{datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC)",
        "",
        f"`{policy}python benchmarks/speculative.py {' '.join(sys.argv[1:] if argv is None else argv)}` on "
        f"{machine_line(args.dtype)}; {versions()}. Load average {load_before:.1f} before and "
        f"{load_after:.1f} after the run. Batch 1, greedy"
        + (
            f" (held-out-sampled: temperature {SAMPLED_TEMPERATURE:g}, seeds "
            f"{', '.join(map(str, SAMPLED_SEEDS))} per prompt, the same in every setting)"
            if "held-out-sampled" in work
            else ""
        )
        + f", prefix reuse off (cold prefill every run), up to {args.max_tokens} tokens per request; "
        f"{args.rounds} rounds alternating the settings, medians (tokens generated too). "
        "Decode tokens/s = (generated - 1) / (last token time - first token time), prefill left out; "
        "tokens per pass = generated / (generated - accepted), the prefill pass counted; speedup = "
        "median over rounds of decode tokens/s against k off in the same round. Token ids with "
        "speculation equal those without in every greedy run (asserted).",
        "",
        "| workload | tokens generated | k | decode tokens/s | acceptance | tokens per pass "
        "| speedup vs off |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in work:
        for k in ks:
            lines.append(
                f"| {name} | {med(generated[name][k]):g} | {name_k(k)} | {med(rate[name][k]):.1f} | "
                + ("-" if k is None else f"{med(accept[name][k]):.2f}")
                + f" | {med(per_pass[name][k]):.2f} | {med(speedup[name][k]):.2f}x |"
            )
    lines += (
        []
        if not streams
        else [
            "",
            "4 concurrent streams (edit, infill, test and a fourth copying prompt, submitted together, "
            "stepped in the calling thread; generated tokens / wall time, prefills included):",
            "",
            "| k | total tokens/s | vs off |",
            "|---|---|---|",
        ]
    )
    off = stream_rate[None]
    for k in ks if streams else ():
        ratios = [r / o for r, o in zip(stream_rate[k], off)]
        lines.append(f"| {name_k(k)} | {med(stream_rate[k]):.1f} | {med(ratios):.2f}x |")
    text = "\n".join(lines) + "\n"
    if args.out:
        with open(args.out, "a") as out:
            out.write("\n" + text)
    print(text)


if __name__ == "__main__":
    main()
