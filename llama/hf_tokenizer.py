"""The tokenizer files of a Hugging Face Code Llama folder: `tokenizer_config.json` (with a chat
template), `special_tokens_map.json` and `generation_config.json`, made from a `tokenizer.model`.

With them, transformers loads its Code Llama tokenizer (BOS added, `<FILL_ME>` infilling) and
`apply_chat_template` gives the ids of `llama.prompts`.
"""

import json
from pathlib import Path
from typing import Dict, List, Optional

from llama.prompts import FILL_ME
from llama.tokenizer import EOT_PIECE, MIDDLE_PIECE, PREFIX_PIECE, STEP_PIECE, SUFFIX_PIECE, Tokenizer

TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
GENERATION_CONFIG_FILE = "generation_config.json"
TOKENIZER_CLASS = "CodeLlamaTokenizer"

# transformers' Code Llama tokenizer puts no space in front of text that follows a special token,
# while each turn of `instruct_prompt_tokens` is a separate SentencePiece encoding that starts
# with the dummy leading space. So the text after every BOS (and every <step>) begins with an
# explicit space: " [INST] ..." tokenizes as "▁[INST] ...", exactly as enc("[INST] ...") does.
# Jinja's `trim` is Python's `str.strip()`, as in llama.prompts.
INSTRUCT_CHAT_TEMPLATE = r"""
{%- if messages[0]['role'] == 'system' -%}
    {%- set system_message = messages[0]['content'] -%}
    {%- set turns = messages[1:] -%}
{%- else -%}
    {%- set system_message = none -%}
    {%- set turns = messages -%}
{%- endif -%}
{%- for message in turns -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{- raise_exception("roles must alternate user/assistant/user/... after an optional system") -}}
    {%- endif -%}
    {%- set content = message['content'] -%}
    {%- if loop.first and system_message is not none -%}
        {%- set content = '<<SYS>>\n' + system_message + '\n<</SYS>>\n\n' + content -%}
    {%- endif -%}
    {%- if message['role'] == 'user' -%}
        {{- bos_token + ' [INST] ' + content | trim + ' [/INST]' -}}
    {%- else -%}
        {{- ' ' + content | trim + ' ' + eos_token -}}
    {%- endif -%}
{%- endfor -%}
""".strip()

# The 70B turn format of `turn_prompt_tokens`: every SentencePiece encoding there starts with the
# dummy space, written out here (" " + " Source: ...", " " + "\n\n " + content).
TURN_CHAT_TEMPLATE = r"""
{{- bos_token -}}
{%- if messages[0]['role'] != 'system' -%}
    {{- '  Source: system<step>' -}}
{%- endif -%}
{%- for message in messages -%}
    {{- '  Source: ' + message['role'] | trim -}}
    {%- if message['destination'] is defined and message['destination'] is not none -%}
        {{- '\nDestination: ' + message['destination'] | trim -}}
    {%- endif -%}
    {%- if message['content'] -%}
        {{- ' \n\n ' + message['content'] | trim -}}
    {%- endif -%}
    {{- '<step>' -}}
{%- endfor -%}
{{- '  Source: assistant\nDestination: user \n\n ' -}}
""".strip()


def chat_template(tokenizer: Tokenizer) -> str:
    """The Jinja chat template for `tokenizer`: the 70B turn format if it has `<step>`, else the
    Instruct `[INST]` format."""
    return TURN_CHAT_TEMPLATE if tokenizer.step_id is not None else INSTRUCT_CHAT_TEMPLATE


def _added_token(piece: str) -> dict:
    return {
        "content": piece,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }


def tokenizer_files(tokenizer: Tokenizer, model_max_length: int) -> Dict[str, dict]:
    """The JSON content of `tokenizer_config.json`, `special_tokens_map.json` and
    `generation_config.json` for `tokenizer`, by file name.

    Without all four infilling pieces they are written as null, and the fill token stays so that
    transformers refuses `<FILL_ME>` prompts (a ValueError) instead of encoding them as text.
    `<step>`, when present, is a special token and, with EOS, ends generation.
    """
    unk_id = tokenizer.sp_model.unk_id()
    bos, eos, unk = (tokenizer.token_piece(i) for i in (tokenizer.bos_id, tokenizer.eos_id, unk_id))
    infilling = {
        "prefix_token": (PREFIX_PIECE, tokenizer.prefix_id),
        "middle_token": (MIDDLE_PIECE, tokenizer.middle_id),
        "suffix_token": (SUFFIX_PIECE, tokenizer.suffix_id),
        "eot_token": (EOT_PIECE, tokenizer.eot_id),
    }
    can_infill = all(token_id is not None for _, token_id in infilling.values())
    special: Dict[int, str] = {unk_id: unk, tokenizer.bos_id: bos, tokenizer.eos_id: eos}
    infilling_pieces: List[str] = []
    if can_infill:
        for piece, token_id in infilling.values():
            special[token_id] = piece
            infilling_pieces.append(piece)
    extra: List[str] = []
    if tokenizer.step_id is not None:
        special[tokenizer.step_id] = STEP_PIECE
        extra.append(STEP_PIECE)
    config = {
        "tokenizer_class": TOKENIZER_CLASS,
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": unk,
        "pad_token": None,
        **{name: piece if can_infill else None for name, (piece, _) in infilling.items()},
        "fill_token": FILL_ME,
        "additional_special_tokens": extra,
        "added_tokens_decoder": {str(i): _added_token(piece) for i, piece in sorted(special.items())},
        "clean_up_tokenization_spaces": False,
        # transformers' non-legacy encoding: no space added after special tokens (the template
        # writes it), which is what transformers 5 does whatever this says.
        "legacy": False,
        "use_default_system_prompt": False,
        "model_max_length": model_max_length,
        "chat_template": chat_template(tokenizer),
    }
    special_tokens_map = {
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": unk,
        "additional_special_tokens": infilling_pieces + extra,
    }
    return {
        TOKENIZER_CONFIG_FILE: config,
        SPECIAL_TOKENS_MAP_FILE: special_tokens_map,
        GENERATION_CONFIG_FILE: generation_config(tokenizer),
    }


def generation_config(tokenizer: Optional[Tokenizer]) -> dict:
    """`generation_config.json`: BOS and the ids that end generation (EOS, and `<step>` for the
    turn format). Without a tokenizer, Llama's BOS=1 and EOS=2."""
    if tokenizer is None:
        return {"bos_token_id": 1, "eos_token_id": 2}
    eos = tokenizer.eos_id if tokenizer.step_id is None else [tokenizer.eos_id, tokenizer.step_id]
    return {"bos_token_id": tokenizer.bos_id, "eos_token_id": eos}


def write_tokenizer_files(tokenizer_path: Optional[str], out_dir: Path, model_max_length: int) -> List[str]:
    """Write the files of `tokenizer_files` into `out_dir` (only `generation_config.json`, with
    Llama's ids, when `tokenizer_path` is None).

    Returns:
        The names of the files written.

    Raises:
        FileNotFoundError, ValueError: as `Tokenizer` for a missing or unreadable model.
    """
    if tokenizer_path is None:
        files = {GENERATION_CONFIG_FILE: generation_config(None)}
    else:
        files = tokenizer_files(Tokenizer(tokenizer_path), model_max_length)
    for name, content in files.items():
        (out_dir / name).write_text(
            json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
    return list(files)
