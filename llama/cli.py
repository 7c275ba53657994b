"""What the example scripts share: default model paths, reading the user's prompt, printing results.

The examples are `fire` command lines. They default to the demo model bundled in `models/demo/`
beside the scripts, and run either their built-in prompts or one prompt given with `--prompt TEXT`
or `--prompt_file PATH`.
"""

import sys
from pathlib import Path
from typing import Callable, List, Optional, Tuple, Union

import fire

from llama.prompts import Dialog, Message

DEMO_MODEL_DIR = Path("models") / "demo"
SEPARATOR = "=" * 34


def model_paths(
    ckpt_dir: Optional[str], tokenizer_path: Optional[str], script_dir: Union[str, Path]
) -> Tuple[str, str]:
    """The checkpoint folder and tokenizer to load.

    `ckpt_dir` defaults to the bundled demo model (`models/demo/` beside the example scripts in
    `script_dir`); `tokenizer_path` defaults to the `tokenizer.model` inside the checkpoint folder.

    Raises:
        FileNotFoundError: if the default demo model is not there (say how to get weights).
    """
    if ckpt_dir is None:
        demo = Path(script_dir).resolve() / DEMO_MODEL_DIR
        if not (demo / "params.json").is_file():
            raise FileNotFoundError(
                f"the bundled demo model is missing ({demo} has no params.json): restore models/demo "
                "from the repository, or pass --ckpt_dir and --tokenizer_path of a Code Llama "
                "checkpoint (see download.sh in the README)"
            )
        ckpt_dir = str(demo)
    if tokenizer_path is None:
        tokenizer_path = str(Path(ckpt_dir) / "tokenizer.model")
    return str(ckpt_dir), str(tokenizer_path)


def _raw_flag(name: str) -> Optional[str]:
    """The text given to `--name` on the command line, exactly as typed (fire would parse a value
    that looks like a Python literal, e.g. `--prompt 42` or `--prompt "a, b"`, into a non-string)."""
    argv = sys.argv[1:]
    for index, arg in enumerate(argv):
        for flag in (f"--{name}", f"--{name.replace('_', '-')}"):
            if arg.startswith(flag + "="):
                return arg[len(flag) + 1 :]
            if arg == flag and index + 1 < len(argv):
                return argv[index + 1]
    return None


def _as_text(value: object, flag: str) -> str:
    if isinstance(value, str):
        return value
    raw = _raw_flag(flag)
    return raw if raw is not None else str(value)


def user_prompt(prompt: Optional[object], prompt_file: Optional[object]) -> Optional[str]:
    """The user's own prompt from `--prompt TEXT` or `--prompt_file PATH`, or None when neither is
    given (then the example runs its built-in prompts).

    Raises:
        ValueError: if both are given, or the prompt is empty.
        FileNotFoundError: if the prompt file does not exist.
    """
    if prompt is not None and prompt_file is not None:
        raise ValueError("pass either --prompt or --prompt_file, not both")
    if prompt is not None:
        text = _as_text(prompt, "prompt")
        source = "--prompt"
    elif prompt_file is not None:
        path = Path(_as_text(prompt_file, "prompt_file"))
        if not path.is_file():
            raise FileNotFoundError(f"--prompt_file {path}: no such file")
        text = path.read_text(encoding="utf-8")
        source = f"--prompt_file {path}"
    else:
        return None
    if not text.strip():
        raise ValueError(f"{source} is empty: give the text to run")
    return text


def print_completion(prompt: str, generation: str) -> None:
    """A prompt, then its continuation after "> ", then a separator line."""
    print(prompt)
    print(f"> {generation}")
    print(f"\n{SEPARATOR}\n")


def print_infilling(prompt: str, generation: str, full_text: str) -> None:
    """The prompt with its gap, the generated middle after "> ", then the filled-in text."""
    print(f"\n{'=' * 16} Prompt {'=' * 16}\n")
    print(prompt)
    print(f"> {generation}")
    print(f"\n{'=' * 13} Filled in text {'=' * 13}\n")
    print(full_text)


def print_chat(dialog: Dialog, reply: Message) -> None:
    """Each message as "Role: content", then the reply as "> Assistant: content", then a separator."""
    for message in dialog:
        print(f"{message['role'].capitalize()}: {message['content']}\n")
    print(f"> {reply['role'].capitalize()}: {reply['content']}")
    print(f"\n{SEPARATOR}\n")


def user_dialog(prompt: str, system: Optional[str] = None) -> List[Dialog]:
    """A one-dialog batch asking `prompt`, after an optional system message."""
    dialog: Dialog = [] if system is None else [{"role": "system", "content": system}]
    dialog.append({"role": "user", "content": prompt})
    return [dialog]


def run(main: Callable) -> None:
    """Run `main` as a fire command line; a bad path or value ends with a one-line error message
    (exit status 1) instead of a traceback."""
    try:
        fire.Fire(main)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
