"""Measure the demo model on the held-out standard library modules (the numbers of its model card).

    python scripts/eval_demo.py --ckpt_dir models/demo --out_json eval.json

Reports token accuracy and perplexity of next-token prediction on the held-out files, and, for
held-out functions with a docstring, the share of greedy generations that parse with `ast`:
function-body completion (prompt: signature + docstring; the body ends where a line dedents
to the `def`), infilling of the removed body (prefix-suffix-middle and suffix-prefix-middle),
and Instruct answers (docstring request -> code). Everything runs through `Llama.build` and
the engine's `text_completion` / `text_infilling` / `chat_completion`, greedy, in fp32.
"""

import argparse
import ast
import json
import math
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama import Llama  # noqa: E402
from scripts.demo_data import (  # noqa: E402
    Function,
    dedent_lines,
    find_functions,
    head_lines,
    instruction_request,
    read_source,
    split_corpus,
    stdlib_dir,
    tail_lines,
)

MAX_HEADER_TOKENS = 128
MAX_BODY_TOKENS = 160


def body_until_dedent(generation: str, def_indent: str = "") -> str:
    """The generated lines up to (not including) the first non-blank line indented no deeper
    than the `def` (where the function has ended)."""
    kept = []
    for line in generation.splitlines(keepends=True):
        if line.strip() and len(line) - len(line.lstrip()) <= len(def_indent):
            break
        kept.append(line)
    return "".join(kept)


def complete_bodies(llama: Llama, headers: List[str], max_gen_len: int) -> List[str]:
    """Greedy function bodies after each signature + docstring, cut where the function ends.

    Runs with `echo=True` and removes the prompt from the decoded text: decoding the new
    tokens alone would drop the first space of the body's indentation (a `▁▁▁▁` piece right
    after the prompt loses its leading `▁`, the SentencePiece quirk the reference shares).
    """
    results = llama.text_completion(headers, temperature=0.0, max_gen_len=max_gen_len, echo=True)
    bodies = []
    for header, result in zip(headers, results):
        text = result["generation"]
        bodies.append(body_until_dedent(text[len(header) :]) if text.startswith(header) else "")
    return bodies


def parses(code: str) -> bool:
    try:
        ast.parse(code)
    except (SyntaxError, ValueError):
        return False
    return True


def function_parses(header: str, body: str) -> bool:
    """True if `header + body` is valid Python and the body holds some code."""
    return bool(body.strip()) and parses(header + body)


class HeldOutFunction:
    """A held-out documented function and the texts the evaluation prompts are made of."""

    def __init__(self, module: str, text: str, function: Function):
        lines = text.splitlines(keepends=True)
        self.module = module
        self.function = function
        self.header = dedent_lines(function.header(lines), function.indent) or ""
        self.code = dedent_lines("".join(lines[function.def_line : function.end]), function.indent) or ""
        start = sum(len(line) for line in lines[: function.body_start])
        self.before = text[:start]
        self.after = text[sum(len(line) for line in lines[: function.end]) :]
        self.raw_header = function.header(lines)


def held_out_functions(llama: Llama, limit: int) -> List[HeldOutFunction]:
    """Documented held-out functions with short headers and bodies, in a fixed order; at most
    `limit`, evenly spaced over the list."""
    root = stdlib_dir()
    _train, held_out = split_corpus(root)
    selected = []
    for path in held_out:
        text = read_source(root, path)
        if text is None:
            continue
        lines = text.splitlines(keepends=True)
        for function in find_functions(text):
            if not function.docstring:
                continue
            header = dedent_lines(function.header(lines), function.indent)
            code = dedent_lines("".join(lines[function.def_line : function.end]), function.indent)
            if header is None or code is None:
                continue
            if len(llama.tokenizer.encode(header, bos=True, eos=False)) > MAX_HEADER_TOKENS:
                continue
            if len(llama.tokenizer.encode(function.body(lines), bos=False, eos=False)) > MAX_BODY_TOKENS:
                continue
            selected.append(HeldOutFunction(str(path), text, function))
    if len(selected) > limit:
        selected = [selected[i * len(selected) // limit] for i in range(limit)]
    return selected


@torch.inference_mode()
def next_token_metrics(llama: Llama, seq_len: int) -> Tuple[float, float, int]:
    """(token accuracy, perplexity, tokens scored) of next-token prediction on the held-out
    files, each cut into independent chunks of `seq_len` tokens."""
    root = stdlib_dir()
    _train, held_out = split_corpus(root)
    chunks: List[List[int]] = []
    for path in held_out:
        text = read_source(root, path)
        if text is not None:
            ids = llama.tokenizer.encode(text, bos=True, eos=True)
            chunks += [ids[i : i + seq_len] for i in range(0, len(ids) - 1, seq_len)]
    nll, correct, count = 0.0, 0, 0
    for chunk in chunks:
        if len(chunk) < 2:
            continue
        tokens = torch.tensor([chunk], device=llama.device)
        logits = llama.model.forward(tokens, 0)[0, :-1]
        targets = tokens[0, 1:]
        nll += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
        correct += (logits.argmax(-1) == targets).sum().item()
        count += len(targets)
    return correct / count, math.exp(nll / count), count


def infilling_context(item: HeldOutFunction, budget_tokens: int, llama: Llama) -> Tuple[str, str]:
    """(prefix, suffix): the file around the removed body, whole lines, prompt within budget."""
    prefix_chars, suffix_chars = 600, 300
    while True:
        prefix = tail_lines(item.before, prefix_chars)
        if not prefix.endswith(item.raw_header):
            prefix = item.raw_header
        suffix = head_lines(item.after, suffix_chars)
        size = len(llama.tokenizer.encode(prefix + suffix, bos=True, eos=False)) + 4
        if size <= budget_tokens or (prefix == item.raw_header and not suffix):
            return prefix, suffix
        prefix_chars, suffix_chars = prefix_chars * 2 // 3, suffix_chars * 2 // 3


def evaluate(ckpt_dir: str, limit: int, seq_len: int, max_gen_len: int, batch_size: int) -> Dict:
    started = time.time()
    llama = Llama.build(
        ckpt_dir=ckpt_dir,
        tokenizer_path=str(Path(ckpt_dir) / "tokenizer.model"),
        max_seq_len=seq_len,
        max_batch_size=batch_size,
        dtype="float32",
    )
    accuracy, perplexity, scored = next_token_metrics(llama, seq_len)
    items = held_out_functions(llama, limit)
    results: Dict = {
        "held_out_tokens": scored,
        "token_accuracy": accuracy,
        "perplexity": perplexity,
        "functions": len(items),
    }

    bodies = complete_bodies(llama, [item.header for item in items], max_gen_len)
    results["completion_parse_rate"] = _share(
        function_parses(item.header, body) for item, body in zip(items, bodies)
    )

    infill_gen_len = min(max_gen_len, MAX_BODY_TOKENS + 16)
    budget = seq_len - infill_gen_len
    contexts = [infilling_context(item, budget, llama) for item in items]
    for name, suffix_first in (("infilling_psm_parse_rate", False), ("infilling_spm_parse_rate", True)):
        infills = llama.text_infilling(
            [p for p, _ in contexts],
            [s for _, s in contexts],
            temperature=0.0,
            max_gen_len=infill_gen_len,
            suffix_first=suffix_first,
        )
        middles = [r["generation"] for r in infills]
        # Strict: the whole middle the model wrote before `▁<EOT>`. Cut: the middle up to where
        # the function ends, the rule the completion rate uses.
        results[name] = _share(
            function_parses(item.header, dedent_lines(middle, item.function.indent) or "")
            for item, middle in zip(items, middles)
        )
        results[name.replace("_parse_rate", "_cut_parse_rate")] = _share(
            function_parses(
                item.header,
                dedent_lines(body_until_dedent(middle, item.function.indent), item.function.indent) or "",
            )
            for item, middle in zip(items, middles)
        )
        if not suffix_first:
            psm_middles = middles

    dialogs = [[{"role": "user", "content": instruction_request(item.function)}] for item in items]
    answers = [
        r["generation"]["content"]
        for r in llama.chat_completion(dialogs, temperature=0.0, max_gen_len=max_gen_len)
    ]
    results["instruction_parse_rate"] = _share("def " in answer and parses(answer) for answer in answers)

    sample = _sample_index(items)
    results["samples"] = {
        "completion": {"prompt": items[sample].header, "generation": bodies[sample]},
        "infilling": {
            "prefix": contexts[sample][0],
            "suffix": contexts[sample][1],
            "generation": psm_middles[sample],
        },
        "instruction": {"prompt": dialogs[sample][0]["content"], "generation": answers[sample]},
    }
    results["eval_seconds"] = round(time.time() - started, 1)
    return results


def _sample_index(items: List[HeldOutFunction]) -> int:
    """A short, plain function for the verbatim samples: the first top-level one with <= 4 body lines."""
    for index, item in enumerate(items):
        lines = item.code.splitlines()
        if not item.function.indent and len(lines) - len(item.header.splitlines()) <= 4:
            return index
    return 0


def _share(flags) -> float:
    flags = list(flags)
    return sum(flags) / len(flags) if flags else 0.0


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ckpt_dir", default="models/demo")
    parser.add_argument("--out_json", default=None, help="also write the results here")
    parser.add_argument("--max_functions", type=int, default=100)
    parser.add_argument("--seq_len", type=int, default=320, help="the length the model was trained on")
    parser.add_argument("--max_gen_len", type=int, default=176)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = evaluate(args.ckpt_dir, args.max_functions, args.seq_len, args.max_gen_len, args.batch_size)
    text = json.dumps(results, indent=2)
    print(text)
    if args.out_json:
        Path(args.out_json).write_text(text + "\n")


if __name__ == "__main__":
    main()
