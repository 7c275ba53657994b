"""Answer instructions with an Instruct model: `python example_instructions.py` (bundled demo
model), or under `torchrun` with a Code Llama Instruct checkpoint."""

from pathlib import Path
from typing import List, Optional

from llama import Dialog, Llama
from llama.cli import model_paths, print_chat, run, user_dialog, user_prompt

DIALOGS: List[Dialog] = [
    [
        {
            "role": "user",
            "content": "In Bash, how do I list all text files in the current directory "
            "(excluding subdirectories) that have been modified in the last month?",
        }
    ],
    [
        {
            "role": "user",
            "content": "What is the difference between inorder and preorder traversal? "
            "Give an example in Python.",
        }
    ],
    [
        {"role": "system", "content": "Provide answers in JavaScript"},
        {
            "role": "user",
            "content": "Write a function that computes the set of sums of all contiguous "
            "sublists of a given list.",
        },
    ],
]


def main(
    ckpt_dir: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    temperature: float = 0.2,
    top_p: float = 0.95,
    max_seq_len: int = 512,
    max_batch_size: int = 4,
    max_gen_len: Optional[int] = 256,
    prompt: Optional[str] = None,
    prompt_file: Optional[str] = None,
    system: Optional[str] = None,
    dtype: Optional[str] = None,
    quantize: Optional[str] = None,
    quantize_group_size: Optional[int] = None,
):
    """Print each dialog and the model's answer.

    Args:
        ckpt_dir: checkpoint folder (default: the bundled demo model, models/demo/).
        tokenizer_path: tokenizer.model (default: the one in ckpt_dir).
        temperature: sampling temperature; 0 is greedy.
        top_p: nucleus sampling mass.
        max_seq_len: longest dialog + answer, in tokens.
        max_batch_size: dialogs answered at once.
        max_gen_len: most tokens per answer (None: up to max_seq_len).
        prompt: ask this instead of the built-in instructions.
        prompt_file: ask the contents of this file instead of the built-in instructions.
        system: with --prompt or --prompt_file, a system message to put before it.
        dtype: "bfloat16", "float16" or "float32" (default: chosen for the device).
        quantize: "int8" or "int4": quantize the weights while loading (a quantized checkpoint
            loads quantized without it).
        quantize_group_size: int4 group size, 32, 64 or 128 (default 64).
    """
    own = user_prompt(prompt, prompt_file)
    if system is not None and own is None:
        raise ValueError("--system goes with --prompt or --prompt_file")
    dialogs = DIALOGS if own is None else user_dialog(own, None if system is None else str(system))
    ckpt_dir, tokenizer_path = model_paths(ckpt_dir, tokenizer_path, Path(__file__).parent)
    generator = Llama.build(
        ckpt_dir,
        tokenizer_path,
        max_seq_len,
        max_batch_size,
        dtype=dtype,
        quantize=quantize,
        quantize_group_size=quantize_group_size,
    )
    results = generator.chat_completion(
        dialogs, temperature=temperature, top_p=top_p, max_gen_len=max_gen_len
    )
    for dialog, result in zip(dialogs, results):
        print_chat(dialog, result["generation"])


if __name__ == "__main__":
    run(main)
