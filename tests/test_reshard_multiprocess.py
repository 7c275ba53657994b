"""Resharding on load into model-parallel groups of 2 and 4 processes (one torchrun launch of 4
gloo processes), against the MP=1 checkpoint loaded as saved in this process."""

import os
import subprocess
import sys
from pathlib import Path

import torch

from llama import Llama
from llama.convert import to_hf
from llama.reshard import reshard
from tests.layouts import assert_same_outputs, probe, write_layouts

ROOT = Path(__file__).resolve().parents[1]


def run_group(nproc: int, tokenizer_path: Path, out: Path, items: list) -> dict:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        str(ROOT / "tests" / "mp_probe.py"), str(tokenizer_path), str(out),
    ] + [f"{mp}:{name}={folder}" for mp, name, folder in items]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return torch.load(out, weights_only=False)


def test_resharding_for_two_and_four_processes(tmp_path, tokenizer_path):
    _, _, dirs = write_layouts(tmp_path, tokenizer_path, mps=(1, 2))
    hf = to_hf(str(dirs[1]), tmp_path / "hf", max_shard_size="200KB", progress=False)
    # multiple_of=2 gives an FFN hidden size of 170, which 4 processes cannot split.
    _, _, odd = write_layouts(tmp_path / "odd", tokenizer_path, mps=(1,), multiple_of=2)
    items = [
        (2, "saved with 2 shards", dirs[2]),
        (2, "1 -> 2 on load", dirs[1]),
        (2, "1 -> 2 by llama.reshard", reshard(str(dirs[1]), str(tmp_path / "r2"), 2, progress=False)),
        (2, "Hugging Face on load", hf),
        (4, "2 -> 4 on load", dirs[2]),
        (4, "2 -> 4 by llama.reshard", reshard(str(dirs[2]), str(tmp_path / "r4"), 4, progress=False)),
        (4, "Hugging Face on load", hf),
        (4, "unsplittable", odd[1]),
    ]
    results = run_group(4, tokenizer_path, tmp_path / "out.pt", items)
    error = results.pop("unsplittable (MP=4)")["error"]
    assert "cannot split tensor layers.0.feed_forward.w1.weight of shape (170, 64) into 4" in error

    reference = probe(Llama.build(str(dirs[1]), str(tokenizer_path), 32, 2, dtype="float32"))
    assert len(results) == len(items) - 1
    for name, result in results.items():
        assert_same_outputs(result, reference, name)
