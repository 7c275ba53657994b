"""`codellama chat`: the terminal chat loop (llama.chat_repl), or a dialog file answered once."""

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Iterator, List, Optional

from llama.chat_repl import HELP, ChatSession, run_chat
from llama.cli import model_paths
from llama.commands.common import PACKAGE_ROOT, UsageError, first_rank_input, load_model, print_json
from llama.commands.generate import on_first_rank, submit
from llama.generation import Llama
from llama.prompts import (
    UNSAFE_ERROR,
    Dialog,
    instruct_prompt_tokens,
    is_unsafe,
    turn_prompt_tokens,
    validate_dialog,
)


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


def _answerstream(generator: Llama, args: argparse.Namespace) -> Callable[[Dialog], Iterator[str]]:
    """Streams the answer to a dialog in the model's chat format (Instruct, or the 70B turns)."""
    tokenizer = generator.tokenizer
    turns = tokenizer.step_id is not None

    def answer(dialog: Dialog) -> Iterator[str]:
        validate_dialog(dialog, 0)
        if is_unsafe(dialog):
            yield UNSAFE_ERROR
            return
        ids = (turn_prompt_tokens if turns else instruct_prompt_tokens)(tokenizer, dialog)
        request = submit(generator, args, ids, tokenizer.step_id if turns else tokenizer.eos_id)
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
    dialogs = first_rank_input(lambda: _read_dialogs(args.dialog)) if args.dialog else None
    generator = load_model(args)
    answer = _answerstream(generator, args)

    def answer_dialogs() -> int:
        for dialog in dialogs:
            if args.json:
                message = {"role": "assistant", "content": "".join(answer(dialog))}
                if generator.tokenizer.step_id is not None:
                    message["destination"] = "user"
                print_json({"generation": message})
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

    return on_first_rank(generator, answer_dialogs if args.dialog else chat)
