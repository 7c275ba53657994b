"""Write a weight-only quantized copy of a checkpoint.

    python -m llama.quantize --ckpt_dir CodeLlama-7b --out CodeLlama-7b-int4 --mode int4 --group_size 64

The input is a 16-bit Meta checkpoint saved with any number of shards (or a Hugging Face
folder); the output folder holds `quantized.safetensors` (scheme, group size and layout in its
metadata), `params.json`, `tokenizer.model` and `checklist.chk`, and appears only once complete.
`Llama.build` loads it on any number of model-parallel ranks.
"""

import argparse
import sys
from typing import List, Optional

from llama.quantization import DEFAULT_GROUP_SIZE, GROUP_SIZES, MODES
from llama.quantized_checkpoint import write_quantized_checkpoint


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line; returns the exit status (1 with a one-line error on bad input)."""
    parser = argparse.ArgumentParser(
        prog="python -m llama.quantize",
        description="Quantize the linear layers of a Code Llama checkpoint to int8 or int4 (weight-only).",
    )
    parser.add_argument("--ckpt_dir", required=True, help="input 16-bit checkpoint folder (any shard count)")
    parser.add_argument("--out", required=True, help="output folder (must be empty or absent)")
    parser.add_argument("--mode", required=True, help=f"quantization scheme: {' or '.join(MODES)}")
    parser.add_argument(
        "--group_size",
        type=int,
        default=None,
        help=f"int4 inputs per scale and zero: {', '.join(map(str, GROUP_SIZES))} "
        f"(default {DEFAULT_GROUP_SIZE})",
    )
    parser.add_argument("--force", action="store_true", help="replace a non-empty --out")
    args = parser.parse_args(argv)
    try:
        out = write_quantized_checkpoint(
            args.ckpt_dir, args.out, args.mode, args.group_size, force=args.force
        )
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {out} ({args.mode})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
