"""The committed demo model: intact files, the advertised size, and code that parses on held-out input."""

import ast
import hashlib
from pathlib import Path

import pytest
import torch

from llama import Llama
from scripts.demo_data import HELD_OUT_MODULES
from scripts.eval_demo import complete_bodies

REPO = Path(__file__).resolve().parents[1]
DEMO_DIR = REPO / "models" / "demo"

# Signatures and docstrings of functions of held-out modules (never trained on), verbatim from the
# CPython 3.11 sources: the first short ones of the evaluation's list.
HELD_OUT_PROMPTS = [
    (
        "fnmatch.py",
        "def filter(names, pat):\n"
        '    """Construct a list from those elements of the iterable NAMES that match PAT."""\n',
    ),
    (
        "fnmatch.py",
        'def fnmatchcase(name, pat):\n    """Test whether FILENAME matches PATTERN, including case.\n\n'
        '    This is a version of fnmatch() which doesn\'t case-normalize\n    its arguments.\n    """\n',
    ),
    ("glob.py", 'def escape(pathname):\n    """Escape all special characters.\n    """\n'),
    (
        "heapq.py",
        'def heappush(heap, item):\n    """Push item onto heap, maintaining the heap invariant."""\n',
    ),
    (
        "heapq.py",
        'def heappop(heap):\n    """Pop the smallest item off the heap, maintaining the heap invariant."""\n',
    ),
]


def test_checklist_md5s_match_the_files():
    lines = (DEMO_DIR / "checklist.chk").read_text().splitlines()
    listed = {}
    for line in lines:
        digest, name = line.split("  ", 1)
        listed[name] = digest
    assert set(listed) == {"params.json", "consolidated.00.pth", "tokenizer.model"}
    for name, digest in listed.items():
        assert hashlib.md5((DEMO_DIR / name).read_bytes()).hexdigest() == digest, name


def test_demo_model_is_a_small_bf16_code_llama_checkpoint():
    state = torch.load(DEMO_DIR / "consolidated.00.pth", map_location="cpu", weights_only=True)
    assert {tensor.dtype for tensor in state.values()} == {torch.bfloat16}
    assert 2e6 <= sum(tensor.numel() for tensor in state.values()) <= 8e6
    assert (DEMO_DIR / "consolidated.00.pth").stat().st_size < 16 * 2**20


@pytest.fixture(scope="module")
def demo():
    torch.set_num_threads(2)
    return Llama.build(
        ckpt_dir=str(DEMO_DIR),
        tokenizer_path=str(DEMO_DIR / "tokenizer.model"),
        max_seq_len=320,
        max_batch_size=len(HELD_OUT_PROMPTS),
        dtype="float32",
    )


def test_prompts_come_from_held_out_modules():
    assert {module for module, _ in HELD_OUT_PROMPTS} <= set(HELD_OUT_MODULES)


def test_greedy_completions_of_held_out_signatures_parse(demo):
    prompts = [prompt for _, prompt in HELD_OUT_PROMPTS]
    for prompt, body in zip(prompts, complete_bodies(demo, prompts, max_gen_len=176)):
        assert body.strip(), f"empty body for {prompt!r}"
        assert body.startswith("    "), f"body not indented under the def: {body!r}"
        ast.parse(prompt + body)  # raises SyntaxError if the completion is not Python
