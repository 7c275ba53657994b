"""Fill in the code between a prefix and a suffix: `python example_infilling.py` (bundled demo
model), or under `torchrun` with a Code Llama 7B, 13B or 70B base/Instruct checkpoint."""

from pathlib import Path
from typing import Optional

from llama import Llama
from llama.cli import model_paths, print_infilling, run, user_prompt

# Each prompt marks the gap to fill with <FILL_ME>.
PROMPTS = [
    '''def remove_non_ascii(s: str) -> str:
    """ <FILL_ME>
    return result
''',
    """# Installation instructions:
    ```bash
<FILL_ME>
    ```
This downloads the LLaMA inference code and installs the repository as a local pip package.
""",
    """class InterfaceManagerFactory(AbstractFactory):
    def __init__(<FILL_ME>
def main():
    factory = InterfaceManagerFactory(start=datetime.now())
    managers = []
    for i in range(10):
        managers.append(factory.build(id=i))
""",
    """/-- A quasi-prefunctoid is 1-connected iff all its etalisations are 1-connected. -/
theorem connected_iff_etalisation [C D : precategoroid] (P : quasi_prefunctoid C D) :
  π₁ P = 0 ↔ <FILL_ME> = 0 :=
begin
  split,
  { rintros h ⟨i, j⟩ ⟨l, m⟩ h',
    exact h (i, l) (j, m) h' },
  { intro h,
    exact h (0, 0) (0, 0) (0, 0) }
end
""",
]


def main(
    ckpt_dir: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    temperature: float = 0.0,
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
    """Print each prompt, the generated middle and the filled-in text.

    Args:
        ckpt_dir: checkpoint folder (default: the bundled demo model, models/demo/).
        tokenizer_path: tokenizer.model (default: the one in ckpt_dir).
        temperature: sampling temperature; 0 is greedy.
        top_p: nucleus sampling mass.
        max_seq_len: longest prompt + middle, in tokens.
        max_batch_size: prompts filled at once.
        max_gen_len: most tokens to generate per prompt (None: up to max_seq_len).
        prompt: fill in this text, which marks the gap with one <FILL_ME>, instead of the built-in prompts.
        prompt_file: the same, read from a file.
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
    results = generator.text_infilling(
        prompts=prompts, temperature=temperature, top_p=top_p, max_gen_len=max_gen_len
    )
    for text, result in zip(prompts, results):
        print_infilling(text, result["generation"], result["full_text"])


if __name__ == "__main__":
    run(main)
