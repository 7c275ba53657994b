"""Draft-model speculation on the demo model: the model as its own draft, and a tiny random draft.

Two engines over the demo model (models/demo), batch 1, greedy, prefix reuse off:

- `self`: the demo checkpoint loaded a second time as the draft (`draft_ckpt_dir` = models/demo).
  Greedy, every proposal must be accepted (the script asserts accepted == proposed) and the tokens
  must equal plain decoding (asserted). Per cycle the engine runs k draft decode passes (each one
  one-token step of the same model, cost c1) and one main pass over k + 1 tokens (cost c(k+1)) and
  emits k + 1 tokens, so the predicted speedup is (k + 1) c1 / (k c1 + c(k+1)), below 1 whenever a
  (k+1)-token pass costs more than one token: this case checks exactness and the cost model, it
  cannot be faster than plain decoding. The prediction is also given with one draft catch-up pass
  per cycle added (what the engine ran before the draft's missing ids moved into its first decode
  pass); the engine table shows how many catch-up passes a cycle really runs.
- `random`: a random checkpoint with the demo model's vocabulary (dim 64, 2 layers, written into a
  temporary folder with `tests.tiny.make_checkpoint`) as the draft: the tokens must equal plain
  decoding (asserted); acceptance and speed are reported.

Prompts: every prompt of `speculative.workloads` (edit, infill, test, the four held-out ones),
summed. For k in {1, 2, 4} and each draft, rounds alternating the settings, medians over rounds of:
decode tokens/s = (generated - 1) / (time of the last token - time of the first token), as in
`speculative.py`; acceptance = accepted / proposed (the engine's counters); tokens per main pass;
speedup = decode tokens/s over plain decoding in the same round.

Step costs, two ways: (1) standalone, on the engine's main model with `--context` tokens cached,
`forward_decode` over 1 token and over k + 1 tokens of one cache row (what the engine's
verification pass calls), timed back to back, medians; (2) inside the engine, every pass of the
main and draft executors timed (their `run` wrapped) during the runs' decode phase. The prediction
uses (1); the table of (2) shows where the rest of the time goes.

    OMP_WAIT_POLICY=passive python benchmarks/speculative_draft.py [--rounds 3] [--threads 1] [--out FILE]
"""

import argparse
import datetime
import functools
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
for path in (str(REPO), str(REPO / "benchmarks")):
    if path not in sys.path:
        sys.path.insert(0, path)

import torch  # noqa: E402
from bench import versions  # noqa: E402
from speculative import DEMO, add_run_arguments, machine_line, run_one, workloads  # noqa: E402
from verify_cost import timed  # noqa: E402

from llama import Llama, checkpoint, kernel_report  # noqa: E402
from llama.model import Transformer, pack_segments  # noqa: E402
from tests.tiny import make_checkpoint  # noqa: E402

KS = (1, 2, 4)
DRAFTS = ("self", "random")
Setting = Tuple[str, Optional[int]]  # (draft, k); ("off", None) is plain decoding


@dataclass
class Pass:
    start: float
    end: float
    decode_rows: int
    prefill_tokens: int


@dataclass
class PassLog:
    """Wraps an executor's `run` so every pass it runs is timed (one engine, this thread)."""

    passes: List[Pass] = field(default_factory=list)

    def attach(self, executor) -> "PassLog":
        run = executor.run

        def logged(plan):
            start = time.perf_counter()
            out = run(plan)
            prefill = sum(len(chunk) for _, _, chunk in plan.prefill)
            self.passes.append(Pass(start, time.perf_counter(), len(plan.decode), prefill))
            return out

        executor.run = logged
        return self

    def between(self, first: float, last: float) -> List[Pass]:
        """The passes run after the first token was published and before the last one."""
        return [p for p in self.passes if p.start >= first and p.end <= last]


@dataclass
class Totals:
    """One setting's sums over the prompts of one round."""

    tokens: int = 0  # generated - 1 per prompt: the decode phase's tokens
    decode_time: float = 0.0
    proposed: int = 0
    accepted: int = 0
    main: Dict[int, List[float]] = field(default_factory=dict)  # decode rows -> pass seconds
    draft_decode: List[float] = field(default_factory=list)
    draft_catch_up: List[Tuple[int, float]] = field(default_factory=list)  # (tokens, seconds)
    prompt_catch_up: List[float] = field(default_factory=list)  # each run's first catch-up


def random_draft(folder: Path, vocab_size: int) -> Path:
    """A random dim-64, 2-layer checkpoint with the given vocabulary, written into `folder`."""
    return make_checkpoint(folder / "random-draft", vocab_size, seed=7, dim=64, n_layers=2)


@torch.inference_mode()
def step_costs(model: Transformer, context: int, ks: Sequence[int], rounds: int) -> Dict[str, List[float]]:
    """Per round: seconds of a one-token `forward_decode` ("c1", timed right before each
    multi-token pass), of the pass over k + 1 tokens of the same cache row ("k=K"), and their
    ratio ("ratio k=K"); of a one-token packed `forward_segments` pass ("s1", the draft's
    catch-up) and its ratio to c1 ("ratio s1"). Uses (and overwrites) cache row 0."""
    gen = torch.Generator().manual_seed(1)
    vocab = model.params.vocab_size
    model.forward_packed([torch.randint(3, vocab, (context,), generator=gen)], last_only=True)

    def decode_pass(n: int) -> Callable[[], object]:
        tokens = torch.randint(3, vocab, (n,), generator=gen)
        rows = torch.zeros(n, dtype=torch.long)
        positions = torch.arange(context, context + n)
        return functools.partial(model.forward_decode, tokens, rows, positions)

    one = decode_pass(1)
    passes = {k: decode_pass(k + 1) for k in ks}
    segment = pack_segments([(0, context, 1)])
    catch_up = functools.partial(model.forward_segments, torch.tensor([5]), segment, last_only=True)
    for run in (one, *passes.values(), catch_up, one):  # warm-up
        run()
    times: Dict[str, List[float]] = {"c1": [], "s1": [], "ratio s1": []}
    for _ in range(rounds):
        for k, run in passes.items():
            step, verify = timed(one), timed(run)
            times["c1"].append(step)
            times.setdefault(f"k={k}", []).append(verify)
            times.setdefault(f"ratio k={k}", []).append(verify / step)
        step, packed = timed(one), timed(catch_up)
        times["s1"].append(packed)
        times["ratio s1"].append(packed / step)
    return times


def predicted(k: int, ratio: float, catch_up: float = 0.0) -> float:
    """Speedup of a draft as costly as the main model that is always accepted: k + 1 tokens for
    k one-token draft steps, a draft catch-up pass costing `catch_up` one-token steps, and one
    (k+1)-token main pass costing `ratio` one-token steps."""
    return (k + 1) / (k + catch_up + ratio)


def run_setting(
    engines: Dict[str, Tuple[Llama, PassLog, Optional[PassLog]]],
    setting: Setting,
    prompts: List[Tuple[List[int], Optional[int]]],
    max_tokens: int,
    reference: Dict[int, List[int]],
) -> Totals:
    draft, k = setting
    llama, main_log, draft_log = engines["self" if draft == "off" else draft]
    totals = Totals()
    for i, (prompt, stop) in enumerate(prompts):
        ids, first, last, p, a = run_one(llama, prompt, stop, k, max_tokens, method="draft")
        reference.setdefault(i, ids)
        assert ids == reference[i], f"prompt {i}, draft {draft}, k={k}: tokens differ from plain decoding"
        if draft == "self":
            assert a == p, f"prompt {i}, self draft, k={k}: accepted {a} of {p} proposals"
        totals.tokens += len(ids) - 1
        totals.decode_time += last - first
        totals.proposed += p
        totals.accepted += a
        for pass_ in main_log.between(first, last):
            totals.main.setdefault(pass_.decode_rows, []).append(pass_.end - pass_.start)
        prompt_caught_up = False
        for pass_ in draft_log.between(first, last) if draft_log else ():
            if pass_.decode_rows:
                totals.draft_decode.append(pass_.end - pass_.start)
            elif not prompt_caught_up:  # the run's first catch-up: the prompt
                totals.prompt_catch_up.append(pass_.end - pass_.start)
                prompt_caught_up = True
            else:
                totals.draft_catch_up.append((pass_.prefill_tokens, pass_.end - pass_.start))
        main_log.passes.clear()
        if draft_log:
            draft_log.passes.clear()
    return totals


def build(draft_dir: Path, dtype: str) -> Tuple[Llama, PassLog, PassLog]:
    llama = Llama.build(
        str(DEMO), str(DEMO / "tokenizer.model"), 320, 1, dtype=dtype, draft_ckpt_dir=str(draft_dir)
    )
    llama.engine.prefix_reuse = False
    return llama, PassLog().attach(llama.engine.executor), PassLog().attach(llama.engine.draft)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_arguments(parser)
    parser.add_argument("--cost_rounds", type=int, default=200, help="rounds of the standalone step timing")
    parser.add_argument(
        "--context",
        type=int,
        default=0,
        help="cached tokens for the step timing " "(default: the prompts' mean length + max_tokens / 2)",
    )
    parser.add_argument("--out", help="append the markdown section to this file (default: print it)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(kernel_report.report(), file=sys.stderr)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        vocab = checkpoint.read_params(str(DEMO))["vocab_size"]
        engines = {
            "self": build(DEMO, args.dtype),
            "random": build(random_draft(Path(tmp), vocab), args.dtype),
        }
    llama = engines["self"][0]
    prompts = [item for items in workloads(llama).values() for item in items]
    settings: List[Setting] = [("off", None)] + [(d, k) for d in DRAFTS for k in KS]
    for name in DRAFTS:  # warm-up
        run_one(engines[name][0], prompts[0][0], None, 2, 8, method="draft")
        engines[name][1].passes.clear()
        engines[name][2].passes.clear()

    reference: Dict[int, List[int]] = {}
    results: Dict[Setting, List[Totals]] = {s: [] for s in settings}
    for round_ in range(args.rounds):
        order = settings if round_ % 2 == 0 else list(reversed(settings))
        for setting in order:
            results[setting].append(run_setting(engines, setting, prompts, args.max_tokens, reference))
        print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr)

    context = args.context or round(statistics.mean(len(p) for p, _ in prompts) + args.max_tokens / 2)
    costs = step_costs(llama.model, context, KS, args.cost_rounds)
    llama.engine.forget_prefixes()
    load_after = os.getloadavg()[0]
    print(report(args, argv, results, costs, context, (load_before, load_after), len(prompts)))


def report(args, argv, results, costs, context, loads, n_prompts) -> str:
    """The markdown section: the speed table and where the engine's decode time goes."""
    med = statistics.median
    rate = {s: [t.tokens / t.decode_time for t in ts] for s, ts in results.items()}
    off = rate[("off", None)]
    generated = results[("off", None)][0].tokens + n_prompts
    ratio = {k: med(costs[f"ratio k={k}"]) for k in KS}
    s1 = med(costs["ratio s1"])
    command = " ".join(sys.argv[1:] if argv is None else argv)
    policy = f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']} " if "OMP_WAIT_POLICY" in os.environ else ""
    lines = [
        f"### Speculative decoding: a draft model on the demo model ({args.dtype}, "
        f"{datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC)",
        "",
        f"`{policy}python benchmarks/speculative_draft.py {command}` "
        f"on {machine_line(args.dtype)}; {versions()}. Load average {loads[0]:.1f} before and "
        f"{loads[1]:.1f} after the run. Batch 1, greedy, prefix reuse off; the {n_prompts} prompts of "
        f"`speculative.py` summed ({generated} generated tokens per setting), up to {args.max_tokens} "
        f"each; {args.rounds} rounds alternating the settings, medians. Drafts: `self` = the demo "
        "checkpoint loaded again as its own draft; `random` = a random dim-64, 2-layer model with the "
        "demo vocabulary. Token ids equal plain decoding in every run, and the `self` draft had every "
        "proposal accepted (both asserted).",
        "",
        f"Standalone step costs (main model, {context} tokens cached, {args.cost_rounds} back-to-back "
        f"pairs, medians): one-token `forward_decode` c1 = {1000 * med(costs['c1']):.2f} ms; "
        + "; ".join(f"c({k + 1}) = {1000 * med(costs[f'k={k}']):.2f} ms = {ratio[k]:.2f} c1" for k in KS)
        + f"; a one-token packed `forward_segments` pass (the draft's catch-up) = {s1:.2f} c1. "
        "Predicted speedup of the `self` draft: (k + 1) c1 / (k c1 + c(k+1)) (k draft steps and the "
        "verification pass), and with the draft's catch-up pass added to the denominator.",
        "",
        "| draft | k | decode tokens/s | acceptance | tokens per main pass | speedup vs off "
        "| predicted | predicted with catch-up |",
        "|---|---|---|---|---|---|---|---|",
        f"| off | - | {med(off):.1f} | - | 1.00 | 1.00x | - | - |",
    ]
    for setting in [s for s in results if s[0] != "off"]:
        draft, k = setting
        ts = results[setting]
        accept = med([t.accepted / t.proposed if t.proposed else 0.0 for t in ts])
        per_pass = med([t.tokens / sum(len(v) for v in t.main.values()) for t in ts])
        speedup = med([r / o for r, o in zip(rate[setting], off)])
        guesses = (
            f"{predicted(k, ratio[k]):.2f}x | {predicted(k, ratio[k], s1):.2f}x"
            if draft == "self"
            else "- | -"
        )
        lines.append(
            f"| {draft} | {k} | {med(rate[setting]):.1f} | {accept:.3f} | {per_pass:.2f} | "
            f"{speedup:.2f}x | {guesses} |"
        )
    lines += [
        "",
        "Inside the engine (every executor pass timed during the decode phase, i.e. after the first "
        "token; medians over rounds). A cycle is one main-model pass; `catch-up` is the draft's packed "
        "pass that brings its cache up to the main model's tokens, the first one of each run (the whole "
        "prompt) listed apart; `other` is decode time in no pass (scheduling, proposing, verifying, "
        "sampling, Python):",
        "",
        "| draft | k | cycles | tokens per cycle | main pass ms (rows: passes) | draft decode passes per "
        "cycle, ms each | catch-up passes per cycle, tokens each, ms each | prompt catch-up ms per run "
        "| other ms per cycle | decode ms per token |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for setting, ts in results.items():
        draft, k = setting
        cycles = [sum(len(v) for v in t.main.values()) for t in ts]
        main_ms = [1000 * sum(sum(v) for v in t.main.values()) / c for t, c in zip(ts, cycles)]
        rows: Dict[int, int] = {}
        for t in ts:
            for n, v in t.main.items():
                rows[n] = rows.get(n, 0) + len(v)
        rows_text = ", ".join(f"{n}: {round(c / len(ts))}" for n, c in sorted(rows.items()))
        mean_ms = lambda xs: 1000 * statistics.mean(xs) if xs else 0.0  # noqa: E731
        d_per = med([len(t.draft_decode) / c for t, c in zip(ts, cycles)])
        d_ms = med([mean_ms(t.draft_decode) for t in ts])
        u_per = med([len(t.draft_catch_up) / c for t, c in zip(ts, cycles)])
        u_tokens = med(
            [statistics.mean(n for n, _ in t.draft_catch_up) if t.draft_catch_up else 0 for t in ts]
        )
        u_ms = med([mean_ms([x for _, x in t.draft_catch_up]) for t in ts])
        p_ms = med([mean_ms(t.prompt_catch_up) for t in ts])
        passes = [
            sum(sum(v) for v in t.main.values())
            + sum(t.draft_decode)
            + sum(x for _, x in t.draft_catch_up)
            + sum(t.prompt_catch_up)
            for t in ts
        ]
        other = med([1000 * (t.decode_time - p) / c for t, p, c in zip(ts, passes, cycles)])
        lines.append(
            f"| {draft} | {'-' if k is None else k} | {med(cycles):.0f} | "
            f"{med([t.tokens / c for t, c in zip(ts, cycles)]):.2f} | {med(main_ms):.2f} ({rows_text}) | "
            f"{d_per:.2f}, {d_ms:.2f} | {u_per:.2f}, {u_tokens:.2f}, {u_ms:.2f} | {p_ms:.2f} | {other:.2f} | "
            f"{med([1000 * t.decode_time / t.tokens for t in ts]):.2f} |"
        )
    text = "\n".join(lines) + "\n"
    if args.out:
        with open(args.out, "a") as out:
            out.write("\n" + text)
    return text


if __name__ == "__main__":
    main()
