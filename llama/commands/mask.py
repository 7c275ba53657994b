"""`codellama mask`: the attention mask of prompts packed into one prefill (llama.attention_mask)."""

import argparse
import sys
from pathlib import Path

from llama.attention_mask import mask_grid, render_text, write_png
from llama.cli import model_paths
from llama.commands.common import PACKAGE_ROOT, UsageError, read_prompt
from llama.prompts import infilling_prompt_tokens, split_fill_me
from llama.tokenizer import Tokenizer


def run_mask(args: argparse.Namespace) -> int:
    """Print the attention mask of the prompts packed into one prefill (and write --png)."""
    if args.prompts and args.file:
        raise UsageError("give prompts either as arguments or with --file, not both")
    texts = list(args.prompts) or [read_prompt(None, args.file)]
    _, tokenizer_path = model_paths(args.ckpt_dir, args.tokenizer_path, PACKAGE_ROOT)
    tokenizer = Tokenizer(tokenizer_path)
    if args.infill:
        prefixes, suffixes = split_fill_me(texts)
        prompts = [
            infilling_prompt_tokens(tokenizer, prefix, suffix, suffix_first=args.suffix_first)
            for prefix, suffix in zip(prefixes, suffixes)
        ]
    else:
        if args.suffix_first:
            raise UsageError("--suffix_first needs --infill")
        prompts = [tokenizer.encode(text, bos=True, eos=False) for text in texts]
    grid = mask_grid(tokenizer, prompts)
    print(render_text(grid))
    if args.png:
        write_png(grid, Path(args.png))
        print(f"wrote {args.png}", file=sys.stderr)
    return 0
