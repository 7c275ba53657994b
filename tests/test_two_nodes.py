"""`codellama` across machines: two torchrun launches with `--nnodes 2` (one process each, like two
machines with one GPU) rendezvous on the loopback address and run an MP=2 checkpoint; the completion
equals the MP=1 checkpoint's in one process."""

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm

from llama import Llama
from llama.model import ModelArgs
from tests.tiny import random_state_dict, tiny_params, write_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 240
GEN_LEN = 8
PROMPT = "def fibonacci(n):\n"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_node(node_rank: int, port: int, ckpt_dir: Path, tokenizer_path: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "2",
        "--node_rank",
        str(node_rank),
        "--nproc_per_node",
        "1",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(port),
        "-m",
        "llama",
        "complete",
        PROMPT,
        "--ckpt_dir",
        str(ckpt_dir),
        "--tokenizer_path",
        str(tokenizer_path),
        "--dtype",
        "float32",
        "--temperature",
        "0",
        "--max_gen_len",
        str(GEN_LEN),
    ]
    # Own process group, so a timeout kills the launcher and its worker.
    return subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def test_two_nodes_on_loopback_complete_like_one_process(tmp_path, tokenizer_path):
    vocab = spm.SentencePieceProcessor(model_file=str(tokenizer_path)).vocab_size()
    params = tiny_params(vocab)
    weights = random_state_dict(ModelArgs(**params), seed=31)
    write_checkpoint(tmp_path / "mp1", params, weights, mp=1)
    write_checkpoint(tmp_path / "mp2", params, weights, mp=2)

    port = free_port()
    nodes = [launch_node(rank, port, tmp_path / "mp2", tokenizer_path) for rank in (0, 1)]
    outputs = []
    for node in nodes:
        try:
            out, err = node.communicate(timeout=TIMEOUT_S)
            outputs.append((out.decode("utf-8"), err.decode("utf-8", "replace")))  # byte-exact
        except subprocess.TimeoutExpired:
            for other in nodes:
                os.killpg(other.pid, signal.SIGKILL)
            pytest.fail(f"the two nodes did not finish within {TIMEOUT_S} s")
    for node, (_, err) in zip(nodes, outputs):
        assert node.returncode == 0, err

    generator = Llama.build(str(tmp_path / "mp1"), str(tokenizer_path), 512, 1, dtype="float32")
    echoed = generator.text_completion([PROMPT], temperature=0.0, max_gen_len=GEN_LEN, echo=True)[0]
    expected = echoed["generation"][len(PROMPT) :]  # the continuation in the prompt's context
    assert echoed["generation"].startswith(PROMPT) and expected.strip()
    (out0, err0), (out1, _) = outputs
    assert out0 == expected + "\n"
    assert out1 == ""  # only global rank 0 prints
    assert "MP=2" in err0
