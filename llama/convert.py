"""Convert between the Meta checkpoint layout and Hugging Face's LlamaForCausalLM layout.

    python -m llama.convert to-hf --ckpt_dir CodeLlama-7b --out_dir CodeLlama-7b-hf
    python -m llama.convert from-hf --hf_dir CodeLlama-7b-hf --out_dir CodeLlama-7b --mp 1

Only names, the wq/wk per-head row order and the config format change; the numbers are copied
bit for bit. `to-hf` also writes the tokenizer, chat template and generation files transformers
reads (`llama.hf_tokenizer`). Output goes to a staging folder that replaces `--out_dir` once complete.
"""

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional, Union

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from llama import checkpoint, hf_format, hf_tokenizer
from llama.output_dir import PathLike, copy_if_present, owns_storage, staged_output_dir
from llama.reshard import TOKENIZER_FILE, write_meta_checkpoint

DEFAULT_MAX_SHARD_SIZE = "2GB"
# Code Llama was trained on 16k-token sequences; the released HF configs say 16384.
DEFAULT_MAX_POSITION_EMBEDDINGS = 16384

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: Union[int, str]) -> int:
    """Bytes in a size such as 2000000, "500MB", "5GB" or "2GiB" (KB/MB/GB are powers of 10).

    Raises:
        ValueError: for anything else, or a size below one byte.
    """
    if isinstance(size, int):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", str(size), flags=re.IGNORECASE)
        if not match:
            raise ValueError(f"cannot read the size {size!r}: use e.g. 500MB, 5GB or 2GiB")
        value = int(float(match.group(1)) * _UNITS[(match.group(2) or "").upper()])
    if value < 1:
        raise ValueError(f"the size {size!r} must be at least one byte")
    return value


def plan_files(sizes: Dict[str, int], max_bytes: int) -> List[List[str]]:
    """Group tensor names, in order, into files of at most `max_bytes` (a larger tensor gets a
    file of its own)."""
    groups: List[List[str]] = [[]]
    used = 0
    for name, size in sizes.items():
        if groups[-1] and used + size > max_bytes:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += size
    return groups


def to_hf(
    ckpt_dir: str,
    out_dir: PathLike,
    *,
    force: bool = False,
    max_shard_size: Union[int, str] = DEFAULT_MAX_SHARD_SIZE,
    max_position_embeddings: int = DEFAULT_MAX_POSITION_EMBEDDINGS,
    progress: bool = True,
) -> Path:
    """Write the Meta checkpoint in `ckpt_dir` (any shard count) as a Hugging Face
    LlamaForCausalLM folder: `config.json`, `model.safetensors` (or `model-0000k-of-0000n`
    files and `model.safetensors.index.json` when larger than `max_shard_size`),
    `generation_config.json`, and if the checkpoint has a `tokenizer.model`, that file with the
    `tokenizer_config.json` (chat template included) and `special_tokens_map.json` that make
    transformers' AutoTokenizer encode like this engine. Holds at most one output file's
    tensors in memory.

    Returns:
        `out_dir`.

    Raises:
        FileNotFoundError: missing params.json or shards.
        ValueError: unreadable shards or tokenizer, a bad size, or a non-empty `out_dir`
            without `force`.
    """
    max_bytes = parse_size(max_shard_size)
    if isinstance(max_position_embeddings, bool) or not isinstance(max_position_embeddings, int):
        raise ValueError(f"max_position_embeddings must be an integer, got {max_position_embeddings!r}")
    if max_position_embeddings < 1:
        raise ValueError(f"max_position_embeddings must be positive, got {max_position_embeddings}")
    params = checkpoint.read_params(ckpt_dir)
    ckpt = checkpoint.open_checkpoint(ckpt_dir)
    keys = ckpt.keys()
    for required in ("tok_embeddings.weight", "layers.0.feed_forward.w1.weight"):
        if required not in keys:
            raise ValueError(f"checkpoint {ckpt_dir} has no tensor {required}: it is not a Llama checkpoint")
    n_heads, n_kv_heads = params["n_heads"], params.get("n_kv_heads") or params["n_heads"]
    names = {key: hf_format.hf_name(key) for key in keys}
    sizes = {key: _numel(ckpt.shape(key)) * _itemsize(ckpt.dtype(key)) for key in keys}
    groups = plan_files(sizes, max_bytes)
    filenames = (
        [hf_format.SINGLE_FILE]
        if len(groups) == 1
        else [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    )
    dtype = ckpt.dtype("tok_embeddings.weight")
    config = hf_format.config_from_params(
        params,
        vocab_size=ckpt.shape("tok_embeddings.weight")[0],
        hidden_dim=ckpt.shape("layers.0.feed_forward.w1.weight")[0],
        dtype=dtype,
        max_position_embeddings=max_position_embeddings,
    )
    with staged_output_dir(out_dir, force=force, source_dir=ckpt_dir) as staging:
        with tqdm(total=len(keys), unit="tensor", desc="to Hugging Face", disable=not progress) as bar:
            for group, filename in zip(groups, filenames):
                tensors = {}
                for key in group:
                    tensor = ckpt.read(key)
                    heads = hf_format.permuted_heads(key, n_heads, n_kv_heads)
                    if heads is not None:
                        tensor = hf_format.to_hf_rows(tensor, heads)
                    tensor = tensor.contiguous()
                    tensors[names[key]] = tensor if owns_storage(tensor) else tensor.clone()
                    bar.update()
                save_file(tensors, str(staging / filename), metadata={"format": "pt"})
                del tensors
        if len(groups) > 1:
            index = {
                "metadata": {"total_size": sum(sizes.values())},
                "weight_map": {
                    names[key]: filename for group, filename in zip(groups, filenames) for key in group
                },
            }
            (staging / hf_format.INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        (staging / hf_format.CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        has_tokenizer = copy_if_present(ckpt_dir, TOKENIZER_FILE, staging)
        hf_tokenizer.write_tokenizer_files(
            str(Path(ckpt_dir) / TOKENIZER_FILE) if has_tokenizer else None, staging, max_position_embeddings
        )
    return Path(out_dir)


def from_hf(
    hf_dir: str, out_dir: PathLike, mp: int = 1, *, force: bool = False, progress: bool = True
) -> Path:
    """Write the Hugging Face Llama checkpoint in `hf_dir` as a Meta checkpoint for MP=`mp`:
    `consolidated.NN.pth`, `params.json` (equivalent to config.json), `tokenizer.model` if
    present and `checklist.chk`. Holds at most one output shard in memory.

    Returns:
        `out_dir`.

    Raises:
        FileNotFoundError: missing config.json or safetensors files.
        ValueError: a config this engine cannot run, tensors that do not split into `mp`
            parts, or a non-empty `out_dir` without `force`.
    """
    if not hf_format.is_hf_dir(hf_dir):
        raise FileNotFoundError(
            f"{hf_dir} is not a Hugging Face checkpoint: it needs config.json and "
            f"{hf_format.SINGLE_FILE} or {hf_format.INDEX_FILE}"
        )
    ckpt = hf_format.HFCheckpoint(hf_dir)
    return write_meta_checkpoint(ckpt, ckpt.params, out_dir, mp, force=force, progress=progress)


def _numel(shape) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llama.convert",
        description="Convert Code Llama checkpoints between the Meta and Hugging Face layouts.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    to = commands.add_parser("to-hf", help="Meta consolidated.*.pth -> Hugging Face safetensors")
    to.add_argument("--ckpt_dir", required=True, help="Meta checkpoint folder (any shard count)")
    to.add_argument("--out_dir", required=True, help="output folder (must be empty or absent)")
    to.add_argument(
        "--max_shard_size",
        default=DEFAULT_MAX_SHARD_SIZE,
        help=f"largest safetensors file, e.g. 500MB, 5GB (default {DEFAULT_MAX_SHARD_SIZE})",
    )
    to.add_argument(
        "--max_position_embeddings",
        type=int,
        default=DEFAULT_MAX_POSITION_EMBEDDINGS,
        help=f"context length written to config.json (default {DEFAULT_MAX_POSITION_EMBEDDINGS})",
    )
    to.add_argument("--force", action="store_true", help="replace a non-empty --out_dir")
    back = commands.add_parser("from-hf", help="Hugging Face safetensors -> Meta consolidated.*.pth")
    back.add_argument(
        "--hf_dir", required=True, help="Hugging Face folder with config.json and *.safetensors"
    )
    back.add_argument("--out_dir", required=True, help="output folder (must be empty or absent)")
    back.add_argument("--mp", type=int, default=1, help="model-parallel size of the output (default 1)")
    back.add_argument("--force", action="store_true", help="replace a non-empty --out_dir")
    args = parser.parse_args(argv)
    try:
        if args.command == "to-hf":
            out = to_hf(
                args.ckpt_dir,
                args.out_dir,
                force=args.force,
                max_shard_size=args.max_shard_size,
                max_position_embeddings=args.max_position_embeddings,
            )
        else:
            out = from_hf(args.hf_dir, args.out_dir, args.mp, force=args.force)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
