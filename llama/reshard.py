"""Rewrite a checkpoint for another model-parallel size.

    python -m llama.reshard --ckpt_dir CodeLlama-13b --out_dir CodeLlama-13b-mp1 --mp 1

The input is a Meta checkpoint saved with any number of shards (or a Hugging Face folder); the
output is `consolidated.00.pth` .. `consolidated.{M-1:02d}.pth` for MP=M, with `params.json`,
`tokenizer.model` and a fresh `checklist.chk`. Output shards are written one at a time from
slices of the memory-mapped input, and the folder appears only once it is complete.
"""

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch
from tqdm import tqdm

from llama import checkpoint
from llama.output_dir import PathLike, copy_if_present, owns_storage, staged_output_dir, write_checklist

TOKENIZER_FILE = "tokenizer.model"


def write_meta_checkpoint(
    ckpt: checkpoint.Checkpoint,
    params: Dict,
    out_dir: PathLike,
    mp: int,
    *,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Write `ckpt` as a Meta checkpoint for `mp` model-parallel ranks into `out_dir`.

    Copies `params.json` and `tokenizer.model` from the source folder when present (params.json
    is written from `params` otherwise) and writes `checklist.chk`. Only one output shard is
    held in memory at a time; tensors are stored in the checkpoint's own dtype.

    Returns:
        `out_dir`.

    Raises:
        ValueError: if the tensors do not match `params`, a tensor or the head counts cannot be
            split into `mp` parts (naming them), or `out_dir` is not empty and `force` is off.
    """
    if not isinstance(mp, int) or mp < 1:
        raise ValueError(f"--mp must be a positive integer, got {mp!r}")
    checkpoint.check_full_shapes(ckpt, params)
    checkpoint.check_splittable(ckpt, params, mp)
    keys = ckpt.keys()
    with staged_output_dir(out_dir, force=force, source_dir=ckpt.source) as staging:
        with tqdm(
            total=mp * len(keys), unit="tensor", desc=f"MP={mp} shards", delay=1.0, disable=not progress
        ) as bar:
            for rank in range(mp):
                shard = {}
                for key in keys:
                    tensor = ckpt.read(key, rank, mp)
                    # A view would make torch.save write the whole source tensor.
                    shard[key] = tensor if owns_storage(tensor) else tensor.clone()
                    bar.update()
                torch.save(shard, staging / f"consolidated.{rank:02d}.pth")
                del shard
        if not copy_if_present(ckpt.source, checkpoint.PARAMS_FILE, staging):
            (staging / checkpoint.PARAMS_FILE).write_text(json.dumps(params, indent=2) + "\n")
        copy_if_present(ckpt.source, TOKENIZER_FILE, staging)
        write_checklist(staging)
    return Path(out_dir)


def reshard(ckpt_dir: str, out_dir: str, mp: int, force: bool = False, progress: bool = True) -> Path:
    """Rewrite the checkpoint in `ckpt_dir` (any shard count, or Hugging Face layout) for MP=`mp`
    into `out_dir`. See `write_meta_checkpoint` for what is written and raised; missing inputs
    raise FileNotFoundError."""
    params = checkpoint.read_params(ckpt_dir)
    with checkpoint.open_checkpoint(ckpt_dir) as ckpt:
        return write_meta_checkpoint(ckpt, params, out_dir, mp, force=force, progress=progress)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llama.reshard",
        description="Rewrite a Code Llama checkpoint for another model-parallel size (number of shards).",
    )
    parser.add_argument("--ckpt_dir", required=True, help="input checkpoint folder (any shard count)")
    parser.add_argument("--out_dir", required=True, help="output folder (must be empty or absent)")
    parser.add_argument("--mp", type=int, required=True, help="model-parallel size of the output")
    parser.add_argument("--force", action="store_true", help="replace a non-empty --out_dir")
    args = parser.parse_args(argv)
    try:
        out = reshard(args.ckpt_dir, args.out_dir, args.mp, force=args.force)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {out} (MP={args.mp})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
