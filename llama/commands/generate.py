"""`codellama complete` and `codellama infill`: one request through the engine, streamed to stdout."""

import argparse
import sys
from dataclasses import asdict
from typing import Callable, List, Optional, Tuple

from llama import distributed
from llama.commands.common import UsageError, first_rank_input, load_model, print_json, read_prompt
from llama.engine import Completion, Request
from llama.generation import Llama
from llama.prompts import infilling_prompt_tokens, split_fill_me
from llama.sampling import SamplingParams
from llama.speculation import Speculation


def _sampling(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
    )


def speculation(args: argparse.Namespace) -> Optional[Speculation]:
    """The draft model proposing up to --draft_tokens tokens per step with --draft, else prompt
    lookup proposing up to --lookup tokens (the parser checked the ranges), or None (off)."""
    if getattr(args, "draft", None):
        return Speculation("draft", num_tokens=args.draft_tokens)
    return Speculation("lookup", num_tokens=args.lookup) if args.lookup else None


def on_first_rank(generator: Llama, work: Callable[[], int]) -> int:
    """Run `work` on model-parallel rank 0 with the engine stepping in its own thread (so Ctrl-C
    lands in the reading loop, never inside a step); the other ranks follow rank 0's steps until
    it shuts the engine down."""
    engine = generator.engine
    if not distributed.is_first_model_parallel_rank():
        engine.follow()
        return 0
    engine.start()
    try:
        return work()
    finally:
        engine.shutdown()


def submit(
    generator: Llama, args: argparse.Namespace, prompt_tokens: List[int], default_stop: int
) -> Request:
    """Queue `prompt_tokens` with the command's sampling and --lookup options; at most
    --max_gen_len tokens, never past --max_seq_len.

    Raises:
        UsageError: if the prompt leaves no room to generate, or an option is out of range.
    """
    limit = generator.engine.max_request_positions  # --max_seq_len, or a smaller --kv_cache_tokens
    room = limit - len(prompt_tokens)
    if room < 1:
        raise UsageError(
            f"the prompt is {len(prompt_tokens)} tokens long, which leaves no room to generate within "
            f"{limit} positions (--max_seq_len, --kv_cache_tokens): raise them or shorten the prompt"
        )
    if args.max_gen_len < 1:
        raise UsageError(f"--max_gen_len must be at least 1, got {args.max_gen_len}")
    return generator.engine.submit(
        prompt_tokens,
        max_tokens=min(args.max_gen_len, room),
        sampling=_sampling(args),
        stop=args.stop,
        default_stop=default_stop,
        logprobs=0 if args.logprobs else None,
        speculation=speculation(args),
    )


def stream(request: Request) -> None:
    """Print the request's text as it is generated; Ctrl-C cancels it."""
    try:
        for event in request:
            sys.stdout.write(event.text)
            sys.stdout.flush()
    except KeyboardInterrupt:
        request.cancel()
        raise


def completion_json(generator: Llama, completion: Completion, **texts: str) -> dict:
    """A result dictionary: the texts, finish reason and usage, and pieces and log-probabilities
    when they were asked for."""
    result: dict = dict(texts)
    result["finish_reason"] = completion.finish_reason
    result["usage"] = asdict(completion.usage)
    if completion.logprobs:
        result["tokens"] = [generator.tokenizer.token_piece(t) for t in completion.token_ids]
        result["logprobs"] = completion.logprobs
    return result


def run_complete(args: argparse.Namespace) -> int:
    """Stream the continuation of the prompt (exact text: it continues the prompt as typed)."""
    prompt = first_rank_input(lambda: read_prompt(args.prompt, args.file))
    generator = load_model(args)

    def work() -> int:
        ids = generator.tokenizer.encode(prompt, bos=True, eos=False)
        request = submit(generator, args, ids, generator.tokenizer.eos_id)
        if args.json:
            completion = request.result()
            print_json(completion_json(generator, completion, generation=completion.text))
            return 0
        stream(request)
        print(flush=True)
        return 0

    return on_first_rank(generator, work)


def run_infill(args: argparse.Namespace) -> int:
    """Stream the code generated at the prompt's <FILL_ME> (between the prefix and the suffix with
    --full_text)."""

    def read() -> Tuple[str, str]:
        text = read_prompt(args.prompt, args.file)
        prefixes, suffixes = split_fill_me([text])  # exactly one marker, before loading anything
        return prefixes[0], suffixes[0]

    prefix, suffix = first_rank_input(read) or ("", "")
    generator = load_model(args)

    def work() -> int:
        tokenizer = generator.tokenizer
        ids = infilling_prompt_tokens(tokenizer, prefix, suffix, suffix_first=args.suffix_first)
        request = submit(generator, args, ids, tokenizer.eot_id)
        if args.json:
            completion = request.result()
            texts = dict(generation=completion.text, full_text=prefix + completion.text + suffix)
            print_json(completion_json(generator, completion, **texts))
            return 0
        if args.full_text:
            sys.stdout.write(prefix)
        stream(request)
        print(suffix if args.full_text else "", flush=True)
        return 0

    return on_first_rank(generator, work)
