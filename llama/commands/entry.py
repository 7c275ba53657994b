"""The `codellama` parser and dispatch: options shared by the subcommands, the checkpoint tools run
under their own parsers, and one-line errors with exit status 2."""

import argparse
import importlib
import importlib.util
import inspect
import runpy
import sys
from typing import List, NoReturn, Optional

from llama import distributed, kv_cache, limits, memory_plan
from llama.commands.chat import run_chat_command
from llama.commands.common import PROG, USAGE_ERROR, UsageError
from llama.commands.generate import run_complete, run_infill
from llama.commands.mask import run_mask
from llama.commands.plan import run_plan

DELEGATED = {
    "convert": "llama.convert",
    "reshard": "llama.reshard",
    "quantize": "llama.quantize",
    "serve": "llama.server",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not argparse's usage block
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _model_options() -> argparse.ArgumentParser:
    options = argparse.ArgumentParser(add_help=False)
    group = options.add_argument_group("model")
    group.add_argument("--ckpt_dir", help="checkpoint folder (default: the bundled demo model, models/demo)")
    group.add_argument("--tokenizer_path", help="tokenizer.model (default: the one in --ckpt_dir)")
    group.add_argument(
        "--max_seq_len", type=int, default=512, help="longest prompt + generation (default 512)"
    )
    group.add_argument(
        "--max_batch_size", type=int, default=1, help="sequences generated at once (default 1)"
    )
    group.add_argument(
        "--dtype", choices=sorted(distributed.DTYPES), help="weights and activations (default: per device)"
    )
    group.add_argument(
        "--model_parallel_size", type=int, help="ranks the model is split over (default: all processes)"
    )
    group.add_argument("--seed", type=int, default=1, help="random seed, the same on every rank (default 1)")
    group.add_argument(
        "--kv_cache_dtype",
        "--kv-cache-dtype",
        choices=kv_cache.KV_CACHE_DTYPES,
        help="store the KV cache as int8 codes with one scale per token and head: about half the "
        "memory of a 16-bit cache (default: the --dtype)",
    )
    group.add_argument(
        "--kv_cache_tokens",
        "--kv-cache-tokens",
        type=int,
        metavar="N",
        help="page the KV cache: a pool of N positions shared by the rows (in blocks of "
        f"{kv_cache.KV_BLOCK_LEN}), instead of max_batch_size x max_seq_len; requests wait for room "
        "(default: no pool, every row holds max_seq_len)",
    )
    group.add_argument(
        "--draft",
        metavar="DIR",
        help="a smaller checkpoint with the same tokenizer that proposes tokens for the model to "
        "check (speculative decoding; --draft_tokens per step)",
    )
    return options


def _draft_tokens(text: str) -> int:
    """--draft_tokens' value: an integer in [1, MAX_SPECULATIVE_TOKENS]."""
    value = _lookup_tokens(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"must be an integer in [1, {limits.MAX_SPECULATIVE_TOKENS}], got 0")
    return value


def _lookup_tokens(text: str) -> int:
    """--lookup's value: an integer in [0, MAX_SPECULATIVE_TOKENS], refused before loading a model."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not 0 <= value <= limits.MAX_SPECULATIVE_TOKENS:
        raise argparse.ArgumentTypeError(
            f"must be an integer in [0, {limits.MAX_SPECULATIVE_TOKENS}] (0: off), got {text!r}"
        )
    return value


def _sampling_options(temperature: float, top_p: float, max_gen_len: int) -> argparse.ArgumentParser:
    options = argparse.ArgumentParser(add_help=False)
    group = options.add_argument_group("sampling")
    group.add_argument(
        "--temperature", type=float, default=temperature, help=f"0 is greedy (default {temperature})"
    )
    group.add_argument("--top_p", type=float, default=top_p, help=f"nucleus sampling mass (default {top_p})")
    group.add_argument("--top_k", type=int, default=0, help="sample among the k likeliest tokens (0: off)")
    group.add_argument(
        "--min_p", type=float, default=0.0, help="drop tokens below min_p x the likeliest (0: off)"
    )
    group.add_argument("--repetition_penalty", type=float, default=1.0, help="multiplicative (1: off)")
    group.add_argument("--presence_penalty", type=float, default=0.0, help="additive, in [-2, 2] (0: off)")
    group.add_argument("--frequency_penalty", type=float, default=0.0, help="additive, in [-2, 2] (0: off)")
    group.add_argument("--stop", action="append", default=[], help="stop before this text (up to 4 times)")
    group.add_argument(
        "--max_gen_len",
        type=int,
        default=max_gen_len,
        help=f"most tokens to generate (default {max_gen_len})",
    )
    group.add_argument(
        "--lookup",
        type=_lookup_tokens,
        default=0,
        metavar="N",
        help="speculative decoding by prompt lookup: propose up to N tokens per step, checked in one "
        f"pass (1..{limits.MAX_SPECULATIVE_TOKENS}; default 0: off)",
    )
    group.add_argument(
        "--draft_tokens",
        type=_draft_tokens,
        default=4,
        metavar="N",
        help=f"with --draft: most tokens proposed per step (1..{limits.MAX_SPECULATIVE_TOKENS}; default 4)",
    )
    group.add_argument("--json", action="store_true", help="print the result dictionaries as JSON lines")
    group.add_argument(
        "--logprobs", action="store_true", help="with --json: tokens and their log-probabilities"
    )
    return options


def _prompt_options(what: str) -> argparse.ArgumentParser:
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("prompt", nargs="?", help=f"{what} (default: --file, else standard input)")
    options.add_argument("--file", help="read the prompt from this file")
    return options


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand handled here."""
    parser = _Parser(
        prog=PROG, description="Code Llama from the command line: complete, infill, chat, plan, ..."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser, required=True)
    model = _model_options()

    complete = commands.add_parser(
        "complete",
        parents=[model, _sampling_options(0.2, 0.9, 128), _prompt_options("the code to continue")],
        help="continue a prompt",
    )
    complete.set_defaults(run=run_complete)

    infill = commands.add_parser(
        "infill",
        parents=[model, _sampling_options(0.0, 0.9, 128), _prompt_options("code with one <FILL_ME> marker")],
        help="fill in the code at <FILL_ME>",
    )
    infill.add_argument("--suffix_first", action="store_true", help="suffix-prefix-middle prompt order")
    infill.add_argument("--full_text", action="store_true", help="print the whole filled-in text")
    infill.set_defaults(run=run_infill)

    chat = commands.add_parser(
        "chat", parents=[model, _sampling_options(0.2, 0.95, 256)], help="chat with an Instruct model"
    )
    chat.add_argument("--system", help="system message of the conversation")
    chat.add_argument("--dialog", help="answer the dialog(s) in this JSON file once, then exit")
    chat.add_argument(
        "--instruct",
        action="store_true",
        help="treat the checkpoint as Instruct even if its folder name says not",
    )
    chat.set_defaults(run=run_chat_command)

    plan = commands.add_parser(
        "plan", parents=[model], help="memory per rank for a model and settings, and whether it fits"
    )
    plan.add_argument(
        "--model", help="7b, 13b, 34b, 70b, or a params.json / checkpoint folder (default: --ckpt_dir)"
    )
    plan.add_argument("--quantize", choices=memory_plan.QUANTIZATIONS, help="weight-only quantization")
    plan.add_argument(
        "--group_size", type=int, default=memory_plan.DEFAULT_GROUP_SIZE, help="int4 group size (default 64)"
    )
    plan.add_argument("--gpu_memory", help="memory of each GPU, e.g. 24GiB or 24GB (default: this machine)")
    plan.add_argument("--num_gpus", type=int, help="GPUs available (default: one per rank)")
    plan.add_argument("--json", action="store_true", help="print the numbers (bytes) as JSON")
    plan.set_defaults(run=run_plan, dtype="bfloat16")

    mask = commands.add_parser("mask", help="draw the attention mask of prompts packed into one prefill")
    mask.add_argument("prompts", nargs="*", help="one or more prompts (default: --file, else standard input)")
    mask.add_argument("--file", help="read one prompt from this file")
    mask.add_argument("--ckpt_dir", help="checkpoint whose tokenizer to use (default: the demo model)")
    mask.add_argument("--tokenizer_path", help="tokenizer.model (default: the one in --ckpt_dir)")
    mask.add_argument("--infill", action="store_true", help="prompts with <FILL_ME>, as infilling prompts")
    mask.add_argument("--suffix_first", action="store_true", help="with --infill: suffix-prefix-middle order")
    mask.add_argument("--png", help="also write the picture to this PNG file")
    mask.set_defaults(run=run_mask)

    for name in DELEGATED:  # listed for --help; parsed by the tool itself
        commands.add_parser(
            name, help=f"python -m {DELEGATED[name]} (its own options follow)", add_help=False
        )
    return parser


def _delegate(command: str, argv: List[str]) -> int:
    """Run `python -m llama.<tool>` with `argv` (its own parser reads them): its `main(argv)` when
    it has one, else the module as a script."""
    module_name = DELEGATED[command]
    if importlib.util.find_spec(module_name) is None:
        raise UsageError(f"`{PROG} {command}` needs {module_name}, which this installation does not have")
    saved = sys.argv
    sys.argv = [f"{PROG} {command}"] + argv
    try:
        module = importlib.import_module(module_name)
        tool_main = getattr(module, "main", None)
        if callable(tool_main):  # sys.argv is set too, for a main() that reads it
            takes_argv = bool(inspect.signature(tool_main).parameters)
            return (tool_main(argv) if takes_argv else tool_main()) or 0
        runpy.run_module(module_name, run_name="__main__", alter_sys=True)
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    finally:
        sys.argv = saved
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Run one `codellama` command line; returns the exit status (2 for bad input)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv and argv[0] in DELEGATED:
            return _delegate(argv[0], argv[1:])
        args = build_parser().parse_args(argv)
        return args.run(args)
    except (ValueError, FileNotFoundError) as error:
        message = " ".join(str(error).split("\n"))
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return USAGE_ERROR


def entry_point() -> NoReturn:
    """The `codellama` console script."""
    sys.exit(main())
