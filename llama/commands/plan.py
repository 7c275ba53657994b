"""`codellama plan`: the bytes one rank needs (llama.memory_plan), whether they fit, and what would."""

import argparse
from pathlib import Path
from typing import Optional, Tuple

from llama import checkpoint, distributed, memory_plan
from llama.cli import model_paths
from llama.commands.common import PACKAGE_ROOT, UsageError, print_json
from llama.convert import parse_size
from llama.model import ModelArgs
from llama.tokenizer import Tokenizer


def _model_args(model: Optional[str], ckpt_dir: Optional[str]) -> Tuple[ModelArgs, str, int]:
    """The shapes to plan for, a name for them, and the default model-parallel size."""

    if model is not None and model.lower() in memory_plan.MODEL_SIZES:
        size = model.lower()
        return memory_plan.MODEL_SIZES[size], f"Code Llama {size.upper()}", memory_plan.RELEASED_MP[size]
    if model is not None and not Path(model).exists():
        raise UsageError(
            f"unknown model {model!r}: use 7b, 13b, 34b, 70b, or the path of a params.json or a "
            "checkpoint folder"
        )
    if model is None:
        folder, _ = model_paths(ckpt_dir, None, PACKAGE_ROOT)
    else:
        folder = model if Path(model).is_dir() else str(Path(model).parent)
    params = checkpoint.read_params(folder)
    args = ModelArgs(**params)
    if args.vocab_size is None or args.vocab_size <= 0:
        tokenizer = Path(folder) / "tokenizer.model"
        if not tokenizer.is_file():
            raise UsageError(
                f"{folder}/params.json has no vocab_size and there is no tokenizer.model beside it"
            )
        args.vocab_size = Tokenizer(str(tokenizer)).n_words
    return args, str(folder), 1


def _devices(args: argparse.Namespace) -> Optional[memory_plan.Devices]:

    if args.gpu_memory is None:
        if args.num_gpus is not None:
            raise UsageError("--num_gpus needs --gpu_memory (the memory of each GPU)")
        return memory_plan.host_devices()
    each = parse_size(args.gpu_memory)
    if args.num_gpus is not None and args.num_gpus < 1:
        raise UsageError(f"--num_gpus must be at least 1, got {args.num_gpus}")
    gib = f"{each / memory_plan.GIB:.2f} GiB"
    if args.num_gpus is None:  # as many as the ranks need
        return memory_plan.Devices(each, label=f"one GPU of {gib} per rank")
    return memory_plan.Devices(each, count=args.num_gpus, label=f"{args.num_gpus} GPU(s) of {gib}")


def _kv_cache_kind(settings: memory_plan.Settings) -> str:
    if settings.kv_cache_dtype == "int8":
        return "int8 codes and fp32 scales"
    return memory_plan.dtype_name(settings.dtype)


def _gib(n: int) -> str:
    return f"{n / memory_plan.GIB:9.2f} GiB"


def run_plan(args: argparse.Namespace) -> int:
    """Print the bytes per rank, whether they fit, and the closest settings that do (exit 1 if the
    asked settings do not fit)."""
    if args.max_seq_len < 1 or args.max_batch_size < 1:
        raise UsageError("--max_seq_len and --max_batch_size must be positive integers")
    if args.kv_cache_tokens is not None and args.kv_cache_tokens < 1:
        raise UsageError(f"--kv_cache_tokens must be a positive integer, got {args.kv_cache_tokens}")
    model_args, name, released_mp = _model_args(args.model, args.ckpt_dir)
    mp_size = args.model_parallel_size if args.model_parallel_size is not None else released_mp
    settings = memory_plan.Settings(
        model_args,
        mp_size=mp_size,
        dtype=distributed.DTYPES[args.dtype],
        quantization=args.quantize,
        group_size=args.group_size,
        max_seq_len=args.max_seq_len,
        max_batch_size=args.max_batch_size,
        kv_cache_dtype=args.kv_cache_dtype,
        kv_cache_tokens=args.kv_cache_tokens,
    )
    need = memory_plan.rank_bytes(settings)
    devices = _devices(args)
    fits = None if devices is None else devices.fits(need, mp_size)
    suggestions = [] if devices is None or fits else memory_plan.smallest_fitting(settings, devices)
    if args.json:
        print_json(
            {
                "model": name,
                "settings": settings.describe(),
                "per_rank": need.as_dict(),
                "devices": None if devices is None else devices.label,
                "fits": fits,
                "suggestions": [
                    {"why": why, "settings": s.describe(), "per_rank": memory_plan.rank_bytes(s).as_dict()}
                    for why, s in suggestions
                ],
            }
        )
        return 0 if fits is not False else 1
    a = model_args
    print(
        f"{name}: dim {a.dim}, {a.n_layers} layers, {a.n_heads} heads, {a.kv_heads} kv heads, "
        f"FFN {a.ffn_hidden_dim}, vocab {a.vocab_size}"
    )
    print(f"settings: {settings.describe()}")
    per_token = memory_plan.kv_cache_bytes_per_token(settings)
    print(f"KV cache per token: {per_token / 2**10:.1f} KiB per rank ({_kv_cache_kind(settings)})")
    print(f"per rank ({mp_size} rank{'s' if mp_size > 1 else ''}):")
    for label, value in (
        ("weights", need.weights),
        ("KV cache", need.kv_cache),
        ("activations", need.activations),
        ("logits", need.logits),
        ("total", need.total),
    ):
        print(f"  {label:<12}{_gib(value)}")
    if devices is None:
        print("devices: unknown (give --gpu_memory)")
        return 0
    print(f"devices: {devices.label}")
    if fits:
        print("fits")
        return 0
    print("does not fit")
    if not suggestions:
        print("nothing close fits these devices: add GPUs or machines (more model-parallel ranks)")
    for why, candidate in suggestions:
        total = memory_plan.rank_bytes(candidate).total
        print(f"  {why}: {candidate.describe()}  ({total / memory_plan.GIB:.2f} GiB per rank)")
    return 1
