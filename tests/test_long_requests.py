"""A long prompt joining running streams is prefilled in chunks between their decode steps."""

import pytest

from llama import Llama
from tests.test_engine import alone

CHUNK = 64
LONG = 1000


@pytest.fixture(scope="module")
def long_llama(checkpoint_dir, tokenizer_path):
    """The tiny checkpoint with room for a prompt of LONG tokens next to three short streams."""
    return Llama.build(
        str(checkpoint_dir), str(tokenizer_path), max_seq_len=1100, max_batch_size=4, dtype="float32"
    )


def test_a_long_prompt_delays_running_streams_by_one_chunk_per_step(long_llama):
    engine = long_llama.engine
    engine.prefill_chunk, engine.prefix_reuse = CHUNK, False
    vocab = long_llama.model.params.vocab_size
    shorts = [[1] + [(7 * i + 3 * s) % (vocab - 3) + 3 for i in range(10 + s)] for s in range(3)]
    long_prompt = [1] + [(13 * i) % (vocab - 3) + 3 for i in range(LONG - 1)]
    expected = [alone(engine, p, 40) for p in shorts]

    plans = []
    schedule = engine.scheduler.schedule

    def recorded():
        step = schedule()
        plans.append(step.plan)
        return step

    engine.scheduler.schedule = recorded
    try:
        streams = [engine.submit(p, max_tokens=40, default_stop=None) for p in shorts]
        while not all(s.prefilled for s in streams):
            engine.step()
        joined = len(plans)
        long_request = engine.submit(long_prompt, max_tokens=2, default_stop=None)
        while not all(s.finished for s in streams) or not long_request.finished:
            engine.step()
    finally:
        engine.scheduler.schedule = schedule
    prefill_steps = [plan for plan in plans[joined:] if plan is not None and plan.prefill]
    # The long prompt is cut into chunks of at most CHUNK tokens, one per step...
    assert len(prefill_steps) == -(-LONG // CHUNK)
    for plan in prefill_steps:
        assert sum(len(chunk) for _, _, chunk in plan.prefill) <= CHUNK
        # ...and every step that prefills one also decodes a token for each running stream.
        assert len(plan.decode) == 3
    # The streams' tokens are those of each running alone.
    assert [s.result().token_ids for s in streams] == expected
    assert len(long_request.result().token_ids) == 2
