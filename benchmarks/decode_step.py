"""Where the time of one batch-1 decode step goes: the weight matrix-vector products and the rest.

Builds a model of the TinyLlama-1.1B geometry (dim 2048, 32 heads, 4 kv heads, FFN 5632, random
weights) with `--layers` layers, with bf16 weights or int8/int4 weight-only quantized ones
(`--weights bf16,int4`), prefills a `--prompt`-token prompt and times `--steps` decode steps of
`Transformer.forward_decode` one by one. Each step's time is split into the hand-written
matrix-vector kernel calls (timed around each call: `llama.kernels`' bf16, int8 and int4 GEMVs,
fused or not), the decode-attention and rotary kernels, and the rest (norms, elementwise ops,
Python and torch dispatch). Medians over the steps of `--repeats` rounds, the weight kinds
alternating round by round (the machine may be shared: a drift hits every kind alike).
`--profile` adds torch.profiler's table of the operators outside the kernels for one step.
`--contexts 128,16384` times bf16 steps at several context lengths of one cache instead (the longest
prefilled once, the steps at each length alternating round by round): how decoding slows with the
context, free of the drift between processes.
`--separate` also times every weight kind with the fused projections and the RMSNorm kernel turned
off (one call per weight, torch's norm operations), alternating with the default in the same
process: the before/after of those two changes, free of the drift between processes.
Inside the one-kernel-call-per-layer step (`llama.fused_decode`) the kernels are not timed apart: its
time shows as "one call per layer".
`--layer-by-layer` instead times every weight kind's steps with the layers in one kernel call each and
run one by one from Python (`Transformer.fuse_decode_layers` off), alternating step by step on the same
model (the order flipped every other step), and prints the medians and the median ratio of the pairs:
what the one-call step saves, free of the machine's drift (`--kv-cache-dtype int8`: over an int8 KV
cache). Between the steps it also times a plain
read (the sum of a 1 GiB fp32 tensor, as `bench.py` measures the bound), so each one-call step's
weight bytes per second are set against the read rate of the same moment.
`--placement` also times every weight kind with its weights left where torch allocated them
(base pages) instead of placed on huge pages as loading places them (`llama.alignment`),
alternating in the same way.

    python benchmarks/decode_step.py [--layers 22] [--weights bf16,int8,int4] [--threads 2]

To compare two checkouts, run this script from each in turn (same arguments) several times.
"""

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Dict, List

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from dtype_speed import build  # noqa: E402
from torch import nn  # noqa: E402

from llama import alignment, distributed, kernels, quantization  # noqa: E402
from llama.model import Transformer  # noqa: E402

# The kernel entry points of `llama.kernels` timed apart from the rest of a step, by group.
TIMED = {
    "gemv": ("_gemv", "_gemv_int8", "_gemv_int4", "_fused_gemv", "_gemv_int8_fused", "_gemv_int4_fused"),
    "attention+rotary": ("_decode_attention", "rotary"),
    "one call per layer": ("decode_layer",),
}


def quantize_linears(model: Transformer, mode: str) -> Transformer:
    """Replace every linear weight of `model` by its `mode` ("int8" or "int4", group size 64)
    quantized form, as a quantized checkpoint loads it."""
    scheme = quantization.make_scheme(mode)
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter) and weight.dim() == 2 and not isinstance(module, nn.Embedding):
            if type(module).__name__ in ("ColumnLinear", "RowLinear"):
                parts = quantization.quantize(weight.detach(), scheme)
                quantized = quantization.QuantizedWeight(parts, scheme, weight.shape[1], torch.device("cpu"))
                del module.weight
                module.weight = quantized
    return model


class KernelClock:
    """Seconds spent inside the `TIMED` kernel entry points, by group, while installed."""

    def __init__(self) -> None:
        self.seconds: Dict[str, float] = defaultdict(float)
        self._saved: Dict[str, Callable] = {}

    def install(self) -> None:
        for group, names in TIMED.items():
            for name in names:
                original = getattr(kernels, name, None)
                if original is None:  # an entry point this checkout does not have
                    continue
                self._saved[name] = original
                setattr(kernels, name, self._timed(group, original))

    def uninstall(self) -> None:
        for name, original in self._saved.items():
            setattr(kernels, name, original)
        self._saved.clear()

    def _timed(self, group: str, original: Callable) -> Callable:
        def call(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[group] += time.perf_counter() - start

        return call


@contextlib.contextmanager
def huge_pages(enabled: bool):
    """With `enabled` False, weights built meanwhile are not placed on huge pages (the
    `CODELLAMA_HUGE_PAGES=0` switch of `llama.alignment`)."""
    saved = os.environ.get(alignment.HUGE_PAGES_SWITCH)
    if not enabled:
        os.environ[alignment.HUGE_PAGES_SWITCH] = "0"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(alignment.HUGE_PAGES_SWITCH, None)
        else:
            os.environ[alignment.HUGE_PAGES_SWITCH] = saved


@contextlib.contextmanager
def separate_calls(enabled: bool):
    """With `enabled`, the projections one call per weight and RMSNorm by torch's operations."""
    saved = kernels.fused_linear_applies, quantization.fused_linear_applies, kernels.rms_norm_applies
    if enabled:
        kernels.fused_linear_applies = quantization.fused_linear_applies = lambda *args: False
        kernels.rms_norm_applies = lambda *args: False
    try:
        yield
    finally:
        kernels.fused_linear_applies, quantization.fused_linear_applies, kernels.rms_norm_applies = saved


def decode_steps(
    model: Transformer, prompt: int, steps: int, clock: KernelClock, prefill: bool = True
) -> List[Dict[str, float]]:
    """Prefill `prompt` tokens into cache row 0 (with `prefill` False: the row already holds at
    least that many), then `steps` decode steps at positions prompt, prompt + 1, ...: per step, its
    seconds in total and in each kernel group."""
    tokens = torch.randint(3, 32000, (1, prompt), generator=torch.Generator().manual_seed(prompt))
    rows = torch.zeros(1, dtype=torch.int64)
    if prefill:
        token = model(tokens, 0, last_only=True)[:, -1].argmax(-1)
    else:
        token = tokens[:, -1]
    result = []
    for step in range(steps):
        clock.seconds.clear()
        start = time.perf_counter()
        logits = model.forward_decode(token, rows, torch.tensor([prompt + step]))
        total = time.perf_counter() - start
        token = logits.argmax(-1)
        result.append({"step": total, **clock.seconds})
    return result


def median_ms(steps: List[Dict[str, float]]) -> List[float]:
    """Median milliseconds of the steps: in total, in each kernel group of `TIMED`, and the rest."""
    cells = [statistics.median(s.get(key, 0.0) for s in steps) * 1e3 for key in ("step", *TIMED)]
    cells.append(statistics.median(s["step"] - sum(s.get(g, 0.0) for g in TIMED) for s in steps) * 1e3)
    return cells


def set_up(opts: argparse.Namespace) -> None:
    """Threads, the one-process model-parallel group and the kernels, and a line saying which."""
    if opts.threads:
        torch.set_num_threads(opts.threads)
    distributed.init_model_parallel()
    kernels.kernel_available()
    print(f"kernel variant {kernels.variant()}, {torch.get_num_threads()} threads, {opts.layers} layers\n")


def profile_step(model: Transformer, prompt: int, rows: int = 25) -> str:
    """torch.profiler's operator table (by self CPU time) of one decode step after `prompt` tokens."""
    from torch.profiler import ProfilerActivity, profile

    tokens = torch.randint(3, 32000, (1, prompt), generator=torch.Generator().manual_seed(1))
    model(tokens, 0, last_only=True)
    args = (tokens[0, -1:], torch.zeros(1, dtype=torch.int64), torch.tensor([prompt]))
    model.forward_decode(*args)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model.forward_decode(*args)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def main(argv: List[str] = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--weights", default="bf16,int4", help="comma-separated: bf16, int8, int4")
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler's table of one step")
    parser.add_argument("--separate", action="store_true", help="also time without fusing (see above)")
    parser.add_argument(
        "--layer-by-layer", action="store_true", help="also time the step layer by layer (see above)"
    )
    parser.add_argument(
        "--kv-cache-dtype", default=None, choices=["int8"], help="with --layer-by-layer: an int8 KV cache"
    )
    parser.add_argument(
        "--placement", action="store_true", help="also time with weights off huge pages (see above)"
    )
    parser.add_argument(
        "--contexts",
        default=None,
        help="comma-separated context lengths (e.g. 128,16384): bf16 decode steps after each, see above",
    )
    opts = parser.parse_args(argv)
    if opts.contexts:
        return compare_contexts(opts)
    if opts.layer_by_layer:
        return compare_layer_by_layer(opts)
    kinds = opts.weights.split(",")
    if not set(kinds) <= {"bf16", "int8", "int4"}:
        parser.error("--weights takes bf16, int8 and int4")
    set_up(opts)
    # (weight kind, setting): "default" as loading builds it, "separate" without fusing, "base
    # pages" with the weights off huge pages.
    # Each kind's settings run one after another, so a drift of the machine hits them alike; the
    # settings other than "base pages" time the same model (the same memory) as "default".
    settings = ["default"]
    settings += ["separate"] * opts.separate + ["base pages"] * opts.placement
    runs = [(kind, setting) for kind in kinds for setting in settings]
    models = {}
    for kind, setting in runs:
        if setting == "separate":
            models[kind, setting] = models[kind, "default"]
            continue
        with huge_pages(setting != "base pages"):
            model = build(opts.layers, opts.prompt + opts.steps + 1, torch.bfloat16)
            models[kind, setting] = model if kind == "bf16" else quantize_linears(model, kind)
    clock = KernelClock()
    samples: Dict[tuple, List[Dict[str, float]]] = {run: [] for run in runs}
    with torch.inference_mode():
        for kind, setting in runs:  # warm-up
            with separate_calls(setting == "separate"):
                decode_steps(models[kind, setting], opts.prompt, 2, clock)
        clock.install()
        try:
            for round_index in range(opts.repeats):
                for kind, setting in runs if round_index % 2 == 0 else runs[::-1]:
                    with separate_calls(setting == "separate"):
                        samples[kind, setting] += decode_steps(
                            models[kind, setting], opts.prompt, opts.steps, clock
                        )
        finally:
            clock.uninstall()
        print("| weights | step ms | GEMV ms | attention+rotary ms | one call per layer ms | rest ms |")
        print("|---|---|---|---|---|---|")
        for kind, setting in runs:
            cells = median_ms(samples[kind, setting])
            label = kind if setting == "default" else f"{kind}, {setting}"
            print(f"| {label} | " + " | ".join(f"{c:.2f}" for c in cells) + " |", flush=True)
        if opts.profile:
            for kind in kinds:
                print(f"\n{kind}:\n{profile_step(models[kind, 'default'], opts.prompt)}")


def compare_contexts(opts: argparse.Namespace) -> None:
    """bf16 decode steps at each of `opts.contexts` in one process: the longest context is
    prefilled once into cache row 0, then each round times `opts.steps` steps at positions
    starting at every context length in turn (the order alternating round by round), so the step
    at context c attends c positions of the same cache. Prints the median step per context and its
    speed relative to the shortest context."""
    contexts = sorted(int(n) for n in opts.contexts.split(","))
    set_up(opts)
    model = build(opts.layers, contexts[-1] + opts.steps + 1, torch.bfloat16)
    clock = KernelClock()
    samples: Dict[int, List[Dict[str, float]]] = {c: [] for c in contexts}
    with torch.inference_mode():
        start = time.perf_counter()
        decode_steps(model, contexts[-1], 2, clock)
        print(f"prefilled {contexts[-1]} tokens in {time.perf_counter() - start:.1f} s", flush=True)
        clock.install()
        try:
            for round_index in range(opts.repeats):
                for context in contexts if round_index % 2 == 0 else contexts[::-1]:
                    samples[context] += decode_steps(model, context, opts.steps, clock, prefill=False)
        finally:
            clock.uninstall()
    print(
        "| context | step ms | GEMV ms | attention+rotary ms | one call per layer ms | rest ms "
        "| tokens/s vs the shortest context |"
    )
    print("|---|---|---|---|---|---|---|")
    shortest = statistics.median(s["step"] for s in samples[contexts[0]])
    for context in contexts:
        cells = median_ms(samples[context])
        print(
            f"| {context} | "
            + " | ".join(f"{c:.2f}" for c in cells)
            + f" | {shortest / (cells[0] / 1e3):.0%} |"
        )


def compare_layer_by_layer(opts: argparse.Namespace) -> None:
    """Decode steps of each weight kind with the layers in one kernel call each and layer by layer,
    alternating step by step on the same model: the median step of each and the median ratio of
    the pairs (layer by layer / one call)."""
    kinds = opts.weights.split(",")
    set_up(opts)
    models = {}
    for kind in kinds:
        model = build(opts.layers, opts.prompt + opts.steps * opts.repeats + 1, torch.bfloat16)
        if opts.kv_cache_dtype:
            model.allocate_cache(torch.bfloat16, "cpu", opts.kv_cache_dtype)
        models[kind] = model if kind == "bf16" else quantize_linears(model, kind)
    weight_bytes = {kind: streamed_bytes(model) for kind, model in models.items()}
    plain = torch.ones(2**28, dtype=torch.float32)
    rows = torch.zeros(1, dtype=torch.int64)
    seconds: Dict[tuple, List[float]] = {(kind, fused): [] for kind in kinds for fused in (True, False)}
    shares: Dict[str, List[float]] = {kind: [] for kind in kinds}
    with torch.inference_mode():
        for kind in kinds:
            prompt = torch.randint(3, 32000, (1, opts.prompt), generator=torch.Generator().manual_seed(1))
            models[kind](prompt, 0, last_only=True)
        for step in range(opts.steps * opts.repeats + 1):
            position = torch.tensor([opts.prompt + step])
            for kind in kinds:
                for fused in (True, False) if step % 2 == 0 else (False, True):
                    models[kind].fuse_decode_layers = fused
                    start = time.perf_counter()
                    models[kind].forward_decode(torch.tensor([5]), rows, position)
                    if step:  # the first is a warm-up
                        seconds[kind, fused].append(time.perf_counter() - start)
                start = time.perf_counter()
                plain.sum()
                read_rate = plain.numel() * 4 / (time.perf_counter() - start)
                if step:
                    shares[kind].append(weight_bytes[kind] / seconds[kind, True][-1] / read_rate)
    print(
        "| weights | one call per layer, step ms | layer by layer, step ms | median ratio of the pairs "
        "| weight MB per step | one-call steps' weight read rate / the plain read beside them (median) |"
    )
    print("|---|---|---|---|---|---|")
    for kind in kinds:
        one, each = seconds[kind, True], seconds[kind, False]
        ratio = statistics.median(b / a for a, b in zip(one, each))
        medians = f"{statistics.median(one) * 1e3:.2f} | {statistics.median(each) * 1e3:.2f}"
        share = statistics.median(shares[kind])
        print(f"| {kind} | {medians} | {ratio:.2f}x | {weight_bytes[kind] / 1e6:.0f} | {share:.0%} |")


def streamed_bytes(model: Transformer) -> int:
    """Bytes of weights a decode step reads: every parameter and weight buffer but the token
    embeddings (one row each) and the KV cache (not a module tensor)."""
    total = 0
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if not name.startswith("tok_embeddings"):
            total += tensor.numel() * tensor.element_size()
    return total


if __name__ == "__main__":
    main()
