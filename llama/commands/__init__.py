"""The `codellama` command (also `python -m llama`): one entry point for every job.

    codellama complete|infill|chat|plan|mask   options parsed, the API called, results printed
    codellama convert|reshard|quantize|serve   `python -m llama.<tool>` with the remaining arguments

Every subcommand that loads a model defaults to the bundled demo model and takes the same model
options (`--ckpt_dir`, `--tokenizer_path`, `--max_seq_len`, `--max_batch_size`, `--dtype`, ...). Under
torchrun, rank 0 reads the input (argument, file, standard input) and prints; every rank computes.
Bad input ends with one line on stderr and exit status 2.

Modules: `entry` (the parser and dispatch), `common` (input, loading, errors), `generate`
(complete, infill), `chat`, `plan`, `mask`.
"""

from llama.commands.entry import DELEGATED, build_parser, entry_point, main

__all__ = ["DELEGATED", "build_parser", "entry_point", "main"]
