"""The engine loop: requests joining a running batch, cancellation, chunked prefill, prefix reuse,
streamed text and stop strings, seeds, asyncio, and model parallelism.

Most tests run in fp32, where a request's tokens must not change with what else is running: the
oracle is the same request run alone.
"""

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest
import torch

from llama import Llama, kernels
from llama.engine import Engine
from llama.prompts import infilling_prompt_tokens, instruct_prompt_tokens
from llama.sampling import SamplingParams
from tests.test_generation import chain_next, write_chain_checkpoint
from tests.tiny import make_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[1]
BOS = 1
CODE = [
    "def fib(n):",
    "import os\nimport sys\n\n\nclass Config:\n    def __init__(self):",
    "x = [1, 2, 3]\nfor",
    "# sort a list\ndef sort(items):",
    "class Node:",
    "while True:",
    "return json.loads(text)",
    "from typing import List",
]


def prompts(sp, texts=CODE) -> List[List[int]]:
    return [[BOS] + sp.encode(t) for t in texts]


def alone(engine: Engine, prompt: List[int], max_tokens: int = 12, **kwargs) -> List[int]:
    """The oracle: the request run by itself, without a cached prefix."""
    reuse, engine.prefix_reuse = engine.prefix_reuse, False
    try:
        return engine.submit(prompt, max_tokens=max_tokens, default_stop=None, **kwargs).result().token_ids
    finally:
        engine.prefix_reuse = reuse
        engine.forget_prefixes()


def common_prefix(a: List[int], b: List[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_requests_admitted_mid_decoding_equal_alone(engine, sp):
    ps = prompts(sp)
    expected = [alone(engine, p) for p in ps[:6]]
    first = [engine.submit(p, max_tokens=12, default_stop=None) for p in ps[:2]]
    for _ in range(3):
        engine.step()
    assert all(len(r.generated) == 3 for r in first)  # decoding when the others arrive
    later = [engine.submit(p, max_tokens=12, default_stop=None) for p in ps[2:6]]  # 2 must wait
    for _ in range(5):
        engine.step()
    assert engine.stats()["waiting"] == 2
    got = [r.result().token_ids for r in first + later]
    assert got == expected
    stats = engine.stats()
    assert (stats["running"], stats["waiting"], stats["free_slots"], stats["max_batch_size"]) == (0, 0, 4, 4)


def test_cancel_frees_the_slot_within_one_step_and_others_continue(engine, sp):
    ps = prompts(sp)
    expected = alone(engine, ps[1], 20)
    keep = engine.submit(ps[1], max_tokens=20, default_stop=None)
    drop = engine.submit(ps[0], max_tokens=20, default_stop=None)
    for _ in range(4):
        engine.step()
    drop.cancel()
    engine.step()
    assert drop.finished and engine.stats()["running"] == 1
    events = list(drop)
    assert events[-1].finish_reason == "cancelled"
    assert events[-1].usage.completion_tokens == 4
    assert keep.result().token_ids == expected
    # A request cancelled while waiting never runs.
    waiting = engine.submit(ps[2], max_tokens=5)
    waiting.cancel()
    assert waiting.result().finish_reason == "cancelled" and waiting.result().token_ids == []


def test_long_prompt_is_prefilled_in_chunks_while_others_stream(engine, sp):
    engine.prefill_chunk = 8
    engine.prefix_reuse = False  # every chunk computed
    ps = prompts(sp)
    long_prompt = ps[1] + ps[3][1:] + ps[0][1:]
    assert len(long_prompt) > 5 * 8
    expected_long = alone(engine, long_prompt, 6)
    expected_short = alone(engine, ps[0], 30)
    short = engine.submit(ps[0], max_tokens=30, default_stop=None)
    engine.step()  # prefilled, first token sampled
    late = engine.submit(long_prompt, max_tokens=6, default_stop=None)
    steps_to_prefill = -(-len(long_prompt) // 8)
    for step in range(steps_to_prefill):
        before = len(short.generated)
        engine.step()
        assert len(short.generated) == before + 1  # the stream never stalls
        assert late.computed == min(len(long_prompt), 8 * (step + 1))
    assert len(late.generated) == 1  # its first token came with its last chunk
    assert late.result().token_ids == expected_long
    assert short.result().token_ids == expected_short


def editor_requests(tokenizer, kind: str) -> List[List[int]]:
    """An editor's pattern: the same file with a few characters changed before the cursor."""
    source = "import os\n\ndef read(path):\n    with open(path) as f:\n        return f.read()\n"
    edits = [source[:40], source[:41], source[:43], source[:40] + "x"]
    if kind == "chat":
        return [instruct_prompt_tokens(tokenizer, [{"role": "user", "content": e}]) for e in edits]
    spm = kind == "spm"
    return [infilling_prompt_tokens(tokenizer, e, source[45:], suffix_first=spm) for e in edits]


@pytest.mark.parametrize("kind", ["psm", "spm", "chat"])
def test_prefix_reuse_gives_the_tokens_of_a_cold_run(engine, llama, kind):
    requests = editor_requests(llama.tokenizer, kind)
    cold = [alone(engine, p, 8) for p in requests]
    warm = []
    for i, p in enumerate(requests):
        done = engine.submit(p, max_tokens=8, default_stop=None).result()
        warm.append(done.token_ids)
        # Every earlier request (prompt and fed tokens) still sits in a free slot: the longest
        # shared prefix is reused, all but the last prompt token at most.
        seen = [q + c[:-1] for q, c in zip(requests[:i], cold[:i])]
        expected = max([common_prefix(q, p) for q in seen], default=0)
        assert done.usage.cached_tokens == min(expected, len(p) - 1)
    assert warm == cold


def test_spm_prompts_reuse_the_suffix_psm_prompts_do_not(engine, llama):
    """Typing changes the prefix's end: PSM prompts share only the prefix up to the edit, SPM
    prompts (suffix first) also share the whole suffix before it."""
    cached = {}
    for kind in ("psm", "spm"):
        engine.forget_prefixes()
        done = [engine.submit(p, max_tokens=2).result() for p in editor_requests(llama.tokenizer, kind)]
        cached[kind] = sum(d.usage.cached_tokens for d in done[1:])
    assert cached["spm"] > cached["psm"] > 0


def test_usage_counts_cached_prompt_tokens(engine, sp):
    prompt = prompts(sp)[1]
    first = engine.submit(prompt, max_tokens=3, default_stop=None).result()
    second = engine.submit(prompt, max_tokens=3, default_stop=None).result()
    assert first.token_ids == second.token_ids
    assert second.usage.prompt_tokens == len(prompt)
    assert second.usage.cached_tokens == len(prompt) - 1  # the last token is always computed
    assert second.usage.completion_tokens == 3 and second.finish_reason == "length"


def test_streamed_text_is_the_tokens_decoded_in_context(engine, llama, sp):
    for prompt in prompts(sp)[:4]:
        request = engine.submit(prompt, max_tokens=24, default_stop=None)
        events = list(request)
        ids = [t for e in events for t in e.token_ids]
        assert "".join(e.text for e in events) == llama.tokenizer.decode_infilling(ids)
        assert events[-1].finish_reason == "length" and events[-1].usage.completion_tokens == 24


def test_stop_strings_split_across_tokens(engine, llama, sp):
    prompt = prompts(sp)[0]
    full = engine.submit(prompt, max_tokens=30, default_stop=None).result()
    pieces = [llama.tokenizer.decode_infilling([t]) for t in full.token_ids]
    text = full.text
    # Stop strings that span 2 and 3 tokens' text, and one whose prefix first appears where
    # the string does not complete.
    boundaries = [sum(len(p) for p in pieces[:i]) for i in range(1, len(pieces))]
    spans = []
    for b in boundaries[2:]:
        stop = text[b - 2 : b + 2]
        if len(stop) == 4 and text.find(stop) == b - 2:
            spans.append(stop)
        if len(spans) == 3:
            break
    assert spans, "the generated text has no stop string candidates"
    for stop in spans:
        got = engine.submit(prompt, max_tokens=30, stop=[stop], default_stop=None).result()
        assert got.finish_reason == "stop"
        assert got.text == text[: text.find(stop)]
        with_stop = engine.submit(prompt, max_tokens=30, stop=[stop], include_stop_str=True).result()
        assert with_stop.text == text[: text.find(stop) + len(stop)]
    never = engine.submit(prompt, max_tokens=30, stop=[text[-3:] + "\x00"], default_stop=None).result()
    assert never.text == text and never.finish_reason == "length"  # a partial match is released


def test_stop_token_ids_and_default_stops(engine, sp):
    prompt = prompts(sp)[0]
    full = engine.submit(prompt, max_tokens=10, default_stop=None).result().token_ids
    stopped = engine.submit(prompt, max_tokens=10, stop_token_ids=[full[4]], default_stop=None).result()
    assert stopped.token_ids == full[: full.index(full[4])]
    assert stopped.finish_reason == "stop"
    assert stopped.usage.completion_tokens == len(stopped.token_ids) + 1  # the stop token was sampled


def test_utf8_character_split_over_byte_tokens_streams_whole(tmp_path, tokenizer_path, sp):
    """A model that answers "é→" as five byte-fallback tokens: no delta holds a broken character."""
    text = "é→"
    byte_ids = [sp.piece_to_id(f"<0x{b:02X}>") for b in text.encode("utf-8")]
    start = 300
    follow = dict(zip([start] + byte_ids, byte_ids + [2]))

    def next_of(token: int) -> int:
        return follow.get(token, chain_next(token))

    ckpt = write_chain_checkpoint(tmp_path, sp.vocab_size(), next_of)
    model = Llama.build(str(ckpt), str(tokenizer_path), max_seq_len=32, max_batch_size=1, dtype="float32")
    events = list(model.engine.submit([BOS, start], max_tokens=10))
    assert [t for e in events for t in e.token_ids] == byte_ids
    deltas = [e.text for e in events]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    assert [d for d in deltas if d] == ["é", "→"]
    assert events[-1].finish_reason == "stop"


def test_same_seed_same_tokens_alone_and_in_a_busy_batch(engine, sp):
    ps = prompts(sp)
    seeded = SamplingParams(temperature=1.0, top_p=0.95, seed=1234)
    solo = engine.submit(ps[0], max_tokens=16, sampling=seeded, default_stop=None).result().token_ids
    others = [
        engine.submit(p, max_tokens=16, sampling=SamplingParams(temperature=0.8), default_stop=None)
        for p in ps[1:3]
    ]
    engine.step()
    busy = engine.submit(ps[0], max_tokens=16, sampling=seeded, default_stop=None)
    assert busy.result().token_ids == solo
    for r in others:
        r.result()
    greedy = engine.submit(ps[0], max_tokens=16, default_stop=None).result().token_ids
    assert solo != greedy  # it really sampled


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sampling=SamplingParams(temperature=-1.0)), "temperature"),
        (dict(sampling=SamplingParams(top_p=0.0)), "top_p"),
        (dict(stop=["a", "b", "c", "d", "e"]), "stop"),
        (dict(stop=[""]), "stop"),
        (dict(max_tokens=1000), "context"),
        (dict(max_tokens=-1), "max_tokens"),
        (dict(logprobs=6), "logprobs"),
        (dict(stop_token_ids=[10**6]), "stop_token_ids"),
    ],
)
def test_bad_parameters_fail_that_request_only(engine, sp, kwargs, match):
    ps = prompts(sp)
    expected = alone(engine, ps[0], 10)
    running = engine.submit(ps[0], max_tokens=10, default_stop=None)
    engine.step()
    kwargs = {"max_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        engine.submit(ps[1], **kwargs)
    assert running.result().token_ids == expected


def test_logprobs_and_top_alternatives(engine, llama, sp):
    prompt = prompts(sp)[0]
    done = engine.submit(prompt, max_tokens=5, logprobs=3, default_stop=None).result()
    logits = llama.model.forward_packed([torch.tensor(prompt + done.token_ids)])  # recomputed
    expected = torch.log_softmax(logits, dim=-1)[len(prompt) - 1 : -1]
    for i, token in enumerate(done.token_ids):
        assert done.logprobs[i] == pytest.approx(expected[i, token].item(), abs=1e-4)
        top = expected[i].topk(3)
        assert list(done.top_logprobs[i]) == top.indices.tolist()  # greedy: the chosen one first
        assert list(done.top_logprobs[i].values()) == pytest.approx(top.values.tolist(), abs=1e-4)


def test_asyncio_consumers_with_the_engine_thread(engine, sp):
    ps = prompts(sp)[:3]
    expected = [alone(engine, p, 10) for p in ps]

    async def consume(prompt):
        tokens, text = [], ""
        async for event in engine.submit(prompt, max_tokens=10, default_stop=None):
            tokens += event.token_ids
            text += event.text
        return tokens

    async def main():
        return await asyncio.wait_for(asyncio.gather(*(consume(p) for p in ps)), timeout=60)

    engine.start()
    try:
        got = asyncio.run(main())
    finally:
        engine.shutdown()
    assert list(got) == expected
    assert not engine.thread_running


@torch.inference_mode()
@pytest.mark.parametrize("use_kernels", [True, False])
def test_bf16_greedy_tokens_do_not_depend_on_the_batch(tmp_path_factory, tokenizer_path, sp, use_kernels):
    """bf16, 64-wide heads (what the attention kernels take): batch 1, 2, 4 and 8 agree."""
    ckpt = make_checkpoint(tmp_path_factory.mktemp("bf16"), sp.vocab_size(), dim=128, n_heads=2, n_kv_heads=1)
    previous = kernels.enabled()
    kernels.set_enabled(use_kernels)
    try:
        model = Llama.build(
            str(ckpt), str(tokenizer_path), max_seq_len=96, max_batch_size=8, dtype="bfloat16"
        )
        ps = prompts(sp)
        solo = [model.generate([p], 10, temperature=0, stop_token=-1)[0][0] for p in ps]
        for size in (2, 4, 8):
            for first in range(0, 8, size):
                batch, _ = model.generate(ps[first : first + size], 10, temperature=0, stop_token=-1)
                assert batch == solo[first : first + size], f"batch of {size}"
    finally:
        kernels.set_enabled(previous)


MP_SCRIPT = """
import json, sys
import torch
import torch.distributed as dist
torch.set_num_threads(1)
from llama import Llama

ckpt_dir, tokenizer_path, out_path = sys.argv[1:4]
llama = Llama.build(ckpt_dir, tokenizer_path, max_seq_len=64, max_batch_size=3, dtype="float32")
engine = llama.engine
if dist.get_rank() == 0:
    prompts = json.loads(sys.argv[4])
    first = engine.submit(prompts[0], max_tokens=10, default_stop=None)
    engine.step(); engine.step()
    second = engine.submit(prompts[1], max_tokens=10, default_stop=None)
    engine.step()
    third = engine.submit(prompts[2], max_tokens=10, default_stop=None)
    engine.step()
    second.cancel()
    results = [r.result().token_ids for r in (first, third)]
    engine.shutdown()
    json.dump(results, open(out_path, "w"))
else:
    engine.follow()
"""


def test_mp2_interleaved_requests_equal_mp1(tmp_path, tokenizer_path, sp):
    ps = prompts(sp)[:3]
    mp1 = make_checkpoint(tmp_path / "mp1", sp.vocab_size(), mp=1, seed=5)
    mp2 = make_checkpoint(tmp_path / "mp2", sp.vocab_size(), mp=2, seed=5)
    single = Llama.build(str(mp1), str(tokenizer_path), max_seq_len=64, max_batch_size=3, dtype="float32")
    expected = [alone(single.engine, p, 10) for p in (ps[0], ps[2])]
    script = tmp_path / "mp.py"
    script.write_text(MP_SCRIPT)
    out = tmp_path / "out.json"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(script),
    ]
    cmd += [str(mp2), str(tokenizer_path), str(out), json.dumps(ps)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(out.read_text()) == expected


def test_a_failing_step_fails_its_requests_and_the_engine_serves_the_next(engine, sp, monkeypatch):
    ps = prompts(sp)
    expected = alone(engine, ps[0], 5)
    real = engine.model.forward_segments

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(engine.model, "forward_segments", broken)
    engine.start()
    try:
        failed = engine.submit(ps[0], max_tokens=5)
        with pytest.raises(RuntimeError, match="simulated"):
            failed.result()
        monkeypatch.setattr(engine.model, "forward_segments", real)
        assert engine.submit(ps[0], max_tokens=5, default_stop=None).result().token_ids == expected
    finally:
        engine.shutdown()


def counting_prefill(engine: Engine, monkeypatch) -> List[int]:
    """Make `engine`'s model count the prompt tokens its prefill passes compute (the list's sum)."""
    counted: List[int] = []
    original = engine.model.forward_segments

    def forward_segments(tokens, segments, **kwargs):
        counted.append(int(tokens.numel()))
        return original(tokens, segments, **kwargs)

    monkeypatch.setattr(engine.model, "forward_segments", forward_segments)
    return counted


def test_requests_sharing_a_prompt_prefill_it_once(engine, sp, monkeypatch):
    """Three requests with one prompt submitted together (a request's n choices): the first
    prefills it, the others wait for it, then copy its keys and values (all but the last prompt
    token) from its slot; each gets the tokens it gets alone."""
    prompt = prompts(sp)[1] + prompts(sp)[3][1:]
    assert len(prompt) > 16 + 1
    expected = alone(engine, prompt, 6)
    engine.forget_prefixes()
    counted = counting_prefill(engine, monkeypatch)
    requests = [engine.submit(prompt, max_tokens=6, default_stop=None) for _ in range(3)]
    done = [r.result() for r in requests]
    assert [d.token_ids for d in done] == [expected] * 3
    assert [d.usage.cached_tokens for d in done] == [0, len(prompt) - 1, len(prompt) - 1]
    assert sum(counted) == len(prompt) + 2  # once, and the last token of each copy


def test_a_running_request_lends_its_prefix_and_others_go_first_meanwhile(engine, sp, monkeypatch):
    """A request sharing 20+ ids with one that is decoding copies them from its slot; a request
    sharing a prefix still being prefilled waits, while an unrelated one behind it is admitted."""
    engine.prefill_chunk = 8
    ps = prompts(sp)
    long_prompt = ps[1] + ps[3][1:] + ps[0][1:]
    sharing = long_prompt[:20] + ps[2][1:]
    expected = {tuple(p): alone(engine, p, 6) for p in (long_prompt, sharing, ps[4])}
    engine.forget_prefixes()
    first = engine.submit(long_prompt, max_tokens=6, default_stop=None)
    engine.step()  # 8 of its ids computed
    waiting = engine.submit(sharing, max_tokens=6, default_stop=None)
    other = engine.submit(ps[4], max_tokens=6, default_stop=None)
    engine.step()
    assert waiting.slot is None and other.slot is not None  # waits for the 20 shared ids; the other goes
    for request, prompt in ((first, long_prompt), (waiting, sharing), (other, ps[4])):
        assert request.result().token_ids == expected[tuple(prompt)]
    shared = common_prefix(sharing, long_prompt)
    assert shared >= 20 and waiting.result().usage.cached_tokens == shared
