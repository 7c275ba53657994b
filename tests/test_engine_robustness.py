"""One request never harms another: hostile sampling values, a row whose sampling fails,
consumers that vanish (an abandoned async iteration, a closed event loop), and model-parallel
calls that rank 0 refuses or fails.

The oracle is each request run alone: with the hostile one beside it, a request must finish
with exactly its solo tokens.
"""

import asyncio
import gc
import threading
import time

import pytest

from llama import limits
from llama.engine import Event
from llama.engine.stream import EventStream
from llama.sampling import SamplingParams
from tests.test_engine import alone, prompts

HOSTILE = [
    SamplingParams(temperature=1e-39, seed=3),
    SamplingParams(temperature=5e-324),
    SamplingParams(temperature=0.8, top_p=5e-324, seed=4),
    SamplingParams(temperature=0.8, top_k=limits.MAX_TOP_K, seed=5),
    SamplingParams(temperature=limits.MAX_TEMPERATURE, seed=6),
    SamplingParams(
        temperature=0.8, repetition_penalty=limits.MIN_REPETITION_PENALTY, frequency_penalty=2.0, seed=7
    ),
    SamplingParams(temperature=0.8, logit_bias={i: -limits.MAX_LOGIT_BIAS for i in range(30)}, seed=8),
]


def wait_until(condition, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_edge_sampling_values_beside_plain_requests_leave_their_tokens_alone(engine, sp):
    """Two threads, as in the report: one samples, one sends a denormal temperature 50 ms later;
    then every edge value at once beside a greedy and a seeded request."""
    ps = prompts(sp)
    seeded = SamplingParams(temperature=0.8, seed=11)
    expected_greedy = alone(engine, ps[0], 12)
    expected_seeded = alone(engine, ps[1], 12, sampling=seeded)
    expected_tiny = alone(engine, ps[2], 12)  # a denormal temperature is greedy
    results = {}

    def run(name, prompt, sampling, delay):
        time.sleep(delay)
        request = engine.submit(prompt, max_tokens=12, sampling=sampling, default_stop=None)
        results[name] = request.result().token_ids

    engine.start()
    try:
        threads = [
            threading.Thread(target=run, args=("seeded", ps[1], seeded, 0.0)),
            threading.Thread(target=run, args=("tiny", ps[2], SamplingParams(temperature=1e-39), 0.05)),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert results == {"seeded": expected_seeded, "tiny": expected_tiny}

        plain = [
            engine.submit(ps[0], max_tokens=12, default_stop=None),
            engine.submit(ps[1], max_tokens=12, sampling=seeded, default_stop=None),
        ]
        hostile = [engine.submit(ps[3], max_tokens=8, sampling=s, default_stop=None) for s in HOSTILE]
        assert [r.result().token_ids for r in plain] == [expected_greedy, expected_seeded]
        for request in hostile:
            assert request.result().finish_reason == "length"
    finally:
        engine.shutdown()


def test_a_row_whose_sampling_raises_is_failed_alone(engine, sp, monkeypatch):
    ps = prompts(sp)
    expected = [alone(engine, p, 10) for p in ps[:2]]
    seeded = SamplingParams(temperature=0.9, seed=1)
    expected_seeded = alone(engine, ps[2], 10, sampling=seeded)
    good = engine.submit(ps[0], max_tokens=10, default_stop=None)
    bad = engine.submit(ps[3], max_tokens=10, sampling=SamplingParams(temperature=0.7, seed=2))
    other = engine.submit(ps[1], max_tokens=10, default_stop=None)
    sampled = engine.submit(ps[2], max_tokens=10, sampling=seeded, default_stop=None)

    def broken(logits):
        raise RuntimeError("probability tensor contains either inf, nan or element < 0 (simulated)")

    monkeypatch.setattr(bad.sampler, "apply_penalties", broken)
    monkeypatch.setattr(type(bad.sampling), "has_penalties", property(lambda self: self.seed == 2))
    with pytest.raises(RuntimeError, match="simulated"):
        bad.result()
    assert [good.result().token_ids, other.result().token_ids] == expected
    assert sampled.result().token_ids == expected_seeded
    assert engine.stats()["free_slots"] == engine.stats()["max_batch_size"]


def test_an_abandoned_async_iteration_frees_its_slot(engine, sp):
    ps = prompts(sp)
    expected = alone(engine, ps[1], 6)

    async def read_two_events():
        request = engine.submit(ps[0], max_tokens=100, default_stop=None)
        count = 0
        async for _ in request:
            count += 1
            if count == 2:
                break  # the consumer goes away; nothing else refers to the iteration
        return request

    engine.start()
    try:
        abandoned = asyncio.run(read_two_events())
        gc.collect()
        wait_until(lambda: abandoned.finished)
        completion = abandoned.result()
        assert completion.finish_reason == "cancelled"
        assert len(completion.token_ids) < 100
        assert engine.stats()["free_slots"] == engine.stats()["max_batch_size"]
        assert engine.submit(ps[1], max_tokens=6, default_stop=None).result().token_ids == expected
    finally:
        engine.shutdown()


def test_a_task_cancelled_while_waiting_cancels_its_request(engine, sp):
    ps = prompts(sp)

    async def main():
        request = engine.submit(ps[0], max_tokens=100, default_stop=None)
        started = asyncio.Event()

        async def consume():
            async for _ in request:
                started.set()

        task = asyncio.ensure_future(consume())
        # Cancel as soon as the first tokens arrived: a fixed sleep lets a fast CPU finish all 100.
        await asyncio.wait_for(started.wait(), timeout=60)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return request

    engine.start()
    try:
        request = asyncio.run(main())
        wait_until(lambda: request.finished)
        assert request.result().finish_reason == "cancelled"
    finally:
        engine.shutdown()


def test_a_closed_event_loop_is_never_an_error_in_the_stepping_thread():
    stream = EventStream(advance=lambda: None, engine_thread_running=lambda: True, cancel=lambda: None)
    loop = asyncio.new_event_loop()
    arrived = asyncio.Event()
    stream._wakers.append((loop, arrived))
    loop.close()
    stream.publish(Event("a", [1]))  # raised RuntimeError('Event loop is closed') before
    stream.fail(RuntimeError("later"))
    assert stream._wakers == [] and stream.done


def test_requests_waiting_behind_a_closed_loop_still_run(engine, sp):
    """A consumer whose loop closed while its request ran: the later requests are served."""
    ps = prompts(sp)
    expected = [alone(engine, p, 5) for p in ps[1:3]]
    loop = asyncio.new_event_loop()

    async def start_reading(request):
        iterator = request.__aiter__()
        await asyncio.wait_for(iterator.__anext__(), timeout=60)
        return iterator

    engine.start()
    try:
        first = engine.submit(ps[0], max_tokens=40, default_stop=None)
        iterator = loop.run_until_complete(start_reading(first))
        loop.close()  # the iteration is still registered with the closed loop
        later = [engine.submit(p, max_tokens=5, default_stop=None) for p in ps[1:3]]
        assert [r.result().token_ids for r in later] == expected
        assert first.result().finish_reason == "length"
        del iterator
    finally:
        engine.shutdown()
