"""Prefill and decode speed of the same model with fp32 and with bf16 weights, on this CPU.

The default dtype on a CPU is bf16 wherever bf16 computes fast (`distributed.bf16_supported`):
with AVX512-BF16, or with the AVX2 kernels (bf16 decoding by the kernels, prefill matmuls in
fp32 on weights widened a chunk at a time). This script checks that choice: a model of the
TinyLlama-1.1B geometry with `--layers` layers (random weights), a `--prompt`-token prefill
and `--steps` decode steps at batch 1, each dtype in turn, medians of `--repeats`.

    python benchmarks/dtype_speed.py [--layers 4] [--prompt 128,512] [--steps 16] [--repeats 3]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from llama import alignment, distributed, kernel_report, kernels, layout  # noqa: E402
from llama.model import ModelArgs, Transformer  # noqa: E402


def build(layers: int, max_seq_len: int, dtype: torch.dtype) -> Transformer:
    """TinyLlama geometry, `layers` layers, random weights in `dtype` (the linear layers' placed
    as loading places them, `alignment.place_weight`), cache allocated."""
    args = ModelArgs(
        dim=2048,
        n_layers=layers,
        n_heads=32,
        n_kv_heads=4,
        vocab_size=32016,
        multiple_of=256,
        rope_theta=1e6,
        max_batch_size=1,
        max_seq_len=max_seq_len,
    )
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = Transformer(args)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, parameter.shape[-1] ** -0.5)
    model.to(dtype)
    for name, parameter in model.named_parameters():
        if layout.is_linear_weight(name):
            parameter.data = alignment.place_weight(parameter.data)
    model.allocate_cache(dtype, "cpu")
    return model.eval()


@torch.inference_mode()
def measure(model: Transformer, prompt: int, steps: int, repeats: int) -> Dict[str, float]:
    """Median prefill tokens/s of a `prompt`-token prompt and decode tokens/s over `steps` steps."""
    tokens = torch.randint(3, 32000, (1, prompt), generator=torch.Generator().manual_seed(prompt))
    prefill, decode = [], []
    for _ in range(repeats + 1):  # the first round warms up
        start = time.perf_counter()
        logits = model(tokens, 0, last_only=True)
        prefill.append(prompt / (time.perf_counter() - start))
        next_token = logits[:, -1].argmax(-1, keepdim=True)
        start = time.perf_counter()
        for step in range(steps):
            logits = model(next_token, [prompt + step], last_only=True)
            next_token = logits[:, -1].argmax(-1, keepdim=True)
        decode.append(steps / (time.perf_counter() - start))
    return {"prefill": statistics.median(prefill[1:]), "decode": statistics.median(decode[1:])}


def main(argv: List[str] = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--prompt", default="128,512", help="comma-separated prompt lengths")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    opts = parser.parse_args(argv)
    prompts = [int(p) for p in opts.prompt.split(",")]
    if opts.layers < 1 or opts.steps < 1 or opts.repeats < 1 or min(prompts) < 1:
        parser.error("--layers, --steps, --repeats and every prompt length must be >= 1")
    distributed.init_model_parallel()
    print(kernel_report.report() + "\n")  # the instruction sets and paths behind the numbers
    print(
        f"Kernel variant: {kernels.variant()}; default CPU dtype: "
        f"{distributed.resolve_dtype(None, torch.device('cpu'))}; threads: {torch.get_num_threads()}\n"
    )
    print("| dtype | prompt | prefill tok/s | decode tok/s (batch 1) |")
    print("|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        model = build(opts.layers, max(prompts) + opts.steps, dtype)
        for prompt in prompts:
            result = measure(model, prompt, opts.steps, opts.repeats)
            print(f"| {dtype} | {prompt} | {result['prefill']:.1f} | {result['decode']:.2f} |", flush=True)
        del model


if __name__ == "__main__":
    main()
