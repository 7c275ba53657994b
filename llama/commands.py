"""The `codellama` command (also `python -m llama`): one entry point for every job.

    codellama complete|infill|chat|plan|mask   handled here (options parsed, the API called, results printed)
    codellama convert|reshard|quantize|serve   run `python -m llama.<tool>` with the remaining arguments

Every subcommand that loads a model defaults to the bundled demo model and takes the same model
options (`--ckpt_dir`, `--tokenizer_path`, `--max_seq_len`, `--max_batch_size`, `--dtype`, ...). Under
torchrun, rank 0 reads the input (argument, file, standard input) and prints; every rank computes.
Bad input ends with one line on stderr and exit status 2.
"""

import argparse
import contextlib
import importlib
import importlib.util
import inspect
import json
import runpy
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterator, List, NoReturn, Optional, Tuple, TypeVar

from llama import distributed, memory_plan
from llama.attention_mask import mask_grid, render_text, write_png
from llama.chat_repl import HELP, ChatSession, run_chat
from llama.cli import model_paths
from llama.engine import Completion, Request
from llama.generation import Llama
from llama.model import ModelArgs
from llama.prompts import (
    UNSAFE_ERROR,
    Dialog,
    infilling_prompt_tokens,
    instruct_prompt_tokens,
    is_unsafe,
    split_fill_me,
    turn_prompt_tokens,
    validate_dialog,
)
from llama.sampling import SamplingParams
from llama.tokenizer import Tokenizer

PROG = "codellama"
# The folder holding `models/demo` (the repository root of an editable install).
PACKAGE_ROOT = Path(__file__).resolve().parents[1]
DELEGATED = {
    "convert": "llama.convert",
    "reshard": "llama.reshard",
    "quantize": "llama.quantize",
    "serve": "llama.server",
}
USAGE_ERROR = 2
T = TypeVar("T")


class UsageError(ValueError):
    """Bad input on the command line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not argparse's usage block
        raise UsageError(f"{message} (see `{self.prog} --help`)")


# ----------------------------------------------------------------------------------- options


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
    return options


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


# ----------------------------------------------------------------------------------- input


def _read_prompt(prompt: Optional[str], path: Optional[str]) -> str:
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


def _first_rank_input(read: Callable[[], T]) -> Optional[T]:
    """What `read()` returns on rank 0 (the only rank reading input); None on the others."""
    return read() if distributed.is_first_rank() else None


def _load(args: argparse.Namespace) -> Llama:
    """The model of the shared options; the load summary goes to stderr, stdout stays for results."""
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
        )


def _print_json(result: dict) -> None:
    print(json.dumps(result, ensure_ascii=False), flush=True)


# ----------------------------------------------------------------------------------- generation


def _sampling(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
    )


def _on_first_rank(generator: Llama, work: Callable[[], int]) -> int:
    """Run `work` on model-parallel rank 0 with the engine stepping in its own thread (so Ctrl-C
    lands in the reading loop, never inside a step); the other ranks follow rank 0's steps until
    it shuts the engine down."""
    engine = generator.engine
    if not distributed.is_first_model_parallel_rank():
        engine.follow()
        return 0
    engine.start()
    try:
        return work()
    finally:
        engine.shutdown()


def _submit(
    generator: Llama, args: argparse.Namespace, prompt_tokens: List[int], default_stop: int
) -> Request:
    """Queue `prompt_tokens` with the command's sampling options; at most --max_gen_len tokens,
    never past --max_seq_len.

    Raises:
        UsageError: if the prompt leaves no room to generate, or an option is out of range.
    """
    room = generator.model.params.max_seq_len - len(prompt_tokens)
    if room < 1:
        raise UsageError(
            f"the prompt is {len(prompt_tokens)} tokens long, which leaves no room to generate within "
            f"--max_seq_len {generator.model.params.max_seq_len}: raise it or shorten the prompt"
        )
    if args.max_gen_len < 1:
        raise UsageError(f"--max_gen_len must be at least 1, got {args.max_gen_len}")
    return generator.engine.submit(
        prompt_tokens,
        max_tokens=min(args.max_gen_len, room),
        sampling=_sampling(args),
        stop=args.stop,
        default_stop=default_stop,
        logprobs=0 if args.logprobs else None,
    )


def _stream(request: Request) -> None:
    """Print the request's text as it is generated; Ctrl-C cancels it."""
    try:
        for event in request:
            sys.stdout.write(event.text)
            sys.stdout.flush()
    except KeyboardInterrupt:
        request.cancel()
        raise


def _completion_json(generator: Llama, completion: Completion, **texts: str) -> dict:
    """A result dictionary: the texts, finish reason and usage, and pieces and log-probabilities
    when they were asked for."""
    result: dict = dict(texts)
    result["finish_reason"] = completion.finish_reason
    result["usage"] = asdict(completion.usage)
    if completion.logprobs:
        result["tokens"] = [generator.tokenizer.token_piece(t) for t in completion.token_ids]
        result["logprobs"] = completion.logprobs
    return result


def run_complete(args: argparse.Namespace) -> int:
    """Stream the continuation of the prompt (exact text: it continues the prompt as typed)."""
    prompt = _first_rank_input(lambda: _read_prompt(args.prompt, args.file))
    generator = _load(args)

    def work() -> int:
        ids = generator.tokenizer.encode(prompt, bos=True, eos=False)
        request = _submit(generator, args, ids, generator.tokenizer.eos_id)
        if args.json:
            completion = request.result()
            _print_json(_completion_json(generator, completion, generation=completion.text))
            return 0
        _stream(request)
        print(flush=True)
        return 0

    return _on_first_rank(generator, work)


def run_infill(args: argparse.Namespace) -> int:
    """Stream the code generated at the prompt's <FILL_ME> (between the prefix and the suffix with
    --full_text)."""

    def read() -> Tuple[str, str]:
        text = _read_prompt(args.prompt, args.file)
        prefixes, suffixes = split_fill_me([text])  # exactly one marker, before loading anything
        return prefixes[0], suffixes[0]

    prefix, suffix = _first_rank_input(read) or ("", "")
    generator = _load(args)

    def work() -> int:
        tokenizer = generator.tokenizer
        ids = infilling_prompt_tokens(tokenizer, prefix, suffix, suffix_first=args.suffix_first)
        request = _submit(generator, args, ids, tokenizer.eot_id)
        if args.json:
            completion = request.result()
            texts = dict(generation=completion.text, full_text=prefix + completion.text + suffix)
            _print_json(_completion_json(generator, completion, **texts))
            return 0
        if args.full_text:
            sys.stdout.write(prefix)
        _stream(request)
        print(suffix if args.full_text else "", flush=True)
        return 0

    return _on_first_rank(generator, work)


# ----------------------------------------------------------------------------------- chat


def _require_instruct(ckpt_dir: str, forced: bool) -> None:
    """Refuse a checkpoint that was not fine-tuned for chat: Meta names those `CodeLlama-*-Instruct`
    (the bundled demo model was trained on Instruct dialogs too)."""
    folder = Path(ckpt_dir).resolve()
    if forced or "instruct" in folder.name.lower() or folder == (PACKAGE_ROOT / "models" / "demo").resolve():
        return
    raise UsageError(
        f"{ckpt_dir} is not an Instruct model (Instruct checkpoints are named like CodeLlama-7b-Instruct): "
        "chat needs one; pass --instruct if this checkpoint was fine-tuned for the Instruct format"
    )


def _read_dialogs(path: str) -> List[Dialog]:
    """A dialog (list of messages) or a list of dialogs from a JSON file, validated."""
    if not Path(path).is_file():
        raise UsageError(f"--dialog {path}: no such file")
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UsageError(f"--dialog {path} is not valid JSON: {err}") from err
    dialogs = [data] if isinstance(data, list) and data and isinstance(data[0], dict) else data
    if not isinstance(dialogs, list) or not dialogs:
        raise UsageError(f"--dialog {path} must hold a dialog (a list of messages) or a list of dialogs")
    for index, dialog in enumerate(dialogs):
        validate_dialog(dialog, index)
    return dialogs


def _read_terminal_line() -> Optional[str]:
    """One line typed on standard input (a prompt on stderr when it is a terminal); None at its end.
    Ctrl-C at the prompt gives an empty line, not an exit."""
    interactive = sys.stdin.isatty()
    try:
        if interactive:
            sys.stderr.write(">>> ")
            sys.stderr.flush()
        line = sys.stdin.readline()
    except KeyboardInterrupt:
        sys.stderr.write("\n")
        return ""
    return line if line else None


def _answer_stream(generator: Llama, args: argparse.Namespace) -> Callable[[Dialog], Iterator[str]]:
    """Streams the answer to a dialog in the model's chat format (Instruct, or the 70B turns)."""
    tokenizer = generator.tokenizer
    turns = tokenizer.step_id is not None

    def answer(dialog: Dialog) -> Iterator[str]:
        validate_dialog(dialog, 0)
        if is_unsafe(dialog):
            yield UNSAFE_ERROR
            return
        ids = (turn_prompt_tokens if turns else instruct_prompt_tokens)(tokenizer, dialog)
        request = _submit(generator, args, ids, tokenizer.step_id if turns else tokenizer.eos_id)
        started = False
        try:
            for event in request:
                text = event.text
                if not started and text:
                    # The answer follows "[/INST]" (or "\n\n") with one space that belongs to the format.
                    text, started = text[1:] if text.startswith(" ") else text, True
                yield text
        finally:
            if not request.finished:  # Ctrl-C or the reader stopped early
                request.cancel()

    return answer


def run_chat_command(args: argparse.Namespace) -> int:
    """Answer a dialog file once, or chat on the terminal (see llama.chat_repl)."""
    ckpt_dir, _ = model_paths(args.ckpt_dir, args.tokenizer_path, PACKAGE_ROOT)
    _require_instruct(ckpt_dir, args.instruct)
    dialogs = _first_rank_input(lambda: _read_dialogs(args.dialog)) if args.dialog else None
    generator = _load(args)
    answer = _answer_stream(generator, args)

    def answer_dialogs() -> int:
        for dialog in dialogs:
            if args.json:
                message = {"role": "assistant", "content": "".join(answer(dialog))}
                if generator.tokenizer.step_id is not None:
                    message["destination"] = "user"
                _print_json({"generation": message})
            else:
                for piece in answer(dialog):
                    sys.stdout.write(piece)
                    sys.stdout.flush()
                print(flush=True)
        return 0

    def chat() -> int:
        if sys.stdin.isatty():
            print(f"chat with {ckpt_dir} ({HELP}; Ctrl-C stops an answer)", file=sys.stderr)
        session = ChatSession(answer, turn_format=generator.tokenizer.step_id is not None, system=args.system)
        run_chat(session, _read_terminal_line)
        return 0

    return _on_first_rank(generator, answer_dialogs if args.dialog else chat)


# ----------------------------------------------------------------------------------- plan


def _model_args(model: Optional[str], ckpt_dir: Optional[str]) -> Tuple[ModelArgs, str, int]:
    """The shapes to plan for, a name for them, and the default model-parallel size."""
    from llama import checkpoint

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


def _devices(args: argparse.Namespace, mp_size: int) -> Optional[memory_plan.Devices]:
    from llama.convert import parse_size

    if args.gpu_memory is None:
        if args.num_gpus is not None:
            raise UsageError("--num_gpus needs --gpu_memory (the memory of each GPU)")
        return memory_plan.host_devices(mp_size)
    each = parse_size(args.gpu_memory)
    if args.num_gpus is not None and args.num_gpus < 1:
        raise UsageError(f"--num_gpus must be at least 1, got {args.num_gpus}")
    count = args.num_gpus if args.num_gpus is not None else mp_size
    return memory_plan.Devices(each, count=count, label=f"{count} GPU(s) of {each / memory_plan.GIB:.2f} GiB")


def _gib(n: int) -> str:
    return f"{n / memory_plan.GIB:9.2f} GiB"


def run_plan(args: argparse.Namespace) -> int:
    """Print the bytes per rank, whether they fit, and the closest settings that do (exit 1 if the
    asked settings do not fit)."""
    if args.max_seq_len < 1 or args.max_batch_size < 1:
        raise UsageError("--max_seq_len and --max_batch_size must be positive integers")
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
    )
    need = memory_plan.rank_bytes(settings)
    devices = _devices(args, mp_size)
    fits = None if devices is None else devices.fits(need, mp_size)
    suggestions = [] if devices is None or fits else memory_plan.smallest_fitting(settings, devices)
    if args.json:
        _print_json(
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


# ----------------------------------------------------------------------------------- mask


def run_mask(args: argparse.Namespace) -> int:
    """Print the attention mask of the prompts packed into one prefill (and write --png)."""
    if args.prompts and args.file:
        raise UsageError("give prompts either as arguments or with --file, not both")
    texts = list(args.prompts) or [_read_prompt(None, args.file)]
    _, tokenizer_path = model_paths(args.ckpt_dir, args.tokenizer_path, PACKAGE_ROOT)
    tokenizer = Tokenizer(tokenizer_path)
    if args.infill:
        prefixes, suffixes = split_fill_me(texts)
        prompts = [
            infilling_prompt_tokens(tokenizer, prefix, suffix, suffix_first=args.suffix_first)
            for prefix, suffix in zip(prefixes, suffixes)
        ]
    else:
        if args.suffix_first:
            raise UsageError("--suffix_first needs --infill")
        prompts = [tokenizer.encode(text, bos=True, eos=False) for text in texts]
    grid = mask_grid(tokenizer, prompts)
    print(render_text(grid))
    if args.png:
        write_png(grid, Path(args.png))
        print(f"wrote {args.png}", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------------- entry point


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
