"""What the subcommands share: the usage error, reading the prompt, loading the model on every rank."""

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Callable, Optional, TypeVar

from llama import distributed
from llama.cli import model_paths
from llama.generation import Llama

PROG = "codellama"
# The folder holding `models/demo` (the repository root of an editable install).
PACKAGE_ROOT = Path(__file__).resolve().parents[2]
USAGE_ERROR = 2
T = TypeVar("T")


class UsageError(ValueError):
    """Bad input on the command line (exit status 2)."""


def read_prompt(prompt: Optional[str], path: Optional[str]) -> str:
    """The prompt from the argument, a file or standard input (in that order of precedence).

    Raises:
        UsageError: if both an argument and a file are given, the file is missing, or there is no prompt.
    """
    if prompt is not None and path is not None:
        raise UsageError("give the prompt either as an argument or with --file, not both")
    if path is not None:
        if not Path(path).is_file():
            raise UsageError(f"--file {path}: no such file")
        text = Path(path).read_text(encoding="utf-8")
    elif prompt is not None:
        text = prompt
    elif not sys.stdin.isatty():
        text = sys.stdin.read()
    else:
        text = ""
    if not text.strip():
        raise UsageError(
            "no prompt: give it as an argument, with --file PATH, or on standard input "
            "(echo 'def fib(n):' | codellama complete)"
        )
    return text


def first_rank_input(read: Callable[[], T]) -> Optional[T]:
    """What `read()` returns on rank 0 (the only rank reading input); None on the others."""
    return read() if distributed.is_first_rank() else None


def load_model(args: argparse.Namespace) -> Llama:
    """The model of the shared options; the load summary goes to stderr, stdout stays for results."""
    draft = getattr(args, "draft", None)
    if draft and getattr(args, "lookup", 0):
        raise ValueError("--draft and --lookup are two ways to speculate: pass one of them")
    ckpt_dir, tokenizer_path = model_paths(args.ckpt_dir, args.tokenizer_path, PACKAGE_ROOT)
    with contextlib.redirect_stdout(sys.stderr):  # fairscale announces the group on stdout
        distributed.init_model_parallel(args.model_parallel_size)
    distributed.silence_non_zero_ranks()
    with contextlib.redirect_stdout(sys.stderr if distributed.is_first_rank() else sys.stdout):
        return Llama.build(
            ckpt_dir,
            tokenizer_path,
            args.max_seq_len,
            args.max_batch_size,
            model_parallel_size=args.model_parallel_size,
            seed=args.seed,
            dtype=args.dtype,
            draft_ckpt_dir=draft,
            kv_cache_dtype=getattr(args, "kv_cache_dtype", None),
            kv_cache_tokens=getattr(args, "kv_cache_tokens", None),
        )


def print_json(result: dict) -> None:
    """Print `result` as one line of JSON (non-ASCII text as is)."""
    print(json.dumps(result, ensure_ascii=False), flush=True)
