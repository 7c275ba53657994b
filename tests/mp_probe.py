"""Run under torchrun: build each given checkpoint on a model-parallel group of the given size and
save the layout-independent outputs (tests.layouts.probe) from rank 0.

    torchrun --nproc_per_node 4 tests/mp_probe.py TOKENIZER OUT.pt MP:NAME=CKPT_DIR ...

Items are run in order; the model-parallel groups are rebuilt whenever MP changes, so one launch
covers several group sizes.
"""

import sys
from pathlib import Path

import fairscale.nn.model_parallel.initialize as fs_init
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama import Llama  # noqa: E402
from tests.layouts import probe  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    tokenizer, out, *items = sys.argv[1:]
    results = {}
    for item in items:
        size, rest = item.split(":", 1)
        name, ckpt_dir = rest.split("=", 1)
        if fs_init.model_parallel_is_initialized() and fs_init.get_model_parallel_world_size() != int(size):
            fs_init.destroy_model_parallel()
        try:
            generator = Llama.build(
                ckpt_dir, tokenizer, 32, 2, model_parallel_size=int(size), dtype="float32"
            )
        except ValueError as err:  # recorded for the test to check the message
            results[f"{name} (MP={size})"] = {"error": str(err)}
            continue
        results[f"{name} (MP={size})"] = probe(generator)
    if torch.distributed.get_rank() == 0:
        torch.save(results, out)
    # Leave together: a rank exiting while gloo still talks to it aborts the others.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
