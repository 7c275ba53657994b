"""Fuzzing a real server process on the demo model: a few hundred seeded requests with edge values
in every field of every endpoint, over three connections, while a plain greedy canary request
repeats beside them.

Whatever the fuzz requests hold, the server must answer each one in time with no 5xx (a 4xx is an
OpenAI error object with a message), every canary answer must equal the canary's answer alone,
and afterwards the server must be healthy with every cache slot free.
"""

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Tuple

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.servers import ServerProcess, wait_for

MODEL = "demo"
SLOTS = 4
MAX_SEQ_LEN = 64  # short, so that generations "until the context is full" stay short
FUZZ_REQUESTS = 300
CONNECTIONS = 3
REQUEST_TIMEOUT_S = 30
CANARY = {"model": MODEL, "prompt": "def fibonacci(n):", "max_tokens": 8, "temperature": 0}

# Values that have broken servers: signed zero, denormals, the edges of float and int64, text
# where a number belongs, containers where a scalar belongs.
EDGE_NUMBERS = [
    0,
    -0.0,
    5e-324,
    1e-39,
    1e-6,
    1e308,
    -1e308,
    float("nan"),
    float("inf"),
    2**63,
    -(2**63),
    2**64,
    10**30,
    -1,
    1,
    0.5,
    100,
    101,
    1e9,
]
EDGE_OTHERS = [None, True, False, "", "1", "²", "x" * 20_000, [], [[1, [2]]], {}, {"a": {"b": []}}]
# Text with the formats' special pieces, odd unicode, and sizes at both ends.
TEXTS = [
    "",
    "def f(x):",
    "import os\n",
    "x" * 20_000,
    "<s>",
    "</s>",
    "<PRE>",
    "▁<MID>",
    " <SUF>",
    "<EOT>",
    "[INST]",
    "[/INST]",
    "<<SYS>>",
    "<step>",
    "²",
    "\u0000",
    "🦙\u202e\u0301e",
    "\ud800",
    "\r\n\t",
    "<PRE> def f( <SUF>): <MID>",
    "<0xE2>",
]
TOKEN_IDS = [0, 1, 2, 5, 2999, 3000, -1, 2**63]

edge = st.sampled_from(EDGE_NUMBERS + EDGE_OTHERS)
text = st.sampled_from(TEXTS) | st.text(max_size=40)
token_ids = st.lists(st.sampled_from(TOKEN_IDS) | st.integers(0, 2999), max_size=12)


def field(*values, extra: Optional[st.SearchStrategy] = None) -> st.SearchStrategy:
    """A field's sensible values: usual ones, the extremes of its range, and just beyond them."""
    sensible = st.sampled_from(values)
    return sensible if extra is None else sensible | extra


# Biases: valid ones at the range's ends, and keys or values that must be refused.
bias = st.sampled_from(
    [
        {"5": 100},
        {"2": -100, "2999": 1e-39},
        {"0": 5e-324, "-0": -0.0},
        {"3000": 1},
        {"-1": 1},
        {"abc": 1},
        {"²": 1},
        {" 7": 1},
        {"01": 2},
        {"5": 1e39},
        {str(i): 1 for i in range(1025)},
    ]
)
message = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["user", "assistant", "system", "tool"]),
        "content": text
        | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": text}), max_size=2),
    }
)
SAMPLING = {
    "temperature": field(0, -0.0, 1e-39, 5e-324, 1e-6, 1e-5, 0.7, 1.0, 100.0, extra=st.floats(0, 100)),
    "top_p": field(1.0, 0.9, 1e-8, 5e-324, 1e-39, extra=st.floats(0, 1, exclude_min=True)),
    "top_k": field(0, 1, 40, 2999, 3000, 2**31 - 1, 2**31, 2**63),
    "min_p": field(0, 0.05, 1.0, 5e-324),
    "presence_penalty": field(-2, 2, 0, 0.5),
    "frequency_penalty": field(-2, 2, 0, 1e-39),
    "stop": field("\n", ["x", "def"], ["a", "b", "c", "d", "e"], extra=st.lists(text, max_size=3)),
}
OPENAI = {
    **SAMPLING,
    "model": field(MODEL, "gpt-4", ""),
    "n": field(1, 2, 16),
    "stream": field(True, False),
    "stream_options": field({"include_usage": True}),
    "logit_bias": field({}, extra=bias),
    "seed": field(0, 1, 2**64 - 1, 2**64),
    "repetition_penalty": field(1.0, 0.01, 100.0, 1.3),
    "stop_token_ids": field([2], extra=token_ids),
    "user": field("someone"),
}
ENDPOINTS: Dict[str, Tuple[Dict[str, st.SearchStrategy], Dict[str, st.SearchStrategy]]] = {
    # path: (fields always sent, fields sent or not)
    "/v1/completions": (
        {
            "prompt": st.one_of(
                text, st.lists(text, min_size=1, max_size=2), token_ids, st.lists(token_ids, max_size=2)
            )
        },
        {
            **OPENAI,
            "max_tokens": field(0, 1, 4, 16, None),
            "suffix": field(None, extra=text),
            "suffix_first": field(True),
            "logprobs": field(None, 0, 1, 5, 6),
            "echo": field(True, False),
        },
    ),
    "/v1/chat/completions": (
        {
            "messages": st.one_of(
                text.map(lambda content: [{"role": "user", "content": content}]),
                st.lists(message, max_size=3),
            )
        },
        {
            **OPENAI,
            "max_tokens": field(0, 1, 4, 16),
            "max_completion_tokens": field(1, 8),
            "logprobs": field(True, False),
            "top_logprobs": field(0, 2, 5, 6),
        },
    ),
    "/completion": (
        {"prompt": st.one_of(text, token_ids)},
        {
            **SAMPLING,
            "n_predict": field(-1, 0, 1, 8, 16, 10**9, 1e9, 2**63),
            "repeat_penalty": field(1.0, 0.01, 100.0),
            "stream": field(True, False),
            "seed": field(-1, 0, 2**64 - 1),
            "n_probs": field(0, 1, 5),
            "logit_bias": field([[2, False]], [[5, 100.0]], [[3000, 1.0]], extra=bias),
            "cache_prompt": field(True, False),
        },
    ),
    "/infill": (
        {"input_prefix": text, "input_suffix": text},
        {
            **SAMPLING,
            "prompt": text,
            "n_predict": field(1, 8, 16, 10**9, 1e9),
            "input_extra": field([], [{"filename": "a.py", "text": "x = 1"}], [{"text": "²"}]),
            "stream": field(True, False),
            "logit_bias": field([[2, False]], extra=bias),
        },
    ),
    "/tokenize": (
        {"content": text},
        {"add_special": field(True, False), "with_pieces": field(True, False)},
    ),
    "/detokenize": ({"tokens": token_ids}, {}),
}


@st.composite
def fuzz_request(draw) -> Tuple[str, bytes]:
    """An endpoint and a JSON body (NaN and Infinity kept as JSON's common extension writes them)."""
    path = draw(st.sampled_from(sorted(ENDPOINTS)))
    required, optional = ENDPOINTS[path]
    body: object = {name: draw(strategy) for name, strategy in required.items()}
    for name in (
        draw(st.lists(st.sampled_from(sorted(optional)), max_size=5, unique=True)) if optional else []
    ):
        body[name] = draw(optional[name])
    # Most requests are sensible but for one or two fields given an edge value, so that each
    # hostile value reaches the code behind the checks of the other fields.
    for name in draw(st.lists(st.sampled_from(sorted({**required, **optional})), max_size=2, unique=True)):
        body[name] = draw(edge)
    if draw(st.sampled_from(range(30))) == 17:  # now and then not an object at all
        body = draw(edge)
    return path, json.dumps(body).encode()


def generate_requests(count: int) -> List[Tuple[str, bytes]]:
    """`count` requests drawn by hypothesis from a fixed seed (the same ones on every run)."""
    drawn: List[Tuple[str, bytes]] = []

    @settings(
        max_examples=count,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(fuzz_request())
    def collect(request: Tuple[str, bytes]) -> None:
        drawn.append(request)

    collect()
    return drawn


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    log = tmp_path_factory.mktemp("fuzz_server") / "server.log"
    server = ServerProcess(
        [
            "--max_seq_len",
            str(MAX_SEQ_LEN),
            "--max_batch_size",
            str(SLOTS),
            "--max_queue",
            "128",
            "--dtype",
            "float32",
            "--model_name",
            MODEL,
        ],
        log,
    )
    try:
        yield server.wait_ready()
    finally:
        server.stop()


def check_answer(path: str, body: bytes, response: httpx.Response) -> Optional[str]:
    """What is wrong with one answer, or None."""
    where = f"{path} {body[:200]!r} -> {response.status_code} {response.text[:300]!r}"
    if response.status_code >= 500:
        return f"5xx: {where}"
    if response.status_code >= 400:
        try:
            error = response.json()["error"]
        except (ValueError, KeyError, TypeError):
            return f"not an error object: {where}"
        if (
            set(error) != {"message", "type", "param", "code"}
            or not isinstance(error["message"], str)
            or not error["message"]
        ):
            return f"error object without a message: {where}"
        return None
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        for line in response.text.splitlines():
            if line.startswith("data: ") and line != "data: [DONE]" and "error" in json.loads(line[6:]):
                return f"error event in a stream: {where}"
        return None
    try:
        response.json()
    except ValueError:
        return f"not JSON: {where}"
    return None


def canary(client: httpx.Client) -> Tuple[str, str]:
    response = client.post("/v1/completions", json=CANARY)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    return choice["text"], choice["finish_reason"]


def test_fuzzed_requests_harm_no_other_request(demo_server):
    requests = generate_requests(FUZZ_REQUESTS)
    assert len(requests) >= FUZZ_REQUESTS * 0.9  # hypothesis drew (nearly) as many as asked
    timeout = httpx.Timeout(REQUEST_TIMEOUT_S)
    with httpx.Client(base_url=demo_server.url, timeout=timeout) as client:
        alone = canary(client)

    problems: List[str] = []
    canaries: List[Tuple[str, str]] = []
    fuzzing = threading.Event()
    fuzzing.set()

    def send(share: List[Tuple[str, bytes]]) -> None:
        with httpx.Client(base_url=demo_server.url, timeout=timeout) as client:
            for path, body in share:
                try:
                    response = client.post(path, content=body, headers={"Content-Type": "application/json"})
                except httpx.HTTPError as error:  # a timeout (a hang) or a dropped connection
                    problems.append(f"{type(error).__name__}: {path} {body[:200]!r}")
                    continue
                problem = check_answer(path, body, response)
                if problem is not None:
                    problems.append(problem)

    def repeat_canary() -> None:
        with httpx.Client(base_url=demo_server.url, timeout=timeout) as client:
            while fuzzing.is_set():
                try:
                    canaries.append(canary(client))
                except (AssertionError, httpx.HTTPError) as error:
                    canaries.append(("failed", str(error)[:300]))

    with ThreadPoolExecutor(CONNECTIONS + 1) as pool:
        beside = pool.submit(repeat_canary)
        shares = [pool.submit(send, requests[i::CONNECTIONS]) for i in range(CONNECTIONS)]
        for share in shares:
            share.result()
        fuzzing.clear()
        beside.result()

    assert not problems, f"{len(problems)} bad answers, e.g.:\n" + "\n".join(problems[:10])
    assert canaries and all(answer == alone for answer in canaries), [a for a in canaries if a != alone][:5]

    with httpx.Client(base_url=demo_server.url, timeout=timeout) as client:

        def settled() -> bool:
            health = client.get("/health")
            stats = health.json()
            return (
                health.status_code == 200
                and stats["status"] == "ok"
                and stats["running"] == 0
                and stats["waiting"] == 0
                and stats["free_slots"] == SLOTS
            )

        wait_for(settled, "the server to be healthy with every slot free")
        assert canary(client) == alone
