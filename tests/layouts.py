"""One set of tiny random weights saved in several layouts, and the outputs that must not depend
on the layout (logits of a fixed sequence and greedy continuations)."""

import shutil
from pathlib import Path
from typing import Dict, Tuple

import sentencepiece as spm
import torch

from llama.model import ModelArgs
from tests.tiny import random_state_dict, tiny_params, write_checkpoint

# 8 heads and 4 kv heads split into 1, 2 or 4 ranks; FFN hidden 192 and vocab 600 too.
SPLITTABLE = dict(n_heads=8, n_kv_heads=4)
PROBE_SEQUENCE = [1, 17, 240, 33, 5, 99, 310, 42, 7, 500]
PROMPTS = [[1, 40, 41, 42], [1, 300, 12]]
GEN_LEN = 6


def vocab_size(tokenizer_path: Path) -> int:
    return spm.SentencePieceProcessor(model_file=str(tokenizer_path)).vocab_size()


def write_layouts(
    root: Path, tokenizer_path: Path, mps=(1, 2), dtype: torch.dtype = torch.float32, **overrides
) -> Tuple[dict, Dict[str, torch.Tensor], Dict[int, Path]]:
    """The same random weights written as Meta checkpoints for each MP in `mps` (with the
    tokenizer inside). Returns (params, full fp32 state dict, {mp: folder})."""
    params = tiny_params(vocab_size(tokenizer_path), **{**SPLITTABLE, **overrides})
    full = random_state_dict(ModelArgs(**params), seed=7)
    dirs = {}
    for mp in mps:
        folder = write_checkpoint(root / f"mp{mp}", params, full, mp=mp, dtype=dtype)
        shutil.copyfile(tokenizer_path, folder / "tokenizer.model")
        dirs[mp] = folder
    return params, full, dirs


@torch.inference_mode()
def probe(generator) -> dict:
    """Logits of PROBE_SEQUENCE and greedy continuations of PROMPTS."""
    logits = generator.model(torch.tensor([PROBE_SEQUENCE]), 0)[0].float()
    tokens, _ = generator.generate(PROMPTS, max_gen_len=GEN_LEN, temperature=0)
    return {"logits": logits, "tokens": tokens}


def assert_same_outputs(result: dict, reference: dict, label: str) -> None:
    difference = (result["logits"] - reference["logits"]).abs().max().item()
    assert difference <= 1e-4, f"{label}: logits differ by {difference}"
    assert result["tokens"] == reference["tokens"], f"{label}: greedy tokens differ"
