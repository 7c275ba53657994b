"""Resharding on load into model-parallel groups of 2 and 4 processes (torchrun, gloo), against
the MP=1 checkpoint loaded as saved. Two launches in total, several checkpoints per launch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama import Llama
from llama.convert import to_hf
from llama.reshard import reshard
from tests.layouts import assert_same_outputs, probe, write_layouts

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def layouts(tmp_path_factory, tokenizer_path):
    root = tmp_path_factory.mktemp("mp_layouts")
    params, full, dirs = write_layouts(root, tokenizer_path, mps=(1, 2))
    dirs["hf"] = to_hf(str(dirs[1]), root / "hf", max_shard_size="200KB", progress=False)
    return dirs


@pytest.fixture(scope="module")
def reference(layouts, tokenizer_path):
    return probe(Llama.build(str(layouts[1]), str(tokenizer_path), 32, 2, dtype="float32"))


def run_group(nproc: int, tokenizer_path: Path, out: Path, named_dirs: dict) -> dict:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        str(ROOT / "tests" / "mp_probe.py"), str(tokenizer_path), str(out),
    ] + [f"{name}={folder}" for name, folder in named_dirs.items()]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return torch.load(out, weights_only=False)


def test_two_processes(layouts, tokenizer_path, reference, tmp_path):
    resharded = reshard(str(layouts[1]), str(tmp_path / "r2"), 2, progress=False)
    checkpoints = {
        "as saved": layouts[2],
        "1 -> 2 on load": layouts[1],
        "1 -> 2 by llama.reshard": resharded,
        "Hugging Face -> 2 on load": layouts["hf"],
    }
    results = run_group(2, tokenizer_path, tmp_path / "out.pt", checkpoints)
    assert len(results) == 4
    for name, result in results.items():
        assert_same_outputs(result, reference, name)


def test_four_processes(layouts, tokenizer_path, reference, tmp_path):
    resharded = reshard(str(layouts[2]), str(tmp_path / "r4"), 4, progress=False)
    checkpoints = {
        "2 -> 4 on load": layouts[2],
        "2 -> 4 by llama.reshard": resharded,
        "Hugging Face -> 4 on load": layouts["hf"],
    }
    results = run_group(4, tokenizer_path, tmp_path / "out.pt", checkpoints)
    assert len(results) == 3
    for name, result in results.items():
        assert_same_outputs(result, reference, name)
