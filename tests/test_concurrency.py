"""One `Llama` shared by threads: calls made at the same time give what each gives alone (they
share one KV cache, so they must not run interleaved)."""

import sys
import threading

import pytest
import torch

from llama import Llama

PROMPTS = ["def fibonacci(n):", "import os\nfor name in os.listdir("]
ROUNDS = 3


@pytest.fixture(scope="module")
def generator(checkpoint_dir, tokenizer_path):
    return Llama.build(
        str(checkpoint_dir), str(tokenizer_path), max_seq_len=64, max_batch_size=2, dtype="float32"
    )


def complete(generator: Llama, prompt: str) -> dict:
    return generator.text_completion([prompt], temperature=0.0, max_gen_len=24, logprobs=True)[0]


def test_two_threads_get_their_solo_results(generator):
    alone = [complete(generator, prompt) for prompt in PROMPTS]
    assert alone[0]["tokens"] != alone[1]["tokens"]  # else a mix-up would go unnoticed

    results = {}
    errors = []
    barrier = threading.Barrier(len(PROMPTS))

    def worker(index: int, round_: int) -> None:
        try:
            barrier.wait()
            results[round_, index] = complete(generator, PROMPTS[index])
        except BaseException as err:  # surfaced in the main thread below
            errors.append(err)

    threads_before, interval = torch.get_num_threads(), sys.getswitchinterval()
    torch.set_num_threads(1)
    sys.setswitchinterval(1e-5)  # switch threads often, so unserialized calls would interleave
    try:
        for round_ in range(ROUNDS):
            threads = [threading.Thread(target=worker, args=(i, round_)) for i in range(len(PROMPTS))]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
    finally:
        sys.setswitchinterval(interval)
        torch.set_num_threads(threads_before)

    assert not errors, errors
    for round_ in range(ROUNDS):
        for index in range(len(PROMPTS)):
            got = results[round_, index]
            assert got["tokens"] == alone[index]["tokens"], f"round {round_}, prompt {index}"
            assert got["logprobs"] == pytest.approx(alone[index]["logprobs"], abs=1e-5)
