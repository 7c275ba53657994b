"""One rank of the quantized model-parallel test: run under `torchrun --nproc_per_node 2`.

Usage: quantized_worker.py JOB.json. Loads each quantized checkpoint of the job with torch's
weight-only kernels off and on, generates greedily and saves the tokens and logits of every run
to `quantized_rank{N}.pt`.
"""

import json
import os
import sys

import torch
import torch.distributed


def main(job_path: str) -> None:
    torch.set_num_threads(1)
    with open(job_path) as f:
        job = json.load(f)
    rank = int(os.environ["RANK"])
    from llama import Llama, kernels

    result = {}
    for name, ckpt_dir in job["ckpt_dirs"].items():
        for torch_ops in (False, True):
            kernels.set_enabled(torch_ops)
            generator = Llama.build(
                ckpt_dir, job["tokenizer"], max_seq_len=64, max_batch_size=3, dtype="float32"
            )
            with torch.inference_mode():
                logits = generator.model(torch.tensor(job["forward_tokens"]), 0)
            tokens, _ = generator.generate(job["prompts"], max_gen_len=12, temperature=0.0)
            result[(name, torch_ops)] = {"logits": logits, "tokens": tokens}
    torch.save(result, os.path.join(job["out_dir"], f"quantized_rank{rank}.pt"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
