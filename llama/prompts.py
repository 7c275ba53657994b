"""The prompt formats Code Llama was trained on: infilling, Instruct chat and turn-based chat.

Every function here turns text into token ids, byte-exact with the public release.
"""

import sys
from typing import List, Literal, Optional, Tuple, TypedDict

from llama.tokenizer import Tokenizer

if sys.version_info >= (3, 11):
    from typing import NotRequired
else:  # pragma: no cover
    from typing_extensions import NotRequired

Role = Literal["system", "user", "assistant"]


class Message(TypedDict):
    role: Role
    content: str
    destination: NotRequired[str]  # turn-based format only: who a message is for


Dialog = List[Message]

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = [B_INST, E_INST, "<<SYS>>", "<</SYS>>", "<step>"]
UNSAFE_ERROR = "Error: special tags are not allowed as part of the prompt."
FILL_ME = "<FILL_ME>"


def require_infilling(tokenizer: Tokenizer) -> None:
    """Raise ValueError unless the tokenizer has the four infilling pieces."""
    missing = [
        name
        for name, token_id in (
            ("▁<PRE>", tokenizer.prefix_id),
            ("▁<SUF>", tokenizer.suffix_id),
            ("▁<MID>", tokenizer.middle_id),
            ("▁<EOT>", tokenizer.eot_id),
        )
        if token_id is None
    ]
    if missing:
        raise ValueError(
            f"this model cannot infill: its tokenizer ({tokenizer.model_path}) lacks the pieces "
            f"{', '.join(missing)}. Infilling needs a Code Llama 7B, 13B or 70B base/Instruct model"
        )


def infilling_prompt_tokens(
    tokenizer: Tokenizer, prefix: str, suffix: str, suffix_first: bool = False
) -> List[int]:
    """Token ids of an infilling prompt.

    prefix-suffix-middle: `[BOS, PRE] + enc(prefix) + [SUF] + enc_nolead(suffix) + [MID]`;
    suffix-prefix-middle: `[BOS, PRE, SUF] + enc_nolead(suffix) + [MID] + enc(prefix)`.

    Raises:
        ValueError: if the tokenizer has no infilling pieces.
    """
    require_infilling(tokenizer)
    t = tokenizer
    if suffix_first:
        return (
            [t.bos_id, t.prefix_id, t.suffix_id]
            + t.encode_infilling(suffix)
            + [t.middle_id]
            + t.encode(prefix, bos=False, eos=False)
        )
    return (
        [t.bos_id, t.prefix_id]
        + t.encode(prefix, bos=False, eos=False)
        + [t.suffix_id]
        + t.encode_infilling(suffix)
        + [t.middle_id]
    )


def split_fill_me(prompts: List[str]) -> Tuple[List[str], List[str]]:
    """Split each prompt at its single `<FILL_ME>` marker into (prefixes, suffixes).

    Raises:
        ValueError: naming the first prompt with no marker or several.
    """
    prefixes, suffixes = [], []
    for index, prompt in enumerate(prompts):
        count = prompt.count(FILL_ME)
        if count != 1:
            raise ValueError(
                f"prompt {index} has {count} {FILL_ME} markers; put exactly one where the code "
                "should be filled in"
            )
        prefix, suffix = prompt.split(FILL_ME)
        prefixes.append(prefix)
        suffixes.append(suffix)
    return prefixes, suffixes


def is_unsafe(dialog: Dialog) -> bool:
    """True if any message contains a special tag (a prompt-injection attempt)."""
    return any(tag in message["content"] for message in dialog for tag in SPECIAL_TAGS)


def validate_dialog(dialog: Dialog, index: int) -> None:
    """Check a dialog's messages and role order.

    Expected: an optional leading `system` message, then `user` and `assistant` alternating,
    ending with `user`.

    Raises:
        ValueError: naming the dialog, the message and the role that was expected.
    """
    if not isinstance(dialog, list) or not dialog:
        raise ValueError(f"dialog {index} must be a non-empty list of messages")
    for position, message in enumerate(dialog):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ValueError(f"dialog {index}, message {position}: must be a dict with a 'role' string")
        if not isinstance(message.get("content"), str):
            raise ValueError(f"dialog {index}, message {position}: 'content' must be a string")
    offset = 1 if dialog[0]["role"] == "system" else 0
    for position, message in enumerate(dialog[offset:], start=offset):
        expected = "user" if (position - offset) % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise ValueError(
                f"dialog {index}, message {position}: expected role {expected!r}, got "
                f"{message['role']!r} (a dialog is an optional 'system' message, then 'user' and "
                "'assistant' alternating, ending with 'user')"
            )
    if len(dialog) == offset:
        raise ValueError(f"dialog {index} has a system message but no 'user' message")
    if dialog[-1]["role"] != "user":
        raise ValueError(
            f"dialog {index}, message {len(dialog) - 1}: the last message must have role 'user', "
            f"got {dialog[-1]['role']!r}"
        )


def instruct_prompt_tokens(tokenizer: Tokenizer, dialog: Dialog) -> List[int]:
    """Token ids of a (validated) dialog in the Instruct `[INST]` format."""
    if dialog[0]["role"] == "system":
        merged: Message = {
            "role": "user",
            "content": B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"],
        }
        dialog = [merged] + dialog[2:]
    tokens: List[int] = []
    for prompt, answer in zip(dialog[::2], dialog[1::2]):
        text = f"{B_INST} {prompt['content'].strip()} {E_INST} {answer['content'].strip()} "
        tokens += tokenizer.encode(text, bos=True, eos=True)
    tokens += tokenizer.encode(f"{B_INST} {dialog[-1]['content'].strip()} {E_INST}", bos=True, eos=False)
    return tokens


def turn_prompt_tokens(tokenizer: Tokenizer, dialog: Dialog) -> List[int]:
    """Token ids of a (validated) dialog in the turn-based `Source:`/`<step>` format."""
    if tokenizer.step_id is None:
        raise ValueError(f"the tokenizer {tokenizer.model_path} has no <step> piece: no turn-based format")
    if dialog[0]["role"] != "system":
        dialog = [{"role": "system", "content": ""}] + dialog
    tokens = [tokenizer.bos_id]
    for message in dialog:
        header = " Source: " + message["role"].strip()
        destination: Optional[str] = message.get("destination")
        if destination is not None:
            header += "\nDestination: " + destination.strip()
        tokens += tokenizer.encode(header, bos=False, eos=False)
        if message["content"]:
            tokens += tokenizer.encode("\n\n " + message["content"].strip(), bos=False, eos=False)
        tokens.append(tokenizer.step_id)
    tokens += tokenizer.encode(" Source: assistant\nDestination: user", bos=False, eos=False)
    tokens += tokenizer.encode("\n\n ", bos=False, eos=False)
    return tokens
