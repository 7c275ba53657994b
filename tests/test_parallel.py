"""Model parallelism: a checkpoint sharded into MP=2 files as the released checkpoints are, run by two gloo
processes under torchrun, computes what the unsharded checkpoint computes in one process.

torchrun is launched once for the whole module (tests/parallel_worker.py does several checks per
launch) with a hard timeout, so a broken collective fails the test instead of hanging it.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

from llama import Llama
from llama.model import ModelArgs
from tests.tiny import random_state_dict, split_dim, tiny_params, write_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 240
TOL = 1e-4


def _launch_torchrun(
    job_path: Path, nproc: int = 2, worker: str = "parallel_worker.py"
) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # rendezvous on a free port chosen by the launcher
        f"--nproc_per_node={nproc}",
        str(ROOT / "tests" / worker),
        str(job_path),
    ]
    # Own process group, so a timeout kills the launcher and both workers.
    proc = subprocess.Popen(
        cmd,
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun did not finish within {TIMEOUT_S} s\n{stdout}\n{stderr}")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def mp_run(tmp_path_factory, tokenizer_path):
    """Write MP=1 and MP=2 checkpoints of the same weights, run MP=2 under torchrun."""
    tmp = tmp_path_factory.mktemp("mp")
    vocab = spm.SentencePieceProcessor(model_file=str(tokenizer_path)).vocab_size()
    params = tiny_params(vocab, n_heads=4, n_kv_heads=2)
    full = random_state_dict(ModelArgs(**params), seed=11)
    write_checkpoint(tmp / "mp1", params, full, mp=1)
    write_checkpoint(tmp / "mp2", params, full, mp=2)
    indivisible = {
        "n_kv_heads": tiny_params(vocab, n_heads=4, n_kv_heads=1),
        "n_heads": tiny_params(vocab, dim=48, n_heads=3, n_kv_heads=3),
    }
    for name, bad in indivisible.items():
        write_checkpoint(tmp / f"bad_{name}", bad, random_state_dict(ModelArgs(**bad)), mp=1)

    g = torch.Generator().manual_seed(5)
    job = {
        "ckpt_dir": str(tmp / "mp2"),
        "tokenizer": str(tokenizer_path),
        "indivisible": {name: str(tmp / f"bad_{name}") for name in indivisible},
        "forward_tokens": torch.randint(3, vocab, (2, 24), generator=g).tolist(),
        "prompts": [[1] + torch.randint(3, vocab, (n,), generator=g).tolist() for n in (3, 9, 17)],
        "texts": ["def fibonacci(n):", "import os\n"],
        "out_dir": str(tmp),
    }
    job_path = tmp / "job.json"
    job_path.write_text(json.dumps(job))
    proc = _launch_torchrun(job_path)
    assert proc.returncode == 0, f"torchrun failed\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    ranks = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(2)]
    return {"job": job, "full": full, "params": params, "mp1_dir": tmp / "mp1", "proc": proc, "ranks": ranks}


@pytest.fixture(scope="module")
def mp1(mp_run, tokenizer_path):
    """The same computations on the unsharded checkpoint, in this (single) process."""
    job = mp_run["job"]
    generator = Llama.build(
        str(mp_run["mp1_dir"]), str(tokenizer_path), max_seq_len=64, max_batch_size=3, dtype="float32", seed=7
    )
    with torch.inference_mode():
        logits = generator.model(torch.tensor(job["forward_tokens"]), 0)
    return {
        "forward_logits": logits,
        "greedy": generator.generate(job["prompts"], max_gen_len=12, temperature=0.0, logprobs=True),
        "completion": generator.text_completion(job["texts"], temperature=0.0, max_gen_len=8),
    }


def test_each_rank_holds_its_spec_shard(mp_run):
    """Per-rank parameter shapes follow the released split dims (halves of the full tensors)."""
    full = mp_run["full"]
    for rank in mp_run["ranks"]:
        shapes = rank["shapes"]
        assert set(shapes) == set(full)
        for key, shape in shapes.items():
            expected = list(full[key].shape)
            dim = split_dim(key)  # the released split dim; None for the replicated norms
            if dim is not None:
                expected[dim] //= 2
            assert list(shape) == expected, key
        assert shapes["norm.weight"] == tuple(full["norm.weight"].shape)


def test_mp2_forward_logits_equal_mp1(mp_run, mp1):
    for rank in mp_run["ranks"]:
        torch.testing.assert_close(rank["forward_logits"], mp1["forward_logits"], atol=TOL, rtol=0)


def test_mp2_greedy_generation_equals_mp1(mp_run, mp1):
    tokens, logprobs = mp1["greedy"]
    assert all(len(t) > 0 for t in tokens)
    for rank in mp_run["ranks"]:
        rank_tokens, rank_logprobs = rank["greedy"]
        assert rank_tokens == tokens
        for got, want in zip(rank_logprobs, logprobs):
            torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=TOL, rtol=0)
        assert rank["completion"] == mp1["completion"]


def test_ranks_sample_the_same_tokens(mp_run):
    """Seeded identically, both ranks draw the same tokens when sampling."""
    rank0, rank1 = mp_run["ranks"]
    assert rank0["sampled"] == rank1["sampled"]
    assert rank0["sampled"] != rank0["greedy"][0]  # it really sampled


def test_only_rank_zero_prints(mp_run):
    out = mp_run["proc"].stdout + mp_run["proc"].stderr
    assert "stdout of rank 0" in out
    assert "stdout of rank 1" not in out
    summaries = [line for line in mp_run["proc"].stdout.splitlines() if line.startswith("Loaded ")]
    # Four builds (eager, with a draft, paged, compiled), each summarised by rank 0 alone.
    assert len(summaries) == 4 and all("MP=2" in line for line in summaries), mp_run["proc"].stdout


def test_heads_not_divisible_by_model_parallel_size(mp_run):
    for rank in mp_run["ranks"]:
        errors = rank["errors"]
        assert "n_kv_heads=1 is not divisible by the model-parallel size 2" in errors["n_kv_heads"]
        assert "n_heads=3 is not divisible by the model-parallel size 2" in errors["n_heads"]


def test_rank_zero_refusals_and_failures_reach_every_rank(mp_run):
    """A bad argument is refused on every rank; a failure inside rank 0's step is raised on the
    other ranks too (they were waiting for rank 0's result), and generation goes on after both."""
    for rank in mp_run["ranks"]:
        failures = rank["failures"]
        assert failures["refused"][0] == "ValueError" and "top_p" in failures["refused"][1]
        assert "sampling failed on rank 0 (simulated)" in failures["failed"][1]
        assert rank["after_failures"] == rank["greedy"][0]
    assert mp_run["ranks"][1]["failures"]["failed"][0] == "FollowerError"


def test_compiled_mp2_runs_compiled_on_every_rank(mp_run):
    for rank in mp_run["ranks"]:
        assert rank["compiled_graphs"] > 0  # this rank traced and ran the compiled decode step
        assert rank["compiled_greedy"] == [tokens[:6] for tokens in rank["greedy"][0]]


def test_mp2_paged_cache_gives_the_greedy_tokens_on_every_rank(mp_run, mp1):
    for rank in mp_run["ranks"]:
        assert rank["paged_greedy"] == mp1["greedy"][0]
        assert rank["paged_free_blocks"] == 1  # the one block, held or free, never lost


def test_mp2_speculation_with_a_draft_and_lookup_gives_the_greedy_tokens(mp_run):
    rank0 = mp_run["ranks"][0]
    assert rank0["draft_greedy"] == rank0["greedy"][0]
    assert rank0["lookup_greedy"] == rank0["greedy"][0]
    stats = rank0["draft_stats"]  # the model drafting for itself: every proposal kept
    assert (
        stats["speculative_proposed"] > 0
        and stats["speculative_accepted"] >= stats["speculative_proposed"] // 2
    )
