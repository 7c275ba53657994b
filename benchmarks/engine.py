"""The streaming engine under the loads it is built for, next to simpler ways of serving the same
requests, in one run on this machine.

- `decode1`: batch-1 greedy decode through the engine next to a bare loop over the model's
  one-token forward (what `generate` ran before the engine): the engine's own overhead.
- `arrivals`: requests of mixed lengths arriving at random (Poisson) times, served by the
  continuous engine, one after another (`generate` per request), and in fixed batches of 4
  (each batch starts when its requests have arrived and the previous batch has finished).
- `ttft`: time to first token of a request arriving while 3 others stream, next to its own
  prefill time alone plus two decode steps of the running batch.
- `editor`: an editor's infilling pattern: requests over one file, each changing a few tokens
  before the cursor; time to first token with prefix reuse and cold, PSM and SPM.
- `agreement`: with prefix reuse on and off, how often greedy tokens part (run it in bf16).

Writes a markdown section (default: prints it; `--out FILE` appends it). Run
`python benchmarks/engine.py --help`.
"""

import argparse
import datetime
import random
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

REPO = Path(__file__).resolve().parents[1]
for path in (str(REPO), str(REPO / "benchmarks")):
    if path not in sys.path:
        sys.path.insert(0, path)

import torch  # noqa: E402
from bench import ensure_checkpoint, machine, random_prompts, versions  # noqa: E402

from llama import Llama, kernel_report  # noqa: E402

# Code Llama's infilling ids (the benchmark tokenizer's pieces there are placeholders).
PRE, SUF, MID = 32007, 32008, 32009


def build(ckpt: Path, dtype: Optional[str], max_seq_len: int, max_batch: int) -> Llama:
    return Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), max_seq_len, max_batch, dtype=dtype)


def first_token_time(llama: Llama, prompt: List[int], max_tokens: int = 1) -> Tuple[float, List[int]]:
    start = time.perf_counter()
    request = llama.engine.submit(prompt, max_tokens=max_tokens, default_stop=None)
    first = None
    for _event in request:
        if first is None:
            first = time.perf_counter() - start
    return first, request.result().token_ids


# ------------------------------------------------------------------------------------ decode1


@torch.inference_mode()
def bare_loop(llama: Llama, prompt: List[int], new_tokens: int) -> Tuple[List[int], float, float]:
    """Prefill, then one-token forwards with argmax, no scheduling at all: (tokens, time of the
    first token, time of the last), from perf_counter."""
    model = llama.model
    logits = model.forward_packed([torch.tensor(prompt)], last_only=True)
    out, first = [], 0.0
    for step in range(new_tokens):
        out.append(int(logits[-1].argmax()))
        if step == 0:
            first = time.perf_counter()
        if step + 1 == new_tokens:
            break
        logits = model(torch.tensor([[out[-1]]]), len(prompt) + step, last_only=True)[:, -1]
    return out, first, time.perf_counter()


def engine_stream(llama: Llama, prompt: List[int], new_tokens: int) -> Tuple[List[int], float, float]:
    """The same through the engine: (tokens, time of the first token, time of the last)."""
    stamps = []
    request = llama.engine.submit(prompt, max_tokens=new_tokens, default_stop=None)
    for event in request:
        if event.token_ids:
            stamps.append(time.perf_counter())
    return request.result().token_ids, stamps[0], stamps[-1]


def decode1(llama: Llama, rounds: int, new_tokens: int) -> Dict[str, float]:
    """Decode tokens/s after the first token, engine and bare loop alternating, medians."""
    prompt = random_prompts([128], seed=1)[0]
    rates: Dict[str, List[float]] = {"engine": [], "loop": []}
    for _ in range(rounds):
        for name, run in (("engine", engine_stream), ("loop", bare_loop)):
            llama.engine.forget_prefixes()
            tokens, first, last = run(llama, prompt, new_tokens)
            rates[name].append((len(tokens) - 1) / (last - first))
    return {name: statistics.median(values) for name, values in rates.items()}


# ------------------------------------------------------------------------------------ arrivals


def workload(n: int, seed: int, max_prompt: int, max_new: int) -> List[Tuple[List[int], int]]:
    rng = random.Random(seed)
    lengths = [rng.randint(16, max_prompt) for _ in range(n)]
    prompts = random_prompts(lengths, seed)
    return [(p, rng.randint(max(4, max_new // 4), max_new)) for p in prompts]


def arrival_times(n: int, mean_gap: float, seed: int) -> List[float]:
    rng = random.Random(seed + 1)
    times, now = [], 0.0
    for _ in range(n):
        times.append(now)
        now += rng.expovariate(1.0 / mean_gap)
    return times


def serve_continuous(llama: Llama, work, arrivals) -> Tuple[float, List[float]]:
    engine = llama.engine
    engine.forget_prefixes()
    engine.start()
    done: List[float] = [0.0] * len(work)
    start = time.perf_counter()
    threads = []

    def client(i: int) -> None:
        request = engine.submit(work[i][0], max_tokens=work[i][1], default_stop=None)
        request.result()
        done[i] = time.perf_counter() - start

    try:
        for i, at in enumerate(arrivals):
            time.sleep(max(0.0, at - (time.perf_counter() - start)))
            thread = threading.Thread(target=client, args=(i,))
            thread.start()
            threads.append(thread)
        for thread in threads:
            thread.join()
    finally:
        engine.shutdown()
    return max(done), [d - a for d, a in zip(done, arrivals)]


def serve_batches(llama: Llama, work, arrivals, batch: int) -> Tuple[float, List[float]]:
    """Fixed batches in arrival order: a batch starts when its last request has arrived and the
    previous batch is done, and ends when its longest request ends (batch=1: one at a time)."""
    llama.engine.forget_prefixes()
    start = time.perf_counter()
    latencies = []
    for first in range(0, len(work), batch):
        group = range(first, min(first + batch, len(work)))
        time.sleep(max(0.0, arrivals[group[-1]] - (time.perf_counter() - start)))
        requests = [llama.engine.submit(work[i][0], max_tokens=work[i][1], default_stop=None) for i in group]
        for request in requests:
            request.result()
        end = time.perf_counter() - start
        latencies += [end - arrivals[i] for i in group]
    return time.perf_counter() - start, latencies


def arrivals_case(
    llama: Llama, n: int, seed: int, max_prompt: int, max_new: int, gap: float
) -> Dict[str, dict]:
    work = workload(n, seed, max_prompt, max_new)
    times = arrival_times(n, gap, seed)
    generated = sum(m for _, m in work)
    results = {}
    for name, run in (
        ("continuous", lambda: serve_continuous(llama, work, times)),
        ("one at a time", lambda: serve_batches(llama, work, times, 1)),
        ("fixed batches of 4", lambda: serve_batches(llama, work, times, 4)),
    ):
        makespan, latencies = run()
        results[name] = {
            "tokens_per_s": generated / makespan,
            "makespan": makespan,
            "mean_latency": statistics.mean(latencies),
        }
        print(f"  arrivals/{name}: {results[name]}", file=sys.stderr)
    return results


# ------------------------------------------------------------------------------------ ttft


def ttft_case(llama: Llama, prompt_len: int) -> Dict[str, float]:
    """A `prompt_len`-token request arriving while 3 others stream: its time to first token next to
    its prefill alone, and the longest wait of a streaming request for its next token while the new
    one is prefilled next to one step of a prefill chunk plus a decode step."""
    engine = llama.engine
    arriving = random_prompts([prompt_len], seed=7)[0]
    alone = float("inf")
    for _ in range(2):  # its own prefill (and first sampling), cold; the first run also warms up
        engine.forget_prefixes()
        alone = min(alone, first_token_time(llama, arriving)[0])
    engine.forget_prefixes()
    # More than the streams decode while the new prompt prefills (one token per chunk step).
    new_tokens = 16 + 2 * -(-prompt_len // engine.prefill_chunk)
    streams = [
        engine.submit(p, max_tokens=new_tokens, default_stop=None) for p in random_prompts([128] * 3, 3)
    ]
    engine.start()
    stamps: List[float] = []
    try:
        iterator = iter(streams[0])
        for _ in range(6):  # the three are decoding
            next(iterator)
            stamps.append(time.perf_counter())
        step = statistics.median(b - a for a, b in zip(stamps, stamps[1:]))
        done = threading.Event()

        def follow() -> None:  # one stream's token times while the new request prefills
            for _event in iterator:
                stamps.append(time.perf_counter())
                if done.is_set():
                    return

        follower = threading.Thread(target=follow, daemon=True)
        follower.start()
        submitted = time.perf_counter()
        ttft, _ = first_token_time(llama, arriving)
        done.set()
        follower.join(timeout=60)
    finally:
        for request in streams:
            request.cancel()
        engine.shutdown()
    during = [t for t in stamps if t >= submitted]
    gaps = [b - a for a, b in zip(during, during[1:])]
    chunks = -(-prompt_len // engine.prefill_chunk)
    return {
        "ttft": ttft,
        "alone_prefill": alone,
        "decode_step": step,
        "bound": alone + 2 * step,
        "chunks": chunks,
        "chunk_step": alone / chunks + step,
        "longest_gap": max(gaps) if gaps else float("nan"),
    }


# ------------------------------------------------------------------------------------ editor


def editor_requests(file_tokens: int, count: int, seed: int, suffix_first: bool) -> List[List[int]]:
    """Infilling prompts over one file with the cursor mid-file; before each request 1-3 tokens
    just before the cursor are retyped (another edit of a few characters)."""
    rng = random.Random(seed)
    source = random_prompts([file_tokens + 1], seed)[0][1:]
    cursor = file_tokens // 2
    out = []
    for _ in range(count):
        k = rng.randint(1, 3)
        source[cursor - k : cursor] = [rng.randint(3, 32000) for _ in range(k)]
        prefix, suffix = source[:cursor], source[cursor:]
        if suffix_first:
            out.append([1, PRE, SUF] + suffix + [MID] + prefix)
        else:
            out.append([1, PRE] + prefix + [SUF] + suffix + [MID])
    return out


def editor_case(llama: Llama, file_tokens: int, count: int, cold_count: int) -> Dict[str, dict]:
    results = {}
    for order, spm in (("PSM", False), ("SPM", True)):
        requests = editor_requests(file_tokens, count, seed=11, suffix_first=spm)
        llama.engine.forget_prefixes()
        warm = [first_token_time(llama, p)[0] for p in requests]
        cold = []
        for p in requests[:cold_count]:
            llama.engine.forget_prefixes()
            cold.append(first_token_time(llama, p)[0])
        results[order] = {"warm": statistics.median(warm[1:]), "cold": statistics.median(cold)}
        print(f"  editor/{order}: {results[order]}", file=sys.stderr)
    return results


# ------------------------------------------------------------------------------------ agreement


def agreement_case(llama: Llama, count: int, new_tokens: int) -> Dict[str, float]:
    requests = editor_requests(400, count, seed=5, suffix_first=True)
    parted, first_diff = 0, []
    engine = llama.engine
    engine.forget_prefixes()
    warm = [engine.submit(p, max_tokens=new_tokens, default_stop=None).result().token_ids for p in requests]
    for p, w in zip(requests, warm):
        engine.forget_prefixes()
        c = engine.submit(p, max_tokens=new_tokens, default_stop=None).result().token_ids
        if c != w:
            parted += 1
            first_diff.append(next(i for i, (a, b) in enumerate(zip(c, w)) if a != b))
    return {"parted": parted, "count": count, "first_diff": first_diff}


# ------------------------------------------------------------------------------------ main


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tinyllama", choices=["tinyllama", "small"])
    parser.add_argument("--cache_dir", default=str(Path.home() / ".cache" / "codellama-bench"))
    parser.add_argument("--dtype", default=None, help="default: the engine's default for this machine")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cases", default="decode1,arrivals,ttft,editor,agreement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max_prompt", type=int, default=256)
    parser.add_argument("--max_new", type=int, default=32)
    parser.add_argument("--gap", type=float, default=None, help="mean seconds between arrivals")
    parser.add_argument("--ttft_tokens", type=int, default=256, help="prompt length of the ttft case")
    parser.add_argument("--file_tokens", type=int, default=1500)
    parser.add_argument("--edits", type=int, default=20)
    parser.add_argument("--cold", type=int, default=5, help="cold runs of the editor pattern (the median)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = args.cases.split(",")
    ckpt = ensure_checkpoint(Path(args.cache_dir), args.model)
    llama = build(ckpt, args.dtype, max_seq_len=max(2048, args.ttft_tokens + 1024), max_batch=4)
    dtype = str(llama.model.tok_embeddings.weight.dtype).removeprefix("torch.")
    bare_loop(llama, random_prompts([16], 0)[0], 2)  # warm-up
    lines = [
        f"### Engine ({args.model}, {dtype}, {datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC)",
        "",
        f"`python benchmarks/engine.py {' '.join(argv if argv is not None else sys.argv[1:])}` on "
        f"{machine()}, {torch.get_num_threads()} threads; {versions()}.",
        "",
        "What this machine runs (`python -m llama.kernels`):",
        "",
        "```",
        kernel_report.report(),
        "```",
        "",
    ]
    if "decode1" in cases:
        r = decode1(llama, args.rounds, 32)
        lines.append(
            f"- Batch-1 decode: engine {r['engine']:.2f} tok/s, bare one-token loop {r['loop']:.2f} tok/s "
            f"({100 * r['engine'] / r['loop']:.0f}%)."
        )
    if "arrivals" in cases:
        gap = args.gap
        if gap is None:  # arrivals a little faster than one-at-a-time service keeps up with
            work = workload(2, args.requests, args.max_prompt, args.max_new)
            start = time.perf_counter()
            for p, m in work:
                llama.engine.submit(p, max_tokens=m, default_stop=None).result()
            gap = 0.5 * (time.perf_counter() - start) / len(work)
        r = arrivals_case(llama, args.requests, 0, args.max_prompt, args.max_new, gap)
        lines.append(
            f"- {args.requests} requests (prompts 16-{args.max_prompt}, {args.max_new // 4}-{args.max_new} "
            f"new tokens) arriving at random (mean gap {gap:.2f} s):"
        )
        lines.append("")
        lines.append("  | serving | generated tok/s | makespan | mean latency |")
        lines.append("  |---|---|---|---|")
        for name, v in r.items():
            lines.append(
                f"  | {name} | {v['tokens_per_s']:.2f} | {v['makespan']:.1f} s | {v['mean_latency']:.1f} s |"
            )
        lines.append("")
    if "ttft" in cases:
        r = ttft_case(llama, args.ttft_tokens)
        within = "within" if r["ttft"] <= r["bound"] else "OVER"
        lines.append(
            f"- Time to first token of a {args.ttft_tokens}-token prompt arriving while 3 others stream: "
            f"{r['ttft']:.2f} s; its prefill alone {r['alone_prefill']:.2f} s "
            f"({r['ttft'] / r['alone_prefill']:.3f}x) + 2 decode steps of {r['decode_step']:.2f} s = "
            f"{r['bound']:.2f} s ({within} the bound). Prefilled in {r['chunks']} chunks of at most "
            f"{llama.engine.prefill_chunk} tokens; the longest wait of a stream for its next token meanwhile "
            f"{r['longest_gap']:.2f} s, against {r['chunk_step']:.2f} s for one chunk alone plus one "
            "decode step."
        )
    if "editor" in cases:
        r = editor_case(llama, args.file_tokens, args.edits, args.cold)
        for order, v in r.items():
            lines.append(
                f"- Editor pattern, {order}, {args.edits} infills over a {args.file_tokens}-token file, "
                f"cursor mid-file: median time to first token {v['warm']:.3f} s with reuse, "
                f"{v['cold']:.3f} s cold ({v['cold'] / v['warm']:.1f}x)."
            )
    if "agreement" in cases:
        r = agreement_case(llama, 20, 32)
        lines.append(
            f"- Prefix reuse on vs off ({dtype}, 20 SPM infills, 32 greedy tokens): {r['parted']} of "
            f"{r['count']} part (first differing token at {r['first_diff'] or '-'})."
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
