"""Validated request bodies -> what to submit to the engine: prompt tokens and engine parameters.

A `Job` is one HTTP request's generation work: one or more prompts, each generated `n` times,
with the same settings. Prompts are formatted with the published Code Llama formats of
`llama.prompts` (infilling, Instruct chat, the turn-based chat).
"""

import re
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Sequence, Union

from llama.limits import GREEDY_TEMPERATURE
from llama.prompts import (
    Dialog,
    infilling_prompt_tokens,
    instruct_prompt_tokens,
    is_unsafe,
    require_infilling,
    turn_prompt_tokens,
    validate_dialog,
)
from llama.sampling import SamplingParams
from llama.server.errors import APIError, invalid
from llama.server.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    InfillRequest,
    LlamaCppCompletionRequest,
    OpenAISampling,
    SpeculativeOptions,
    parse_token_key,
)
from llama.speculation import Speculation
from llama.tokenizer import Tokenizer

# The infilling prompt as editors template it for Code Llama: `<PRE> {prefix} <SUF>{suffix} <MID>`.
# The spaces before <SUF> and <MID> belong to the special pieces (`▁<SUF>`, `▁<MID>`); the one
# after <PRE> is the prefix's leading space that SentencePiece adds anyway.
_LITERAL_INFILL = re.compile(r"\A<PRE> ?(?P<prefix>.*?) <SUF>(?P<suffix>.*) <MID>\Z", re.DOTALL)


@dataclass
class Job:
    """One request's work for the engine. Choice `i` runs prompt `i // n`."""

    prompts: List[List[int]]
    prompt_texts: List[str]  # what `echo` repeats
    n: int
    max_tokens: Optional[int]  # None: as many as the context leaves
    sampling: SamplingParams
    stop: List[str] = field(default_factory=list)
    stop_token_ids: List[int] = field(default_factory=list)
    default_stops: List[Optional[int]] = field(default_factory=list)  # per prompt: its format's stop id
    logprobs: Optional[int] = None
    echo: bool = False
    prompt_logprobs: bool = False  # echo with logprobs: the prompt tokens' too
    strip_leading_space: bool = False  # chat answers start without the word-boundary space
    cap_to_context: bool = False  # max_tokens beyond what the context leaves is capped, not refused
    speculation: Optional[Speculation] = None  # prompt lookup for every choice, or none

    def choice_count(self) -> int:
        """How many engine requests this job submits."""
        return len(self.prompts) * self.n

    def sampling_for(self, choice: int) -> SamplingParams:
        """The sampling of one choice: a given seed is offset per choice, so n choices differ."""
        if self.sampling.seed is None or choice == 0:
            return self.sampling
        return replace(self.sampling, seed=self.sampling.seed + choice)


def literal_infill(prompt: str) -> Optional[Dict[str, str]]:
    """Prefix and suffix of a prompt templated as `<PRE> {prefix} <SUF>{suffix} <MID>`, else None."""
    match = _LITERAL_INFILL.match(prompt)
    return None if match is None else match.groupdict()


def _infill_tokens(tokenizer: Tokenizer, prefix: str, suffix: str, suffix_first: bool = False) -> List[int]:
    try:
        require_infilling(tokenizer)
    except ValueError as error:
        raise APIError(501, str(error), code="infilling_not_supported") from None
    return infilling_prompt_tokens(tokenizer, prefix, suffix, suffix_first=suffix_first)


def _logit_bias(bias: Optional[Dict[Union[str, int], float]], vocab_size: int, param: str) -> Optional[Dict]:
    if not bias:
        return None
    out = {}
    for key, value in bias.items():
        token = key if isinstance(key, int) else parse_token_key(key)
        if not 0 <= token < vocab_size:
            raise invalid(f"{param}: token id {token} is outside the vocabulary of {vocab_size}", param)
        out[token] = float(value)
    return out


def _check_token_ids(ids: Sequence[int], vocab_size: int, param: str) -> List[int]:
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise invalid(f"{param}: token id {bad[0]} is outside the vocabulary of {vocab_size}", param)
    return list(ids)


def _openai_sampling(body: OpenAISampling, vocab_size: int) -> SamplingParams:
    if body.n > 1 and body.temperature < GREEDY_TEMPERATURE:
        raise invalid(
            f"n={body.n} with temperature {body.temperature:g} (below {GREEDY_TEMPERATURE:g}: greedy) "
            f"would return {body.n} identical choices: use n=1, or a temperature of at least "
            f"{GREEDY_TEMPERATURE:g}",
            "n",
        )
    return SamplingParams(
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        min_p=body.min_p,
        repetition_penalty=body.repetition_penalty,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        logit_bias=_logit_bias(body.logit_bias, vocab_size, "logit_bias"),
        seed=body.seed,
    )


def _speculation(
    options: Optional[SpeculativeOptions], default: Optional[Speculation]
) -> Optional[Speculation]:
    """The request's `speculative` field as the engine's `Speculation`; `default` (the server's
    --lookup) when the request does not say."""
    if options is None:
        return default
    try:
        return options.to_speculation()
    except ValueError as error:  # the schema already checked it: only a change of bounds lands here
        raise invalid(str(error), "speculative") from None


def _stops(stop: Union[None, str, List[str]]) -> List[str]:
    return [stop] if isinstance(stop, str) else list(stop or [])


def completion_job(
    body: CompletionRequest, tokenizer: Tokenizer, default_speculation: Optional[Speculation] = None
) -> Job:
    """A /v1/completions request as a job.

    A `suffix` makes each prompt the prefix of an infill (stopping at `▁<EOT>`); so does a
    prompt templated with the literal `<PRE>`/`<SUF>`/`<MID>` markers.

    Raises:
        APIError: 400 for inconsistent fields, 501 for infilling with a model that cannot infill.
    """
    prompt = body.prompt
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    tokens, texts, stops = [], [], []
    for item in prompt:
        if not isinstance(item, str):  # token ids, used as they are
            if body.suffix is not None:
                raise invalid("suffix needs the prompt as text, not token ids", "suffix")
            tokens.append(_check_token_ids(item, tokenizer.n_words, "prompt"))
            texts.append(tokenizer.decode(item))
            stops.append(tokenizer.eos_id)
            continue
        texts.append(item)
        literal = literal_infill(item)
        if body.suffix is not None:
            if literal is not None:
                raise invalid(
                    "the prompt already holds <PRE>/<SUF>/<MID> infilling markers: either send the "
                    "prefix as prompt and the suffix as suffix, or the templated prompt alone",
                    "suffix",
                )
            tokens.append(_infill_tokens(tokenizer, item, body.suffix, body.suffix_first))
        elif literal is not None:
            tokens.append(_infill_tokens(tokenizer, literal["prefix"], literal["suffix"]))
        else:
            tokens.append(tokenizer.encode(item, bos=True, eos=False))
        infilling = body.suffix is not None or literal is not None
        stops.append(tokenizer.eot_id if infilling else tokenizer.eos_id)
    return Job(
        prompts=tokens,
        prompt_texts=texts,
        n=body.n,
        max_tokens=16 if body.max_tokens is None else body.max_tokens,
        sampling=_openai_sampling(body, tokenizer.n_words),
        stop=_stops(body.stop),
        stop_token_ids=_check_token_ids(body.stop_token_ids or [], tokenizer.n_words, "stop_token_ids"),
        default_stops=stops,
        logprobs=body.logprobs,
        echo=body.echo,
        prompt_logprobs=body.echo and body.logprobs is not None,
        speculation=_speculation(body.speculative, default_speculation),
    )


def chat_job(
    body: ChatCompletionRequest, tokenizer: Tokenizer, default_speculation: Optional[Speculation] = None
) -> Job:
    """A /v1/chat/completions request as a job: the Instruct `[INST]` format, or the turn-based
    format (stopping at `<step>`) when the tokenizer has `<step>`.

    Raises:
        APIError: 400 for messages out of order or containing the format's special tags.
    """
    dialog: Dialog = []
    for message in body.messages:
        entry = {"role": message.role, "content": message.text()}
        if message.destination is not None:
            entry["destination"] = message.destination
        dialog.append(entry)
    try:
        validate_dialog(dialog, 0)
    except ValueError as error:
        raise invalid(str(error).replace("dialog 0, ", ""), "messages") from None
    if is_unsafe(dialog):
        raise invalid(
            "messages contain the chat format's special tags ([INST], [/INST], <<SYS>>, <</SYS>>, "
            "<step>), which are not allowed in content",
            "messages",
        )
    turns = tokenizer.step_id is not None
    prompt = (turn_prompt_tokens if turns else instruct_prompt_tokens)(tokenizer, dialog)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    logprobs = None
    if body.logprobs:
        logprobs = body.top_logprobs or 0
    elif body.top_logprobs:
        raise invalid("top_logprobs needs logprobs: true", "top_logprobs")
    return Job(
        prompts=[prompt],
        prompt_texts=[""],
        n=body.n,
        max_tokens=max_tokens,
        sampling=_openai_sampling(body, tokenizer.n_words),
        stop=_stops(body.stop),
        stop_token_ids=_check_token_ids(body.stop_token_ids or [], tokenizer.n_words, "stop_token_ids"),
        default_stops=[tokenizer.step_id if turns else tokenizer.eos_id],
        logprobs=logprobs,
        strip_leading_space=True,
        speculation=_speculation(body.speculative, default_speculation),
    )


def _llamacpp_sampling(body: LlamaCppCompletionRequest, vocab_size: int) -> SamplingParams:
    bias = body.logit_bias
    if isinstance(bias, list):  # [[token, bias], ...]; bias false: never sample the token
        bias = {token: (-100.0 if value is False else float(value)) for token, value in bias}
    return SamplingParams(
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        min_p=body.min_p,
        repetition_penalty=body.repeat_penalty,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        logit_bias=_logit_bias(bias, vocab_size, "logit_bias"),
        seed=None if body.seed < 0 else body.seed,
    )


def llamacpp_completion_job(
    body: LlamaCppCompletionRequest, tokenizer: Tokenizer, default_speculation: Optional[Speculation] = None
) -> Job:
    """A llama.cpp /completion request as a job (a string prompt gets BOS; a token list is used
    as it is; a prompt templated with literal infilling markers infills).

    Raises:
        APIError: 400 for an empty prompt or token ids outside the vocabulary.
    """
    infilling = False
    if isinstance(body.prompt, list):
        tokens = _check_token_ids(body.prompt, tokenizer.n_words, "prompt")
        text = tokenizer.decode(tokens)
    else:
        text = body.prompt
        literal = literal_infill(text)
        if literal is not None:
            tokens, infilling = _infill_tokens(tokenizer, literal["prefix"], literal["suffix"]), True
        else:
            tokens = tokenizer.encode(text, bos=True, eos=False)
    if not tokens:
        raise invalid("prompt is empty: give a string or a list of token ids", "prompt")
    stop = tokenizer.eot_id if infilling else tokenizer.eos_id
    return _llamacpp_job(body, tokenizer, tokens, text, stop, default_speculation)


def infill_job(
    body: InfillRequest, tokenizer: Tokenizer, default_speculation: Optional[Speculation] = None
) -> Job:
    """A llama.cpp /infill request as a job: `input_extra` chunks (their text) go before the
    prefix, `prompt` is appended after `▁<MID>` as the start of the middle.

    Raises:
        APIError: 501 with a model that cannot infill.
    """
    extra = "".join(
        chunk.text if chunk.text.endswith("\n") else chunk.text + "\n" for chunk in body.input_extra
    )
    tokens = _infill_tokens(tokenizer, extra + body.input_prefix, body.input_suffix)
    if body.prompt:
        tokens += tokenizer.encode_infilling(body.prompt)
    return _llamacpp_job(body, tokenizer, tokens, body.input_prefix, tokenizer.eot_id, default_speculation)


def _llamacpp_job(
    body: LlamaCppCompletionRequest,
    tokenizer: Tokenizer,
    tokens: List[int],
    text: str,
    default_stop: int,
    default_speculation: Optional[Speculation],
) -> Job:
    return Job(
        prompts=[tokens],
        prompt_texts=[text],
        n=1,
        max_tokens=None if body.n_predict < 0 else body.n_predict,
        sampling=_llamacpp_sampling(body, tokenizer.n_words),
        stop=list(body.stop),
        default_stops=[default_stop],
        logprobs=body.n_probs or None,
        cap_to_context=True,  # as llama.cpp, which stops when the context is full
        speculation=_speculation(body.speculative, default_speculation),
    )
