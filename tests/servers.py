"""Helpers for tests that drive real server processes: start and stop them, read their metrics
and streams, check their error objects."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import httpx
import pytest
import sentencepiece as spm

from llama.model import ModelArgs
from tests.tiny import random_state_dict, tiny_params, write_checkpoint

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 90


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """A server subprocess (its own session, so the whole process tree can be stopped)."""

    def __init__(self, args: List[str], log: Path, torchrun: bool = False):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        launcher = [sys.executable]
        if torchrun:  # rendezvous on a free port chosen by the launcher
            launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        cmd = launcher + ["-m", "llama.server"] + ["--port", str(self.port), "--log_level", "warning"] + args
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
        self.log = log
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
        )

    def wait_ready(self) -> "ServerProcess":
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        pytest.fail(f"server not ready within {START_TIMEOUT_S} s:\n{self.log.read_text()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> Optional[int]:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode


def write_tiny_checkpoint(ckpt_dir: Path, tokenizer_path: Path, mp: int) -> Path:
    """A tiny random checkpoint whose EOS and EOT output rows are zero: their logits stay 0 while
    the best of the others is positive, so greedy generations run to their length unless a
    request's logit_bias asks for those tokens."""
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    params = tiny_params(sp.vocab_size())
    sd = random_state_dict(ModelArgs(**params), seed=3)
    for piece in ("</s>", "▁<EOT>"):
        sd["output.weight"][sp.piece_to_id(piece)] = 0.0
    return write_checkpoint(ckpt_dir, params, sd, mp=mp)


def sse_events(response: httpx.Response) -> List[dict]:
    """The JSON payloads of a server-sent event stream (`[DONE]` kept as the string)."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line[len("data: ") :]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def metric(http: httpx.Client, name: str, labels: Optional[Dict[str, str]] = None) -> float:
    """One sample of /metrics (0 if absent)."""
    wanted = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(wanted + " "):
            return float(line.split()[-1])
    return 0.0


def wait_for(condition, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def assert_error(
    response: httpx.Response, status: int, param: Optional[str] = None, code: Optional[str] = None
):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error
