"""`python -m llama.server`: serve a checkpoint over HTTP (OpenAI and llama.cpp APIs).

Under `torchrun --nproc_per_node N -m llama.server ...` rank 0 serves HTTP and the other ranks
run the engine's broadcast steps. The HTTP socket comes up first (GET /health answers 503
while loading); the model loads in a background thread.
"""

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import List, Optional

import uvicorn

from llama import limits
from llama.cli import model_paths
from llama.kv_cache import KV_BLOCK_LEN, KV_CACHE_DTYPES
from llama.server.app import DEFAULT_MAX_BODY_BYTES, create_app
from llama.server.state import ServerState
from llama.speculation import Speculation

REPO_DIR = Path(__file__).resolve().parents[2]  # where the example scripts and models/demo are
WATCHDOG_SECONDS = 0.5


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """The command line (see --help)."""
    parser = argparse.ArgumentParser(
        prog="python -m llama.server",
        description="OpenAI- and llama.cpp-compatible HTTP server for Code Llama checkpoints.",
    )
    parser.add_argument("--ckpt_dir", help="checkpoint folder (default: the bundled demo model)")
    parser.add_argument("--tokenizer_path", help="tokenizer.model (default: the one in --ckpt_dir)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max_seq_len", type=int, default=2048, help="longest prompt + generation")
    parser.add_argument("--max_batch_size", type=int, default=4, help="generations running at once")
    parser.add_argument(
        "--max_queue",
        type=int,
        default=64,
        help="generations waiting for a slot before requests get 503 (default 64)",
    )
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    parser.add_argument("--compile", action="store_true", help="run decode steps through torch.compile")
    parser.add_argument(
        "--kv_cache_dtype",
        "--kv-cache-dtype",
        choices=KV_CACHE_DTYPES,
        default=None,
        help="store the KV cache as int8 codes with one scale per token and head: about half the "
        "memory of a 16-bit cache (default: the --dtype)",
    )
    parser.add_argument(
        "--kv_cache_tokens",
        "--kv-cache-tokens",
        type=int,
        default=None,
        metavar="N",
        help="page the KV cache: a pool of N positions shared by the slots (in blocks of "
        f"{KV_BLOCK_LEN}), instead of max_batch_size x max_seq_len; requests wait for room, one that "
        "could never fit gets 400 (default: no pool)",
    )
    parser.add_argument(
        "--api_key",
        default=os.environ.get("CODELLAMA_API_KEY"),
        help="require 'Authorization: Bearer KEY' (default: $CODELLAMA_API_KEY, else none)",
    )
    parser.add_argument("--model_name", help="model name reported and accepted (default: the folder name)")
    parser.add_argument("--max_body_bytes", type=int, default=DEFAULT_MAX_BODY_BYTES)
    parser.add_argument(
        "--grace_period",
        type=float,
        default=30.0,
        help="seconds running requests may take to finish after SIGTERM",
    )
    parser.add_argument(
        "--lookup",
        type=int,
        default=0,
        metavar="N",
        help="speculative decoding by prompt lookup for requests without a `speculative` field: "
        f"propose up to N tokens per step, 1..{limits.MAX_SPECULATIVE_TOKENS} (default 0: off)",
    )
    parser.add_argument(
        "--draft",
        metavar="DIR",
        help="a smaller checkpoint with the same tokenizer, loaded beside the model, that proposes "
        'tokens for requests asking for the "draft" method (the default with this flag)',
    )
    parser.add_argument(
        "--draft_tokens",
        type=int,
        default=4,
        metavar="N",
        help=f"with --draft: most tokens proposed per step by default, 1..{limits.MAX_SPECULATIVE_TOKENS}",
    )
    parser.add_argument(
        "--log_level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    args = parser.parse_args(argv)
    for name in ("max_seq_len", "max_batch_size", "port", "max_body_bytes"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be a positive integer, got {getattr(args, name)}")
    if args.max_queue < 0:
        parser.error(f"--max_queue must be >= 0, got {args.max_queue}")
    if not 0 <= args.lookup <= limits.MAX_SPECULATIVE_TOKENS:
        parser.error(f"--lookup must be in [0, {limits.MAX_SPECULATIVE_TOKENS}] (0: off), got {args.lookup}")
    if not 1 <= args.draft_tokens <= limits.MAX_SPECULATIVE_TOKENS:
        parser.error(
            f"--draft_tokens must be in [1, {limits.MAX_SPECULATIVE_TOKENS}], got {args.draft_tokens}"
        )
    if args.draft and args.lookup:
        parser.error("--draft and --lookup are two default ways to speculate: pass one of them")
    return args


def default_speculation(args: argparse.Namespace) -> Optional[Speculation]:
    """For requests that do not say: the draft model with --draft, prompt lookup with --lookup N,
    else None (off)."""
    if args.draft:
        return Speculation("draft", num_tokens=args.draft_tokens)
    return Speculation("lookup", num_tokens=args.lookup) if args.lookup else None


def _build(args: argparse.Namespace, ckpt_dir: str, tokenizer_path: str):
    from llama import Llama  # imported here: torch loads after the socket is up

    llama = Llama.build(
        ckpt_dir,
        tokenizer_path,
        args.max_seq_len,
        args.max_batch_size,
        dtype=args.dtype,
        compile=args.compile,
        draft_ckpt_dir=args.draft,
        kv_cache_dtype=args.kv_cache_dtype,
        kv_cache_tokens=args.kv_cache_tokens,
    )
    # `generate` sets up the compiled decode step on first use; the server drives the engine
    # directly, so it sets it up here (a no-op without --compile).
    llama.set_up_compile()
    return llama


def follow(args: argparse.Namespace, ckpt_dir: str, tokenizer_path: str) -> int:
    """A model-parallel rank > 0: load its shard and run rank 0's steps until rank 0 shuts down.

    SIGTERM is left to rank 0's shutdown broadcast, so every rank stops at the same step.
    """
    signal.signal(signal.SIGTERM, lambda *_: None)
    llama = _build(args, ckpt_dir, tokenizer_path)
    llama.engine.follow()
    return 0


def serve(args: argparse.Namespace, ckpt_dir: str, tokenizer_path: str) -> int:
    """Rank 0: serve HTTP, load the model once the socket is up, exit 0 after SIGTERM (running
    requests get `--grace_period` seconds), exit 1 if loading fails or the engine stops."""
    state = ServerState(
        args.model_name or Path(ckpt_dir).resolve().name, args.max_queue, default_speculation(args)
    )
    app = create_app(state, api_key=args.api_key, max_body_bytes=args.max_body_bytes)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=args.log_level == "debug",
        timeout_graceful_shutdown=args.grace_period,
    )
    server = uvicorn.Server(config)
    failure: List[str] = []

    def fail(message: str) -> None:
        print(f"error: {message}", file=sys.stderr, flush=True)
        failure.append(message)
        server.should_exit = True

    def load_then_watch() -> None:
        while not server.started and not server.should_exit:
            time.sleep(0.02)
        if server.should_exit:
            return
        try:
            llama = _build(args, ckpt_dir, tokenizer_path)
            llama.engine.start()
        except Exception as error:  # reported by /health and the exit status
            state.load_error = f"{type(error).__name__}: {error}"
            fail(f"loading {ckpt_dir} failed: {state.load_error}")
            return
        state.set_ready(
            llama.engine, llama.tokenizer, model_parallel=int(os.environ.get("WORLD_SIZE", "1")) > 1
        )
        print(f"Serving {state.model_name} on http://{args.host}:{args.port}", flush=True)
        while not server.should_exit:
            if not state.engine_alive():
                fail(f"{state.engine_error}; exiting")
                return
            time.sleep(WATCHDOG_SECONDS)

    # uvicorn re-raises a captured SIGTERM after its graceful shutdown, through the handler in
    # place before it started: this one lets the process end with status 0 instead of dying.
    signal.signal(signal.SIGTERM, lambda *_: None)
    threading.Thread(target=load_then_watch, name="codellama-loader", daemon=True).start()
    server.run()
    if state.engine_ is not None:
        try:
            state.engine_.shutdown()  # cancels what is left and releases the other ranks
        except Exception as error:  # a rank already gone: nothing left to release
            print(f"warning: engine shutdown: {error}", file=sys.stderr)
    return 1 if failure else 0


def main(argv: Optional[List[str]] = None) -> int:
    """Parse the command line and serve (rank 0) or follow (other ranks); the exit status."""
    args = parse_args(argv)
    try:
        ckpt_dir, tokenizer_path = model_paths(args.ckpt_dir, args.tokenizer_path, REPO_DIR)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) != 0:
        return follow(args, ckpt_dir, tokenizer_path)
    return serve(args, ckpt_dir, tokenizer_path)


if __name__ == "__main__":
    sys.exit(main())
