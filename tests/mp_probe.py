"""Run under torchrun: build each given checkpoint on the model-parallel group and save the
layout-independent outputs (tests.layouts.probe) from rank 0.

    torchrun --nproc_per_node M tests/mp_probe.py TOKENIZER OUT.pt NAME=CKPT_DIR ...
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama import Llama  # noqa: E402
from tests.layouts import probe  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    tokenizer, out, *named_dirs = sys.argv[1:]
    results = {}
    for item in named_dirs:
        name, ckpt_dir = item.split("=", 1)
        generator = Llama.build(ckpt_dir, tokenizer, 32, 2, dtype="float32")
        results[name] = probe(generator)
    if torch.distributed.get_rank() == 0:
        torch.save(results, out)


if __name__ == "__main__":
    main()
