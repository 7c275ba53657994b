"""One rank of the model-parallel test: run under `torchrun --nproc_per_node 2`.

Usage: parallel_worker.py JOB.json. The job names the checkpoints, the tokenizer, the prompts
and an output folder; each rank saves what it computed to `rank{N}.pt` there, for the test to
compare with a single-process run.
"""

import json
import os
import sys
import time

import torch
import torch._dynamo
import torch.distributed


def main(job_path: str) -> None:
    torch.set_num_threads(1)
    with open(job_path) as f:
        job = json.load(f)
    rank = int(os.environ["RANK"])
    result = {"errors": {}}

    from llama import Llama

    # Checkpoints whose heads cannot be split over two ranks must be refused with the reason.
    for name, ckpt_dir in job["indivisible"].items():
        try:
            Llama.build(ckpt_dir, job["tokenizer"], max_seq_len=32, max_batch_size=1, dtype="float32")
        except ValueError as err:
            result["errors"][name] = str(err)

    generator = Llama.build(
        job["ckpt_dir"], job["tokenizer"], max_seq_len=64, max_batch_size=3, dtype="float32", seed=7
    )
    print(f"stdout of rank {rank}", flush=True)
    result["shapes"] = {k: tuple(v.shape) for k, v in generator.model.state_dict().items()}

    with torch.inference_mode():
        tokens = torch.tensor(job["forward_tokens"])
        result["forward_logits"] = generator.model(tokens, 0)
    result["greedy"] = generator.generate(job["prompts"], max_gen_len=12, temperature=0.0, logprobs=True)
    result["completion"] = generator.text_completion(job["texts"], temperature=0.0, max_gen_len=8)
    result["sampled"] = generator.generate(job["prompts"], max_gen_len=12, temperature=1.0, top_p=0.95)[0]
    result["failures"] = failures(generator, job["prompts"], rank)
    result["after_failures"] = generator.generate(job["prompts"], max_gen_len=12, temperature=0.0)[0]

    # Speculation under model parallelism: a draft model split over the same ranks, and lookup.
    from llama.speculation import Speculation

    drafted = Llama.build(
        job["ckpt_dir"], job["tokenizer"], max_seq_len=64, max_batch_size=3, dtype="float32",
        draft_ckpt_dir=job["ckpt_dir"],
    )  # fmt: skip
    result["draft_greedy"] = drafted.generate(
        job["prompts"], max_gen_len=12, temperature=0.0, speculation=Speculation("draft", num_tokens=3)
    )[0]
    result["draft_stats"] = drafted.engine.stats()
    result["lookup_greedy"] = drafted.generate(
        job["prompts"], max_gen_len=12, temperature=0.0, speculation=Speculation("lookup", num_tokens=3)
    )[0]

    # A paged cache of one block for three rows: the requests run one at a time, each rank keeping
    # the same block table from the plans rank 0 sends.
    paged = Llama.build(
        job["ckpt_dir"],
        job["tokenizer"],
        max_seq_len=64,
        max_batch_size=3,
        dtype="float32",
        kv_cache_tokens=1,
    )
    result["paged_greedy"] = paged.generate(job["prompts"], max_gen_len=12, temperature=0.0)[0]
    result["paged_free_blocks"] = paged.model.kv_blocks.free_blocks + sum(
        paged.model.kv_blocks.held(row) for row in range(3)
    )

    # compile=True compiles the decode step on every rank, not only on rank 0.
    compiled = Llama.build(
        job["ckpt_dir"], job["tokenizer"], max_seq_len=64, max_batch_size=3, dtype="float32", compile=True
    )
    torch._dynamo.utils.counters.clear()
    result["compiled_greedy"] = compiled.generate(job["prompts"], max_gen_len=6, temperature=0.0)[0]
    result["compiled_graphs"] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    torch.save(result, os.path.join(job["out_dir"], f"rank{rank}.pt"))
    # Leave together: a rank that exits while its peer still talks to it aborts the peer.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def failures(generator, prompts, rank: int) -> dict:
    """What each rank raised, and how long it took, when rank 0 refuses or fails a batch call."""
    import llama.engine.core

    seen = {}
    started = time.monotonic()
    try:
        generator.generate(prompts, max_gen_len=4, temperature=0.7, top_p=0.0)
    except Exception as err:
        seen["refused"] = (type(err).__name__, str(err), time.monotonic() - started)

    real = llama.engine.core.sample_rows

    def broken(*args, **kwargs):
        raise RuntimeError("sampling failed on rank 0 (simulated)")

    if rank == 0:  # only rank 0 samples: the other ranks must hear of its failure
        llama.engine.core.sample_rows = broken
    started = time.monotonic()
    try:
        generator.generate(prompts, max_gen_len=4, temperature=0.7)
    except Exception as err:
        seen["failed"] = (type(err).__name__, str(err), time.monotonic() - started)
    finally:
        llama.engine.core.sample_rows = real
    return seen


if __name__ == "__main__":
    main(sys.argv[1])
