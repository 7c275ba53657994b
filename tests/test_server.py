"""The HTTP server: real `python -m llama.server` processes on free loopback ports, driven with the
official `openai` client and with httpx.

The servers (MP=1 with an API key and a small queue, MP=1 with a tokenizer that cannot infill
and speculation by default, and MP=2 under torchrun) start once for the module, in parallel.
The oracle for every greedy answer is the in-process `Llama` API on the same checkpoint.
"""

import json
import os
import signal
import subprocess
from pathlib import Path

import httpx
import openai
import pytest

from llama import Llama
from tests.servers import ServerProcess, assert_error, metric, sse_events, wait_for, write_tiny_checkpoint

KEY = "test-key"
MODEL = "tiny-code"
MAX_SEQ_LEN = 8192  # long enough that a LONG generation outlasts any check made during it
PREFIX, SUFFIX = "def add(a, b):\n    ", "\n    return result\n"


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer_path, plain_tokenizer_path, step_tokenizer_path):
    root = tmp_path_factory.mktemp("server_models")
    return {
        "mp1": write_tiny_checkpoint(root / "mp1", tokenizer_path, 1),
        "mp2": write_tiny_checkpoint(root / "mp2", tokenizer_path, 2),
        "plain": write_tiny_checkpoint(root / "plain", plain_tokenizer_path, 1),
        "step": write_tiny_checkpoint(root / "step", step_tokenizer_path, 1),
    }


@pytest.fixture(scope="module")
def servers(models, tokenizer_path, plain_tokenizer_path, step_tokenizer_path, tmp_path_factory):
    logs = tmp_path_factory.mktemp("server_logs")
    common = ["--max_seq_len", str(MAX_SEQ_LEN), "--dtype", "float32", "--model_name", MODEL]
    started = {
        "main": ServerProcess(
            [
                "--ckpt_dir",
                str(models["mp1"]),
                "--tokenizer_path",
                str(tokenizer_path),
                "--api_key",
                KEY,
                "--max_batch_size",
                "2",
                "--max_queue",
                "1",
                "--max_body_bytes",
                "65536",
                "--grace_period",
                "20",
            ]
            + common,
            logs / "main.log",
        ),
        "plain": ServerProcess(  # also speculates by default, for requests that do not say
            [
                "--ckpt_dir",
                str(models["plain"]),
                "--tokenizer_path",
                str(plain_tokenizer_path),
                "--lookup",
                "4",
            ]
            + common,
            logs / "plain.log",
        ),
        "step": ServerProcess(
            ["--ckpt_dir", str(models["step"]), "--tokenizer_path", str(step_tokenizer_path)] + common,
            logs / "step.log",
        ),
        "mp2": ServerProcess(
            ["--ckpt_dir", str(models["mp2"]), "--tokenizer_path", str(tokenizer_path)] + common,
            logs / "mp2.log",
            torchrun=True,
        ),
    }
    empty = tmp_path_factory.mktemp("no_checkpoint")
    broken = ServerProcess(
        ["--ckpt_dir", str(empty), "--tokenizer_path", str(tokenizer_path)], logs / "broken.log"
    )
    try:
        for server in started.values():
            server.wait_ready()
        yield {**started, "broken": broken}
    finally:
        for server in [*started.values(), broken]:
            server.stop()


@pytest.fixture(scope="module")
def main(servers) -> ServerProcess:
    return servers["main"]


@pytest.fixture(scope="module")
def http(main):
    with httpx.Client(base_url=main.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def client(main) -> openai.OpenAI:
    return openai.OpenAI(base_url=main.url + "/v1", api_key=KEY, max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def reference(models, tokenizer_path) -> Llama:
    return Llama.build(str(models["mp1"]), str(tokenizer_path), MAX_SEQ_LEN, 2, dtype="float32")


# ---------------------------------------------------------------- answers


def test_models_and_health(main, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    health = httpx.get(main.url + "/health").json()  # no key needed
    assert health["status"] == "ok" and health["max_batch_size"] == 2


def test_completions_match_text_completion(client, reference):
    prompts = ["import os\n", "def parse(text):"]
    response = client.completions.create(model=MODEL, prompt=prompts, max_tokens=24, temperature=0)
    expected = reference.text_completion(prompts, temperature=0, max_gen_len=24)
    assert [c.index for c in response.choices] == [0, 1]
    for choice, want in zip(response.choices, expected):
        # The reference decodes without the first token's word-boundary space; the server keeps
        # it, so that prompt + text is the exact continuation.
        assert choice.text.removeprefix(" ") == want["generation"].removeprefix(" ")
        assert choice.finish_reason == "length"
    prompt_tokens = sum(len(reference.tokenizer.encode(p, bos=True, eos=False)) for p in prompts)
    assert response.usage.prompt_tokens == prompt_tokens
    assert response.usage.completion_tokens == 48


def test_streamed_text_equals_non_streamed(client):
    kwargs = dict(model=MODEL, prompt="class Parser:", max_tokens=30, temperature=0)
    whole = client.completions.create(**kwargs).choices[0]
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 30

    messages = [{"role": "user", "content": "Write a function that adds two numbers."}]
    answer = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=30, temperature=0)
    stream = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=30, temperature=0, stream=True
    )
    deltas = [chunk.choices[0].delta for chunk in stream]
    assert deltas[0].role == "assistant"
    assert "".join(d.content or "" for d in deltas) == answer.choices[0].message.content


def test_chat_matches_chat_completion(client, reference):
    dialog = [
        {"role": "system", "content": "Answer with code."},
        {"role": "user", "content": "Sort a list."},
        {"role": "assistant", "content": "sorted(xs)"},
        {"role": "user", "content": "In place?"},
    ]
    want = reference.chat_completion([dialog], temperature=0, max_gen_len=20)[0]["generation"]["content"]
    answer = client.chat.completions.create(model=MODEL, messages=dialog, max_tokens=20, temperature=0)
    assert answer.choices[0].message.content == want
    assert answer.choices[0].message.role == "assistant"
    # Content given as a list of text parts is the same message.
    parts = [
        {"role": "user", "content": [{"type": "text", "text": "Sort "}, {"type": "text", "text": "a list."}]}
    ]
    plain = [{"role": "user", "content": "Sort a list."}]
    texts = [
        client.chat.completions.create(model=MODEL, messages=m, max_tokens=10, temperature=0)
        .choices[0]
        .message.content
        for m in (parts, plain)
    ]
    assert texts[0] == texts[1]


def test_infilling_three_ways_gives_the_reference_middle(client, http, reference):
    want = reference.text_infilling([PREFIX], [SUFFIX], temperature=0, max_gen_len=24)[0]["generation"]
    by_suffix = client.completions.create(
        model=MODEL, prompt=PREFIX, suffix=SUFFIX, max_tokens=24, temperature=0
    )
    by_markers = http.post(
        "/v1/completions",
        json={
            "model": MODEL,
            "prompt": f"<PRE> {PREFIX} <SUF>{SUFFIX} <MID>",
            "max_tokens": 24,
            "temperature": 0,
        },
    ).json()
    by_infill = http.post(
        "/infill", json={"input_prefix": PREFIX, "input_suffix": SUFFIX, "n_predict": 24, "temperature": 0}
    ).json()
    assert by_suffix.choices[0].text == want
    assert by_markers["choices"][0]["text"] == want
    assert by_infill["content"] == want and by_infill["tokens_predicted"] == 24
    # The three prompts are the same tokens: each later one reuses the whole cached prompt.
    prompt_len = (
        len(reference.tokenizer.encode(PREFIX, bos=False, eos=False))
        + len(reference.tokenizer.encode_infilling(SUFFIX))
        + 4
    )
    assert by_suffix.usage.prompt_tokens == by_markers["usage"]["prompt_tokens"] == prompt_len
    assert by_infill["tokens_evaluated"] == prompt_len


def test_infilling_stops_at_eot(client, http, reference):
    eot = reference.tokenizer.eot_id
    bias = {str(eot): 100}
    infill = client.completions.create(
        model=MODEL, prompt=PREFIX, suffix=SUFFIX, max_tokens=24, temperature=0, logit_bias=bias
    )
    assert infill.choices[0].text == "" and infill.choices[0].finish_reason == "stop"
    assert infill.usage.completion_tokens == 1
    markers = http.post(
        "/v1/completions",
        json={
            "prompt": f"<PRE> {PREFIX} <SUF>{SUFFIX} <MID>",
            "max_tokens": 24,
            "temperature": 0,
            "logit_bias": bias,
        },
    ).json()["choices"][0]
    assert markers["text"] == "" and markers["finish_reason"] == "stop"
    llamacpp = http.post(
        "/infill",
        json={
            "input_prefix": PREFIX,
            "input_suffix": SUFFIX,
            "n_predict": 24,
            "temperature": 0,
            "logit_bias": [[eot, 100.0]],
        },
    ).json()
    assert llamacpp["content"] == "" and llamacpp["stopped_eos"] and llamacpp["stop_type"] == "eos"
    # A plain completion does not stop at ▁<EOT>: it is an ordinary token there.
    plain = client.completions.create(
        model=MODEL, prompt=PREFIX, max_tokens=5, temperature=0, logit_bias=bias
    )
    assert plain.choices[0].finish_reason == "length" and plain.usage.completion_tokens == 5


def test_logprobs_echo_and_n(client, reference):
    response = client.completions.create(
        model=MODEL, prompt="import os\n", max_tokens=6, temperature=0, logprobs=3, echo=True
    )
    choice = response.choices[0]
    want = reference.text_completion(["import os\n"], temperature=0, max_gen_len=6, logprobs=True)[0]
    assert choice.text.startswith("import os\n")
    generated = choice.logprobs.token_logprobs[-6:]
    assert generated == pytest.approx(want["logprobs"], abs=1e-4)
    assert all(len(top) == 3 for top in choice.logprobs.top_logprobs[-6:])
    assert "".join(choice.logprobs.tokens).removeprefix(" ") == choice.text
    sampled = client.completions.create(model=MODEL, prompt="x", max_tokens=8, temperature=1.0, n=2, seed=5)
    assert [c.index for c in sampled.choices] == [0, 1]
    again = client.completions.create(model=MODEL, prompt="x", max_tokens=8, temperature=1.0, n=2, seed=5)
    assert [c.text for c in again.choices] == [c.text for c in sampled.choices]  # seeded


def test_streamed_text_offsets_continue_across_chunks(http):
    body = {"prompt": "def parse(text):", "max_tokens": 12, "temperature": 0, "logprobs": 1}
    whole = http.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
        events = sse_events(response)[:-1]
    streamed = [e["choices"][0]["logprobs"] for e in events if e["choices"][0]["logprobs"]]
    assert len(streamed) > 1
    assert [o for lp in streamed for o in lp["text_offset"]] == whole["text_offset"]
    assert [t for lp in streamed for t in lp["tokens"]] == whole["tokens"]


def test_chat_logprob_bytes_of_byte_tokens(http, reference):
    byte_token = reference.tokenizer.piece_id("<0xE2>")
    body = {
        "messages": [{"role": "user", "content": "Sort a list."}],
        "max_tokens": 2,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 2,
        "logit_bias": {str(byte_token): 100},
    }
    for stream in (False, True):
        if stream:
            with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
                events = sse_events(response)[:-1]
            content = [c for e in events for c in (e["choices"][0]["logprobs"] or {}).get("content", [])]
        else:
            content = http.post("/v1/chat/completions", json=body).json()["choices"][0]["logprobs"]["content"]
        assert [c["token"] for c in content] == ["bytes:\\xe2"] * 2
        assert [c["bytes"] for c in content] == [[0xE2]] * 2
        # The alternatives are the raw model's (before the bias): text or byte pieces.
        for alternative in content[0]["top_logprobs"]:
            token = alternative["token"]
            byte = [int(token[-2:], 16)] if token.startswith("bytes:\\x") else None
            assert alternative["bytes"] == (byte or list(token.encode("utf-8"))), alternative


def test_stop_strings(client):
    whole = (
        client.completions.create(model=MODEL, prompt="def f(x):", max_tokens=30, temperature=0)
        .choices[0]
        .text
    )
    stop = whole[10:13]
    cut = client.completions.create(
        model=MODEL, prompt="def f(x):", max_tokens=30, temperature=0, stop=[stop]
    )
    assert cut.choices[0].text == whole[: whole.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_token_id_prompts(client, http, reference):
    text = client.completions.create(model=MODEL, prompt="import os\n", max_tokens=12, temperature=0)
    ids = http.post("/tokenize", json={"content": "import os\n", "add_special": True}).json()["tokens"]
    assert ids == reference.tokenizer.encode("import os\n", bos=True, eos=False)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=12, temperature=0)
    assert by_ids.choices[0].text == text.choices[0].text
    by_batch = client.completions.create(model=MODEL, prompt=[ids, ids[:2]], max_tokens=12, temperature=0)
    assert by_batch.choices[0].text == text.choices[0].text and len(by_batch.choices) == 2


def test_tokenize_detokenize(http, reference):
    ids = http.post("/tokenize", json={"content": PREFIX}).json()["tokens"]
    assert ids == reference.tokenizer.encode(PREFIX, bos=False, eos=False)
    assert http.post("/detokenize", json={"tokens": ids}).json()["content"] == PREFIX


def test_turn_format_chat_matches_chat_completion_and_stops_at_step(servers, models, step_tokenizer_path):
    reference = Llama.build(str(models["step"]), str(step_tokenizer_path), MAX_SEQ_LEN, 1, dtype="float32")
    client = openai.OpenAI(base_url=servers["step"].url + "/v1", api_key="unused", max_retries=0)
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sort a list."}]
    want = reference.chat_completion([dialog], temperature=0, max_gen_len=20)[0]["generation"]
    answer = client.chat.completions.create(model=MODEL, messages=dialog, max_tokens=20, temperature=0)
    assert answer.choices[0].message.content == want["content"]
    assert answer.choices[0].message.model_extra["destination"] == want["destination"] == "user"
    step = {str(reference.tokenizer.step_id): 100}
    stopped = client.chat.completions.create(
        model=MODEL, messages=dialog, max_tokens=20, temperature=0, logit_bias=step
    ).choices[0]
    assert stopped.message.content == "" and stopped.finish_reason == "stop"


# ---------------------------------------------------------------- editor plugins' request bodies


def test_editor_plugin_bodies(http, main):
    # Continue, "openai" provider, Code Llama FIM template `<PRE> {{{prefix}}} <SUF>{{{suffix}}} <MID>`,
    # streaming autocomplete with the template's stop words.
    continue_body = {
        "model": MODEL,
        "prompt": f"<PRE> {PREFIX} <SUF>{SUFFIX} <MID>",
        "max_tokens": 64,
        "temperature": 0.01,
        "stop": ["<PRE>", "<SUF>", "<MID>", "<EOT>"],
        "stream": True,
    }
    with http.stream("POST", "/v1/completions", json=continue_body) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith(
            "text/event-stream"
        )
        events = sse_events(response)
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(isinstance(e["choices"][0]["text"], str) for e in events[:-1])

    # Tabby, `kind = "llama.cpp/completion"` with prompt_template `<PRE> {prefix} <SUF>{suffix} <MID>`.
    tabby_llamacpp = {
        "seed": 0,
        "prompt": f"<PRE> {PREFIX} <SUF>{SUFFIX} <MID>",
        "n_predict": 64,
        "temperature": 0.1,
        "stream": True,
        "penalty_last_n": 0,
        "presence_penalty": 0.0,
    }
    with http.stream("POST", "/completion", json=tabby_llamacpp) as response:
        assert response.status_code == 200
        events = sse_events(response)
    assert all(isinstance(e["content"], str) for e in events)
    assert [e["stop"] for e in events].count(True) == 1 and events[-1]["stop"] is True
    assert events[-1]["tokens_predicted"] == 64  # EOT is out of reach for this checkpoint

    # Tabby, `kind = "openai/completion"` (no prompt template: prefix as prompt, suffix as suffix).
    tabby_openai = {
        "model": MODEL,
        "prompt": PREFIX,
        "suffix": SUFFIX,
        "max_tokens": 64,
        "temperature": 0.1,
        "stream": True,
        "presence_penalty": 0.0,
    }
    with http.stream("POST", "/v1/completions", json=tabby_openai) as response:
        events = sse_events(response)
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"

    # llm-vscode (llm-ls, backend "openai"): fim prefix "<PRE> ", suffix " <SUF>", middle " <MID>",
    # request_body parameters merged into the body, not streamed.
    llm_vscode = {
        "model": MODEL,
        "prompt": f"<PRE> {PREFIX} <SUF>{SUFFIX} <MID>",
        "max_tokens": 60,
        "temperature": 0.2,
        "top_p": 0.95,
    }
    answer = http.post("/v1/completions", json=llm_vscode).json()
    assert answer["object"] == "text_completion" and isinstance(answer["choices"][0]["text"], str)
    assert answer["usage"]["completion_tokens"] == 60

    # llama.vim / llama.cpp's own clients: /infill with extra context chunks and a cursor prompt.
    llama_vim = {
        "input_prefix": PREFIX,
        "input_suffix": SUFFIX,
        "input_extra": [{"filename": "util.py", "text": "def helper():\n    pass\n"}],
        "prompt": "res",
        "n_predict": 16,
        "temperature": 0.0,
        "top_k": 40,
        "top_p": 0.99,
        "stream": False,
        "cache_prompt": True,
    }
    answer = http.post("/infill", json=llama_vim).json()
    assert isinstance(answer["content"], str) and answer["stopped_limit"] and answer["tokens_predicted"] == 16


# ---------------------------------------------------------------- speculative decoding

LOOKUP = {"method": "lookup", "num_tokens": 4}
# Code that repeats itself: prompt lookup finds the continuation of its n-grams earlier on.
REPEATING = "def area(w, h):\n    return w * h\n\n\ndef area(w, h):\n    return w * h\n\n\ndef "


def speculative_counts(http: httpx.Client):
    return (
        metric(http, "codellama_speculative_proposed_tokens_total"),
        metric(http, "codellama_speculative_accepted_tokens_total"),
    )


def test_greedy_speculation_gives_the_same_tokens_on_every_endpoint(http, client, reference):
    def completion(**extra):
        return client.completions.create(
            model=MODEL, prompt=REPEATING, max_tokens=48, temperature=0, logprobs=0, **extra
        ).choices[0]

    before = speculative_counts(http)
    plain = completion()
    assert speculative_counts(http) == before  # this server does not speculate unless asked
    expected = reference.text_completion([REPEATING], temperature=0, max_gen_len=48)[0]["generation"]
    assert plain.text.removeprefix(" ") == expected.removeprefix(" ")
    for speculative in (LOOKUP, "lookup", {"num_tokens": 7, "max_ngram": 5, "min_ngram": 2}):
        fast = completion(extra_body={"speculative": speculative})
        assert fast.text == plain.text
        assert fast.logprobs.tokens == plain.logprobs.tokens
        assert fast.logprobs.token_logprobs == pytest.approx(plain.logprobs.token_logprobs, abs=1e-4)
    after = speculative_counts(http)
    # Proposals were made and kept (the tiny model loops, which lookup copies): the counters grew.
    assert after[0] > before[0] and after[1] > before[1] and after[1] <= after[0]

    chunks = client.completions.create(
        model=MODEL,
        prompt=REPEATING,
        max_tokens=48,
        temperature=0,
        stream=True,
        extra_body={"speculative": LOOKUP},
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.text

    dialog = [{"role": "user", "content": REPEATING}]
    answers = [
        client.chat.completions.create(model=MODEL, messages=dialog, max_tokens=32, temperature=0, **extra)
        .choices[0]
        .message.content
        for extra in ({}, {"extra_body": {"speculative": LOOKUP}})
    ]
    assert answers[0] == answers[1]
    assert (
        answers[0]
        == reference.chat_completion([dialog], temperature=0, max_gen_len=32)[0]["generation"]["content"]
    )

    for path, body in (
        ("/completion", {"prompt": REPEATING, "n_predict": 32, "temperature": 0}),
        ("/infill", {"input_prefix": REPEATING, "input_suffix": SUFFIX, "n_predict": 32, "temperature": 0}),
    ):
        plain_answer = http.post(path, json=body).json()
        fast_answer = http.post(path, json={**body, "speculative": LOOKUP}).json()
        assert fast_answer["content"] == plain_answer["content"] and fast_answer["tokens_predicted"] == 32
    assert speculative_counts(http)[0] > after[0]


def test_sampled_speculative_requests_are_answered(client):
    response = client.completions.create(
        model=MODEL,
        prompt=REPEATING,
        max_tokens=16,
        temperature=0.8,
        n=2,
        seed=5,
        extra_body={"speculative": LOOKUP},
    )
    assert [c.finish_reason for c in response.choices] == ["length", "length"]
    assert response.usage.completion_tokens == 32


def test_server_lookup_flag_speculates_unless_a_request_says_false(servers):
    with httpx.Client(base_url=servers["plain"].url, timeout=30) as plain_server:
        body = {"prompt": REPEATING, "max_tokens": 40, "temperature": 0}

        def text(**extra):
            answer = plain_server.post("/v1/completions", json={**body, **extra})
            assert answer.status_code == 200, answer.text
            return answer.json()["choices"][0]["text"]

        start = speculative_counts(plain_server)
        off = text(speculative=False)
        assert speculative_counts(plain_server) == start  # false: no proposals
        off_by_method = text(speculative={"method": "none"})
        assert speculative_counts(plain_server) == start
        by_default = text()  # the server's --lookup 4
        after = speculative_counts(plain_server)
        assert after[0] > start[0] and after[1] > start[1]
        assert by_default == off == off_by_method


# ---------------------------------------------------------------- errors


ERROR_CASES = [
    ("invalid json", {"content": b'{"prompt": "x",'}, 400, None, "invalid_json"),
    ("not an object", {"json": ["x"]}, 400, None, None),
    ("missing prompt", {"json": {"max_tokens": 3}}, 400, "prompt", None),
    ("wrong type", {"json": {"prompt": "x", "max_tokens": "3"}}, 400, "max_tokens", None),
    ("bool as number", {"json": {"prompt": "x", "temperature": True}}, 400, "temperature", None),
    ("unknown model", {"json": {"prompt": "x", "model": "gpt-4"}}, 404, "model", "model_not_found"),
    ("temperature range", {"json": {"prompt": "x", "temperature": 100.5}}, 400, "temperature", None),
    ("temperature 1e308", {"json": {"prompt": "x", "temperature": 1e308}}, 400, "temperature", None),
    ("nan", {"content": b'{"prompt": "x", "temperature": NaN}'}, 400, "temperature", "finite_number"),
    ("infinity", {"content": b'{"prompt": "x", "min_p": Infinity}'}, 400, "min_p", "finite_number"),
    ("top_p range", {"json": {"prompt": "x", "top_p": 0}}, 400, "top_p", None),
    ("huge top_k", {"json": {"prompt": "x", "top_k": 2**63}}, 400, "top_k", None),
    ("tiny penalty", {"json": {"prompt": "x", "repetition_penalty": 1e-39}}, 400, "repetition_penalty", None),
    ("huge penalty", {"json": {"prompt": "x", "repetition_penalty": 1e39}}, 400, "repetition_penalty", None),
    ("seed range", {"json": {"prompt": "x", "seed": 2**64}}, 400, "seed", None),
    ("n range", {"json": {"prompt": "x", "n": 2**63, "temperature": 1}}, 400, "n", None),
    ("long stop", {"json": {"prompt": "x", "stop": ["y" * 1025]}}, 400, "stop", None),
    ("stop ids", {"json": {"prompt": "x", "stop_token_ids": [5] * 65}}, 400, "stop_token_ids", None),
    ("bias key text", {"json": {"prompt": "x", "logit_bias": {"abc": 1}}}, 400, "logit_bias", None),
    ("bias key digit", {"json": {"prompt": "x", "logit_bias": {"²": 1}}}, 400, "logit_bias", None),
    (
        "bias entries",
        {"json": {"prompt": "x", "logit_bias": {str(i): 1 for i in range(1025)}}},
        400,
        "logit_bias",
        None,
    ),
    ("bias 1e39", {"json": {"prompt": "x", "logit_bias": {"5": 1e39}}}, 400, "logit_bias", None),
    ("logprobs range", {"json": {"prompt": "x", "logprobs": 6}}, 400, "logprobs", None),
    ("five stops", {"json": {"prompt": "x", "stop": list("abcde")}}, 400, "stop", None),
    ("bias token", {"json": {"prompt": "x", "logit_bias": {"999999": 1}}}, 400, "logit_bias", None),
    ("bias value", {"json": {"prompt": "x", "logit_bias": {"5": 101}}}, 400, "logit_bias", None),
    ("greedy n", {"json": {"prompt": "x", "n": 2, "temperature": 0}}, 400, "n", None),
    ("negative max_tokens", {"json": {"prompt": "x", "max_tokens": -1}}, 400, "max_tokens", None),
    ("n over capacity", {"json": {"prompt": "x", "n": 4, "temperature": 1}}, 400, "n", None),
    ("token prompt", {"json": {"prompt": [1, 10**6]}}, 400, "prompt", None),
    (
        "speculate 0",
        {"json": {"prompt": "x", "speculative": {"method": "lookup", "num_tokens": 0}}},
        400,
        "speculative.num_tokens",
        None,
    ),
    (
        "speculate 8",
        {"json": {"prompt": "x", "speculative": {"num_tokens": 8}}},
        400,
        "speculative.num_tokens",
        None,
    ),
    (
        "speculate x",
        {"json": {"prompt": "x", "speculative": {"num_tokens": "x"}}},
        400,
        "speculative.num_tokens",
        None,
    ),
    (
        "speculate 4.5",
        {"json": {"prompt": "x", "speculative": {"num_tokens": 4.5}}},
        400,
        "speculative.num_tokens",
        None,
    ),
    (
        "speculate how",
        {"json": {"prompt": "x", "speculative": {"method": "magic"}}},
        400,
        "speculative.method",
        None,
    ),
    ("speculate word", {"json": {"prompt": "x", "speculative": "draft"}}, 400, "speculative", None),
    ("speculate true", {"json": {"prompt": "x", "speculative": True}}, 400, "speculative", None),
    (
        "speculate ngram",
        {"json": {"prompt": "x", "speculative": {"max_ngram": 17}}},
        400,
        "speculative",
        None,
    ),
    (
        "speculate ngrams",
        {"json": {"prompt": "x", "speculative": {"max_ngram": 2, "min_ngram": 3}}},
        400,
        "speculative",
        None,
    ),
]


@pytest.mark.parametrize(
    "name,request_kwargs,status,param,code", ERROR_CASES, ids=[c[0] for c in ERROR_CASES]
)
def test_invalid_completion_requests(http, name, request_kwargs, status, param, code):
    assert_error(http.post("/v1/completions", **request_kwargs), status, param, code)


def test_other_invalid_requests_and_the_server_still_answers(http, client, reference):
    assert_error(http.post("/v1/chat/completions", json={"messages": []}), 400, "messages")
    bad_order = {"messages": [{"role": "assistant", "content": "hi"}]}
    assert (
        "expected role 'user'"
        in assert_error(http.post("/v1/chat/completions", json=bad_order), 400)["message"]
    )
    unsafe = {"messages": [{"role": "user", "content": "[INST] hi"}]}
    assert_error(http.post("/v1/chat/completions", json=unsafe), 400, "messages")
    assert_error(http.post("/detokenize", json={"tokens": [10**6]}), 400, "tokens")
    assert_error(http.get("/v1/nothing"), 404)
    # A prompt that does not fit with its max_tokens: the message gives both counts.
    prompt = "x = 1\n" * 400
    n_prompt = len(reference.tokenizer.encode(prompt, bos=True, eos=False))
    error = assert_error(
        http.post("/v1/completions", json={"prompt": prompt, "max_tokens": MAX_SEQ_LEN}),
        400,
        "max_tokens",
        "context_length_exceeded",
    )
    assert f"{n_prompt} tokens" in error["message"] and str(MAX_SEQ_LEN) in error["message"]
    with pytest.raises(openai.NotFoundError) as raised:
        client.completions.create(model="nope", prompt="x")
    assert raised.value.status_code == 404 and raised.value.body["param"] == "model"
    assert raised.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    # A body over --max_body_bytes is refused from its Content-Length, before it is read.
    big = http.post("/v1/completions", content=b"x" * 70_000, headers={"Content-Type": "application/json"})
    assert_error(big, 413, code="request_too_large")
    chunked = http.post("/v1/completions", content=iter([b"x" * 40_000] * 2))  # no Content-Length
    assert_error(chunked, 413, code="request_too_large")
    assert client.completions.create(model=MODEL, prompt="x", max_tokens=2, temperature=0).choices[0].text


def test_while_loading_health_and_generation_answer_503():
    """The app before its model is loaded (in process: no model is ever set)."""
    from starlette.testclient import TestClient

    from llama.server.app import create_app
    from llama.server.state import ServerState

    with TestClient(create_app(ServerState(MODEL, max_queue=4))) as loading:
        health = loading.get("/health")
        assert health.status_code == 503 and health.json() == {"status": "loading"}
        refused = loading.post("/v1/completions", json={"prompt": "x"})
        assert_error(refused, 503, code="model_loading")
        assert refused.headers["Retry-After"] == "1"
        assert loading.get("/v1/models").json()["data"][0]["id"] == MODEL


LLAMACPP_ERROR_CASES = [
    ("/completion", {"prompt": "x", "logit_bias": {"abc": 1}}, "logit_bias"),
    ("/completion", {"prompt": "x", "logit_bias": [[5, 1e39]]}, "logit_bias"),
    ("/completion", {"prompt": "x", "temperature": 1e308}, "temperature"),
    ("/completion", {"prompt": "x", "top_k": 2**63}, "top_k"),
    ("/completion", {"prompt": "x", "repeat_penalty": 1e-39}, "repeat_penalty"),
    ("/completion", {"prompt": "x", "n_predict": 1.5}, "n_predict"),
    ("/completion", {"prompt": "x", "seed": -2}, "seed"),
    ("/infill", {"input_prefix": "x", "logit_bias": {"²": 1}}, "logit_bias"),
    ("/infill", {"input_prefix": "x", "n_probs": 6}, "n_probs"),
]


@pytest.mark.parametrize("path,body,param", LLAMACPP_ERROR_CASES)
def test_invalid_llamacpp_requests(http, path, body, param):
    assert_error(http.post(path, json=body), 400, param)


CHAT = {"messages": [{"role": "user", "content": "x"}]}
SPECULATIVE_ERROR_CASES = [
    ("/v1/chat/completions", {**CHAT, "speculative": {"num_tokens": 8}}, "speculative.num_tokens"),
    ("/v1/chat/completions", {**CHAT, "speculative": {"method": "draft"}}, "speculative.method"),
    ("/v1/chat/completions", {**CHAT, "speculative": 4}, "speculative"),
    ("/completion", {"prompt": "x", "speculative": {"num_tokens": 0}}, "speculative.num_tokens"),
    ("/completion", {"prompt": "x", "speculative": {"method": "ngram"}}, "speculative.method"),
    ("/infill", {"input_prefix": "x", "speculative": {"num_tokens": "x"}}, "speculative.num_tokens"),
    ("/infill", {"input_prefix": "x", "speculative": "x"}, "speculative"),
]


@pytest.mark.parametrize("path,body,param", SPECULATIVE_ERROR_CASES)
def test_invalid_speculative_fields_on_every_endpoint(http, path, body, param):
    assert "speculative" in assert_error(http.post(path, json=body), 400, param)["message"]


def test_llamacpp_n_predict_beyond_the_context_is_capped(http, reference):
    # A prompt that leaves 5 tokens of context: asking for far more generates those 5, as llama.cpp.
    prompt = [reference.tokenizer.bos_id] + [100] * (MAX_SEQ_LEN - 6)
    for n_predict in (10**12, 2**70, 1e9):
        body = http.post("/completion", json={"prompt": prompt, "n_predict": n_predict, "temperature": 0})
        assert body.status_code == 200, body.text
        answer = body.json()
        assert answer["tokens_predicted"] == 5 and answer["stopped_limit"] and answer["stop_type"] == "limit"
    # /infill with a float count (1e9) streams like any other.
    infill = {"input_prefix": PREFIX, "input_suffix": SUFFIX, "n_predict": 1e9, "stream": True}
    with http.stream("POST", "/infill", json=infill) as response:
        assert response.status_code == 200
        first = json.loads(next(line for line in response.iter_lines() if line)[len("data: ") :])
        assert isinstance(first["content"], str) and first["stop"] is False


def test_api_key(main):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        error = assert_error(
            httpx.post(main.url + "/v1/completions", json={"prompt": "x"}, headers=headers), 401
        )
        assert error["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=main.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(main.url + "/v1/models", headers={"X-Api-Key": KEY}).status_code == 200
    assert httpx.get(main.url + "/metrics").status_code == 200  # scrapers need no key


def test_infilling_on_a_model_that_cannot_infill_is_501(servers):
    url = servers["plain"].url
    for path, body in (
        ("/v1/completions", {"prompt": PREFIX, "suffix": SUFFIX}),
        ("/v1/completions", {"prompt": f"<PRE> {PREFIX} <SUF>{SUFFIX} <MID>"}),
        ("/infill", {"input_prefix": PREFIX, "input_suffix": SUFFIX}),
    ):
        error = assert_error(httpx.post(url + path, json=body), 501, code="infilling_not_supported")
        assert "cannot infill" in error["message"]
    ok = httpx.post(url + "/v1/completions", json={"prompt": PREFIX, "max_tokens": 3, "temperature": 0})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3


def test_a_checkpoint_that_fails_to_load_exits_1_with_the_reason(servers):
    broken = servers["broken"]
    assert broken.proc.wait(60) == 1
    assert "params.json" in broken.log.read_text()


# ---------------------------------------------------------------- disconnects, queue, shutdown

# EOS banned: a greedy path that reaches EOS (which can depend on the cached prefix it starts
# from, in fp32) would end the generation before the checks made while it runs.
LONG = {"prompt": "def f(x):", "max_tokens": MAX_SEQ_LEN - 100, "temperature": 0, "logit_bias": {"2": -100}}


def test_disconnect_frees_the_slot(http, main):
    before = metric(
        http, "codellama_requests_total", {"endpoint": "completions", "finish_reason": "cancelled"}
    )
    with http.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as response:
        # Keep the line iterator: once dropped, httpx closes the connection, and the server
        # rightly cancels the request (how this check used to fail on a busy machine).
        lines = response.iter_lines()
        first = next(lines)  # generating
        assert metric(http, "codellama_requests_running") == 1, first
        del lines
    wait_for(lambda: metric(http, "codellama_requests_running") == 0, "the streamed request's slot to free")
    labels = {"endpoint": "completions", "finish_reason": "cancelled"}
    assert metric(http, "codellama_requests_total", labels) == before + 1

    # Not streaming: the client gives up waiting and closes the connection.
    with pytest.raises(httpx.ReadTimeout):
        http.post("/v1/completions", json=LONG, timeout=httpx.Timeout(30, read=0.5))
    wait_for(
        lambda: metric(http, "codellama_requests_total", labels) == before + 2, "the cancel to be counted"
    )
    wait_for(lambda: metric(http, "codellama_requests_running") == 0, "the slot to free")
    assert metric(http, "codellama_free_slots") == 2


def test_full_queue_is_503(http):
    # Two slots and a queue of one: three long generations fit, a fourth does not.
    streams = [http.stream("POST", "/v1/completions", json={**LONG, "stream": True}) for _ in range(3)]
    responses = [s.__enter__() for s in streams]
    try:
        assert all(r.status_code == 200 for r in responses)
        wait_for(lambda: metric(http, "codellama_requests_waiting") == 1, "one request to wait")
        assert metric(http, "codellama_requests_running") == 2
        refused = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
        assert_error(refused, 503, code="queue_full")
        assert refused.headers["Retry-After"] == "1"
    finally:
        for stream in streams:
            stream.__exit__(None, None, None)
    wait_for(lambda: metric(http, "codellama_requests_running") == 0, "the slots to free")
    wait_for(
        lambda: http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}).status_code == 200,
        "the queue to accept again",
    )


def test_model_parallel_server_gives_the_same_greedy_answers(servers, client):
    mp2 = openai.OpenAI(base_url=servers["mp2"].url + "/v1", api_key="unused", max_retries=0, timeout=60)
    kwargs = dict(model=MODEL, prompt=["import os\n", "class A:"], max_tokens=16, temperature=0)
    assert [c.text for c in mp2.completions.create(**kwargs).choices] == [
        c.text for c in client.completions.create(**kwargs).choices
    ]
    infill = dict(model=MODEL, prompt=PREFIX, suffix=SUFFIX, max_tokens=16, temperature=0)
    assert (
        mp2.completions.create(**infill).choices[0].text
        == client.completions.create(**infill).choices[0].text
    )
    chat = dict(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=16, temperature=0)
    assert (
        mp2.chat.completions.create(**chat).choices[0].message.content
        == client.chat.completions.create(**chat).choices[0].message.content
    )


def test_sigterm_finishes_running_requests_then_exits_0(main, http):
    with http.stream(
        "POST", "/v1/completions", json={"prompt": "x", "max_tokens": 40, "temperature": 0, "stream": True}
    ) as response:
        lines = response.iter_lines()
        next(lines)
        os.kill(main.proc.pid, signal.SIGTERM)
        events = [json.loads(line[6:]) if line != "data: [DONE]" else "[DONE]" for line in lines if line]
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
    assert main.proc.wait(30) == 0
    with pytest.raises(httpx.TransportError):
        http.get("/health")


def test_a_dead_model_parallel_rank_fails_requests_and_the_server_exits(servers):
    mp2 = servers["mp2"]
    workers = subprocess.run(
        ["pgrep", "-P", str(mp2.proc.pid)], capture_output=True, text=True
    ).stdout.split()
    ranks = {}
    for pid in workers:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        ranks[next(int(v[5:]) for v in environ if v.startswith(b"RANK="))] = int(pid)
    with httpx.stream(
        "POST", mp2.url + "/v1/completions", json={**LONG, "stream": True}, timeout=30
    ) as response:
        lines = (line for line in response.iter_lines() if line)
        next(lines)
        os.kill(ranks[1], signal.SIGKILL)
        last = json.loads(list(lines)[-1][len("data: ") :])
    assert last["error"]["code"] == "engine_unavailable"
    mp2.proc.wait(60)  # every process of the server exits instead of hanging
