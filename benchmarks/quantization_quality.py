"""Quality of int8 and int4 weight-only quantization on the bundled demo model, against its 16-bit
weights.

    python benchmarks/quantization_quality.py [--ckpt_dir models/demo] [--out_json quality.json]

On the held-out standard library modules of `scripts/eval_demo.py` (never seen in training):
- perplexity of next-token prediction (the files cut into chunks of `--seq_len` tokens), and the
  mean KL divergence KL(p_16bit || p_quantized) of the next-token distributions at every
  scored position;
- greedy agreement: `--prompts` held-out function headers, `--gen_len` greedy tokens each; the
  share of the 16-bit run's tokens that the quantized run reproduces at the same position, and
  the mean number of tokens before the first difference.
Every variant runs with fp32 activations (this engine's default on CPUs without bf16
instructions), so the only difference from the 16-bit run is the weights; one more row runs the
16-bit weights with bf16 activations, to show how far rounding alone moves these measures. Every linear layer
(including the output layer) is quantized; embeddings and norms keep their 16 bits. Group sizes
that do not divide the model's width are reported as not applicable.
"""

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from llama import Llama, quantization  # noqa: E402
from scripts.demo_data import read_source, split_corpus, stdlib_dir  # noqa: E402
from scripts.eval_demo import held_out_functions  # noqa: E402

VARIANTS = [("int8", None)] + [("int4", g) for g in quantization.GROUP_SIZES]


def held_out_chunks(llama: Llama, seq_len: int) -> List[List[int]]:
    """The held-out files as token chunks of at most `seq_len` (at least 2 tokens each)."""
    root = stdlib_dir()
    _train, held_out = split_corpus(root)
    chunks = []
    for path in held_out:
        text = read_source(root, path)
        if text is not None:
            ids = llama.tokenizer.encode(text, bos=True, eos=True)
            chunks += [ids[i : i + seq_len] for i in range(0, len(ids) - 1, seq_len)]
    return [chunk for chunk in chunks if len(chunk) >= 2]


@torch.inference_mode()
def compare(
    reference: Llama, quantized: Llama, chunks: List[List[int]], prompts: List[List[int]], gen_len: int
):
    """Perplexities, mean KL and greedy agreement of `quantized` against `reference`."""
    nll_ref = nll_q = kl = 0.0
    count = 0
    for chunk in chunks:
        tokens = torch.tensor([chunk])
        targets = tokens[0, 1:]
        logp_ref = F.log_softmax(reference.model.forward(tokens, 0)[0, :-1].double(), dim=-1)
        logp_q = F.log_softmax(quantized.model.forward(tokens, 0)[0, :-1].double(), dim=-1)
        nll_ref -= logp_ref.gather(1, targets[:, None]).sum().item()
        nll_q -= logp_q.gather(1, targets[:, None]).sum().item()
        kl += (logp_ref.exp() * (logp_ref - logp_q)).sum().item()
        count += len(targets)
    ref_tokens, _ = reference.generate(prompts, max_gen_len=gen_len, temperature=0.0)
    q_tokens, _ = quantized.generate(prompts, max_gen_len=gen_len, temperature=0.0)
    same = total = 0
    prefixes = []
    for want, got in zip(ref_tokens, q_tokens):
        same += sum(a == b for a, b in zip(want, got))
        total += len(want)
        prefix = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
        prefixes.append(prefix)
    return {
        "ppl_16bit": math.exp(nll_ref / count),
        "ppl": math.exp(nll_q / count),
        "mean_kl": kl / count,
        "greedy_agreement": same / max(total, 1),
        "mean_identical_prefix": sum(prefixes) / len(prefixes),
        "tokens_scored": count,
    }


def linear_weight_bytes(llama: Llama) -> int:
    """Bytes of the model's linear weights as loaded (codes, scales and zeros)."""
    total = 0
    for module in llama.model.modules():
        if isinstance(module, quantization.QuantizedWeight):
            total += sum(b.numel() * b.element_size() for b in module.buffers())
    return total


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ckpt_dir", default=str(REPO / "models" / "demo"))
    parser.add_argument("--seq_len", type=int, default=320)
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--gen_len", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out_json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    tokenizer = str(Path(args.ckpt_dir) / "tokenizer.model")

    def build(dtype: str = "float32", **kwargs) -> Llama:
        return Llama.build(args.ckpt_dir, tokenizer, args.seq_len, args.prompts, dtype=dtype, **kwargs)

    reference = build()
    chunks = held_out_chunks(reference, args.seq_len)
    prompts = [
        reference.tokenizer.encode(item.header, bos=True, eos=False)
        for item in held_out_functions(reference, args.prompts)
    ]
    dense_bytes = (
        sum(
            m.weight.numel() * 2
            for m in reference.model.modules()
            if hasattr(m, "weight") and m.weight.dim() == 2
        )
        - reference.model.tok_embeddings.weight.numel() * 2
    )
    # For scale: the 16-bit weights with bf16 activations differ from fp32 ones by rounding alone.
    results: Dict[str, Dict] = {
        "16-bit, bf16 activations": compare(reference, build("bfloat16"), chunks, prompts, args.gen_len)
    }
    for mode, group in VARIANTS:
        name = mode if group is None else f"{mode} g{group}"
        try:
            quantized = build(quantize=mode, quantize_group_size=group)
        except ValueError as err:
            results[name] = {"not_applicable": str(err)}
            continue
        results[name] = compare(reference, quantized, chunks, prompts, args.gen_len)
        results[name]["linear_weight_bytes"] = linear_weight_bytes(quantized)
    print(f"\n16-bit linear weights: {dense_bytes} bytes; {len(chunks)} chunks, {len(prompts)} prompts\n")
    print("| weights | linear weights | perplexity | vs 16-bit | mean KL | greedy agreement | same prefix |")
    print("|---|---|---|---|---|---|---|")
    first = next(r for r in results.values() if "ppl" in r)
    print(f"| 16-bit | {dense_bytes / 1e6:.2f} MB | {first['ppl_16bit']:.3f} | - | - | - | - |")
    for name, r in results.items():
        if "not_applicable" in r:
            print(f"| {name} | - | n/a | | | | |")
            continue
        size = f"{r['linear_weight_bytes'] / 1e6:.2f} MB" if "linear_weight_bytes" in r else "-"
        print(
            f"| {name} | {size} | {r['ppl']:.3f} | "
            f"{100 * (r['ppl'] / r['ppl_16bit'] - 1):+.2f}% | {r['mean_kl']:.4f} | "
            f"{100 * r['greedy_agreement']:.1f}% | {r['mean_identical_prefix']:.1f} / {args.gen_len} |"
        )
    if args.out_json:
        args.out_json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
