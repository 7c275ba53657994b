"""Complete code prompts: `python example_completion.py` (bundled demo model), or under
`torchrun --nproc_per_node MP` with `--ckpt_dir`/`--tokenizer_path` of a Code Llama checkpoint."""

from pathlib import Path
from typing import Optional

from llama import Llama
from llama.cli import model_paths, print_completion, run, user_prompt

PROMPTS = [
    # The natural continuation of each prompt is the answer.
    "def fizzbuzz(n: int):",
    """import argparse

def main(string: str):
    print(string)
    print(string[::-1])

if __name__ == "__main__":""",
]


def main(
    ckpt_dir: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    temperature: float = 0.2,
    top_p: float = 0.9,
    max_seq_len: int = 512,
    max_batch_size: int = 4,
    max_gen_len: Optional[int] = 128,
    prompt: Optional[str] = None,
    prompt_file: Optional[str] = None,
    dtype: Optional[str] = None,
    quantize: Optional[str] = None,
    quantize_group_size: Optional[int] = None,
):
    """Print each prompt and its completion.

    Args:
        ckpt_dir: checkpoint folder (default: the bundled demo model, models/demo/).
        tokenizer_path: tokenizer.model (default: the one in ckpt_dir).
        temperature: sampling temperature; 0 is greedy.
        top_p: nucleus sampling mass.
        max_seq_len: longest prompt + completion, in tokens.
        max_batch_size: prompts completed at once.
        max_gen_len: most tokens to generate per prompt (None: up to max_seq_len).
        prompt: complete this text instead of the built-in prompts.
        prompt_file: complete the contents of this file instead of the built-in prompts.
        dtype: "bfloat16", "float16" or "float32" (default: chosen for the device).
        quantize: "int8" or "int4": quantize the weights while loading (a quantized checkpoint
            loads quantized without it).
        quantize_group_size: int4 group size, 32, 64 or 128 (default 64).
    """
    own = user_prompt(prompt, prompt_file)
    prompts = PROMPTS if own is None else [own]
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
    results = generator.text_completion(
        prompts, temperature=temperature, top_p=top_p, max_gen_len=max_gen_len
    )
    for text, result in zip(prompts, results):
        print_completion(text, result["generation"])


if __name__ == "__main__":
    run(main)
