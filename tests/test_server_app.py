"""The server's app in process (starlette's TestClient) where a real server process cannot show
the point: where handlers run their CPU work, and what an unexpected exception becomes."""

import asyncio

import pytest
from starlette.testclient import TestClient

from llama import Llama
from llama.server.app import create_app
from llama.server.schemas import parse_token_key
from llama.server.state import ServerState
from llama.tokenizer import Tokenizer
from tests.servers import assert_error

MODEL = "tiny"


class RecordingTokenizer(Tokenizer):
    """A tokenizer that records, for each `encode`, whether it ran on a thread with a running
    event loop and how many generations the server had reserved at that moment."""

    def __init__(self, model_path: str, state: ServerState):
        super().__init__(model_path)
        self.state = state
        self.calls = []

    def encode(self, s: str, bos: bool, eos: bool):
        try:
            asyncio.get_running_loop()
            on_loop = True
        except RuntimeError:
            on_loop = False
        in_flight = self.state.capacity.in_flight if self.state.capacity else None
        self.calls.append({"on_loop": on_loop, "in_flight": in_flight})
        return super().encode(s, bos, eos)


@pytest.fixture(scope="module")
def served(checkpoint_dir, tokenizer_path):
    llama = Llama.build(str(checkpoint_dir), str(tokenizer_path), 256, 2, dtype="float32")
    llama.engine.start()
    state = ServerState(MODEL, max_queue=1)
    tokenizer = RecordingTokenizer(str(tokenizer_path), state)
    state.set_ready(llama.engine, tokenizer)
    try:
        with TestClient(create_app(state), raise_server_exceptions=False) as client:
            yield client, state, tokenizer
    finally:
        llama.engine.shutdown()


def test_prompts_are_tokenized_off_the_event_loop_after_the_capacity_check(served):
    client, state, tokenizer = served
    bodies = {
        "/v1/completions": {"prompt": "def f(x):", "max_tokens": 2, "temperature": 0},
        "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        "/completion": {"prompt": "def f(x):", "n_predict": 2},
        "/infill": {"input_prefix": "def f(", "input_suffix": "):", "n_predict": 2},
        "/tokenize": {"content": "def f(x):", "with_pieces": True},
    }
    for path, body in bodies.items():
        tokenizer.calls.clear()
        response = client.post(path, json=body)
        assert response.status_code == 200, response.text
        assert tokenizer.calls, path
        assert not any(call["on_loop"] for call in tokenizer.calls), path
        if path != "/tokenize":  # the generation's place was reserved before tokenizing
            assert all(call["in_flight"] >= 1 for call in tokenizer.calls), path

    # With the queue full, a request is refused before its prompt is tokenized.
    tokenizer.calls.clear()
    state.capacity.in_flight = state.capacity.limit
    try:
        for path in ("/v1/completions", "/v1/chat/completions", "/completion", "/infill"):
            refused = client.post(path, json=bodies[path])
            assert_error(refused, 503, code="queue_full")
    finally:
        state.capacity.in_flight = 0
    assert tokenizer.calls == []


def test_a_failing_job_gives_back_its_place(served, monkeypatch):
    client, state, tokenizer = served

    def broken(*args, **kwargs):
        raise RuntimeError("tokenizer exploded")

    monkeypatch.setattr(tokenizer, "encode", broken)
    response = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
    assert_error(response, 500, code="internal_error")
    assert state.capacity.in_flight == 0


def test_an_unexpected_exception_is_a_counted_500_in_the_openai_shape(served):
    client, state, _ = served
    app = client.app

    @app.get("/boom")
    async def boom() -> None:
        raise KeyError("something nobody expected")

    def errors_500() -> float:
        for line in client.get("/metrics").text.splitlines():
            if line.startswith('codellama_request_errors_total{status="500"}'):
                return float(line.split()[-1])
        return 0.0

    before = errors_500()
    error = assert_error(client.get("/boom"), 500, code="internal_error")
    assert error["type"] == "server_error" and "KeyError" in error["message"]
    assert errors_500() == before + 1


@pytest.mark.parametrize("key", ["abc", "²", "٣", " 5", "5 ", "+5", "", "-", "1e3", "0x10", "1_000"])
def test_bias_keys_must_be_ascii_integers(key):
    with pytest.raises(ValueError, match="integers"):
        parse_token_key(key)


def test_bias_keys_that_are_integers():
    assert [parse_token_key(k) for k in ("0", "42", "-7", "007")] == [0, 42, -7, 7]


def test_the_readme_lists_the_limits_the_server_applies():
    from pathlib import Path

    from llama import limits

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("**Limits.**") : readme.index("**Errors** come in")]

    def number(value: float) -> str:  # as the README writes it: 1e-5, not 1e-05
        return f"{value:g}".replace("e-0", "e-")

    for row in (
        f"| `temperature` | 0 to {limits.MAX_TEMPERATURE:g}; below {number(limits.GREEDY_TEMPERATURE)} ",
        f"below {number(limits.MIN_TOP_P)} it keeps",
        f"| `top_k` | 0 (off) to 2^{(limits.MAX_TOP_K + 1).bit_length() - 1} - 1;",
        f"{limits.MIN_REPETITION_PENALTY:g} to {limits.MAX_REPETITION_PENALTY:g}; 1 is off",
        f"| -{limits.MAX_ADDITIVE_PENALTY:g} to {limits.MAX_ADDITIVE_PENALTY:g} |",
        f"at most {limits.MAX_LOGIT_BIAS_ENTRIES} entries;",
        f"biases -{limits.MAX_LOGIT_BIAS:g} to {limits.MAX_LOGIT_BIAS:g} |",
        f"at most {limits.MAX_STOP_STRINGS} non-empty strings of at most {limits.MAX_STOP_STRING_CHARS} ",
        f"at most {limits.MAX_STOP_TOKEN_IDS} ids",
        f"0 to 2^{limits.SEED_LIMIT.bit_length() - 1} - 1",
        f"| 0 to {limits.MAX_TOP_LOGPROBS} alternatives",
        f"| 1 to {limits.MAX_CHOICES}, ",
    ):
        assert row in section, row
