"""Request bodies of the endpoints, as pydantic models that check types and ranges.

Types are strict (a string is not a number, a number is not a boolean), every number must be
finite, and the ranges are those of `llama.limits`, the table the engine checks too. Unknown
fields are ignored, so the bodies editors and client libraries send are accepted as they are.
"""

from typing import Annotated, Dict, List, Literal, Optional, Tuple, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from llama import limits
from llama.speculation import DEFAULT_MAX_NGRAM, Speculation

_INTEGER_KEY_DIGITS = frozenset("0123456789")


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: bool = False


def parse_token_key(key: str) -> int:
    """A token id written as a JSON object key: ASCII digits with an optional leading minus
    (Unicode digits such as "²" or "٣" are refused, as are spaces and signs like "+").

    Raises:
        ValueError: for any other key.
    """
    digits = key[1:] if key.startswith("-") else key
    if not digits or not set(digits) <= _INTEGER_KEY_DIGITS or len(digits) > 20:
        raise ValueError(f'logit_bias keys must be token ids written as integers (e.g. "50256"), got {key!r}')
    return int(key)


def _integral_float_as_int(value: object) -> object:
    """A float without a fraction (`1e9`, `64.0`) as its integer, as llama.cpp reads counts."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# A count as llama.cpp reads it: an integer, or a float without a fraction.
LlamaCppCount = Annotated[int, BeforeValidator(_integral_float_as_int)]


def _check_bias_value(token: object, value: float) -> None:
    if not -limits.MAX_LOGIT_BIAS <= value <= limits.MAX_LOGIT_BIAS:
        raise ValueError(
            f"biases must be in [-{limits.MAX_LOGIT_BIAS:g}, {limits.MAX_LOGIT_BIAS:g}], "
            f"got {value!r} for token {token}"
        )


def _check_bias_count(count: int) -> None:
    if count > limits.MAX_LOGIT_BIAS_ENTRIES:
        raise ValueError(f"logit_bias takes at most {limits.MAX_LOGIT_BIAS_ENTRIES} entries, got {count}")


def _check_bias_map(bias: Optional[Dict[str, float]]) -> Optional[Dict[str, float]]:
    _check_bias_count(len(bias or {}))
    for key, value in (bias or {}).items():
        parse_token_key(key)
        _check_bias_value(key, value)
    return bias


def _check_stop(stop: Union[None, str, List[str]]) -> Union[None, str, List[str]]:
    stops = [stop] if isinstance(stop, str) else (stop or [])
    if len(stops) > limits.MAX_STOP_STRINGS:
        raise ValueError(f"at most {limits.MAX_STOP_STRINGS} stop strings are allowed, got {len(stops)}")
    if any(not s for s in stops):
        raise ValueError("stop strings must not be empty")
    longest = max((len(s) for s in stops), default=0)
    if longest > limits.MAX_STOP_STRING_CHARS:
        raise ValueError(
            f"stop strings may have at most {limits.MAX_STOP_STRING_CHARS} characters, got one of {longest}"
        )
    return stop


class SpeculativeOptions(_Body):
    """The `speculative` field: how a request proposes tokens for the model to check in one pass.

    `method` "lookup" proposes the tokens that followed the latest earlier occurrence of the last
    n tokens (n from `max_ngram` down to `min_ngram`) in the prompt and the text so far, at most
    `num_tokens` per step; "draft" has the server's draft model (--draft) propose them; "none"
    turns speculation off (also for a server started with --lookup or --draft).
    """

    method: Literal["lookup", "draft", "none"] = "lookup"
    num_tokens: int = Field(4, ge=1, le=limits.MAX_SPECULATIVE_TOKENS)
    max_ngram: int = Field(DEFAULT_MAX_NGRAM, ge=1)
    min_ngram: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _check_ngrams(self) -> "SpeculativeOptions":
        if self.method != "none":  # the engine's own check: n-gram bounds, min <= max
            self.to_speculation()
        return self

    def to_speculation(self) -> Optional[Speculation]:
        """The engine's `Speculation`, or None for method "none".

        Raises:
            ValueError: naming a field out of range.
        """
        if self.method == "none":
            return None
        speculation = Speculation(self.method, self.num_tokens, self.max_ngram, self.min_ngram)
        speculation.validate()
        return speculation


def _speculative_shorthand(value: object) -> object:
    """`"lookup"` as `{"method": "lookup"}` and `false` as `{"method": "none"}`; objects and null
    as they are; anything else refused with the forms allowed."""
    if value is None or isinstance(value, (dict, SpeculativeOptions)):
        return value
    if value in ("lookup", "draft") and isinstance(value, str):
        return {"method": value}
    if value is False:
        return {"method": "none"}
    raise ValueError(
        'must be an object such as {"method": "lookup", "num_tokens": 4}, the string '
        '"lookup" or "draft", or false (off)'
    )


# The per-request speculation of every generating endpoint; None: the server's --lookup default.
Speculative = Annotated[Optional[SpeculativeOptions], BeforeValidator(_speculative_shorthand)]


def _temperature(default: float):
    return Field(default, ge=0.0, le=limits.MAX_TEMPERATURE)


def _top_k(default: int):
    return Field(default, ge=0, le=limits.MAX_TOP_K)


def _repetition_penalty(default: float):
    return Field(default, ge=limits.MIN_REPETITION_PENALTY, le=limits.MAX_REPETITION_PENALTY)


def _additive_penalty():
    return Field(0.0, ge=-limits.MAX_ADDITIVE_PENALTY, le=limits.MAX_ADDITIVE_PENALTY)


def _top_logprobs(default: Optional[int]):
    return Field(default, ge=0, le=limits.MAX_TOP_LOGPROBS)


class OpenAISampling(_Body):
    """Sampling fields shared by the OpenAI endpoints (OpenAI's defaults; ranges of `llama.limits`)."""

    model: Optional[str] = None
    temperature: float = _temperature(1.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=limits.MAX_CHOICES)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Union[None, str, List[str]] = None
    presence_penalty: float = _additive_penalty()
    frequency_penalty: float = _additive_penalty()
    logit_bias: Optional[Dict[str, float]] = None
    seed: Optional[int] = Field(None, ge=0, lt=limits.SEED_LIMIT)
    user: Optional[str] = None
    # Extras beyond OpenAI's parameters (as vLLM names them).
    top_k: int = _top_k(0)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = _repetition_penalty(1.0)
    stop_token_ids: Optional[List[int]] = Field(None, max_length=limits.MAX_STOP_TOKEN_IDS)
    speculative: Speculative = None

    _stop = field_validator("stop")(_check_stop)
    _logit_bias = field_validator("logit_bias")(_check_bias_map)


class CompletionRequest(OpenAISampling):
    """POST /v1/completions."""

    prompt: Union[str, List[str], List[int], List[List[int]]]  # text(s) or token ids
    suffix: Optional[str] = None
    suffix_first: bool = False  # extra: the suffix-prefix-middle infilling order
    max_tokens: Optional[int] = Field(16, ge=0)
    logprobs: Optional[int] = _top_logprobs(None)
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, prompt: Union[str, list]) -> Union[str, list]:
        if isinstance(prompt, list) and (not prompt or any(isinstance(p, list) and not p for p in prompt)):
            raise ValueError(
                "prompt must be a string, a non-empty list of strings, or non-empty token id lists"
            )
        return prompt

    def prompt_count(self) -> int:
        """How many prompts the body holds (a list of strings or of id lists is a batch)."""
        if isinstance(self.prompt, str) or isinstance(self.prompt[0], int):
            return 1
        return len(self.prompt)


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant"]
    content: Union[str, List[TextPart]]
    destination: Optional[str] = None  # the turn-based format's addressee

    def text(self) -> str:
        """The message's text (content parts joined)."""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(OpenAISampling):
    """POST /v1/chat/completions."""

    messages: List[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=0)
    max_completion_tokens: Optional[int] = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: Optional[int] = _top_logprobs(None)


class ExtraChunk(_Body):
    filename: str = ""
    text: str


class LlamaCppCompletionRequest(_Body):
    """POST /completion (llama.cpp server's fields and defaults; ranges of `llama.limits`)."""

    prompt: Union[str, List[int]] = ""
    # -1: until the context is full; larger counts than the context leaves are capped to it.
    n_predict: LlamaCppCount = Field(-1, ge=-1)
    temperature: float = _temperature(0.8)
    top_k: int = _top_k(40)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    min_p: float = Field(0.05, ge=0.0, le=1.0)
    repeat_penalty: float = _repetition_penalty(1.0)
    presence_penalty: float = _additive_penalty()
    frequency_penalty: float = _additive_penalty()
    stop: List[str] = Field(default_factory=list)
    stream: bool = False
    seed: int = Field(-1, ge=-1, lt=limits.SEED_LIMIT)  # -1: random
    n_probs: int = _top_logprobs(0)
    cache_prompt: bool = True  # accepted; the engine always reuses cached prefixes
    logit_bias: Union[None, List[Tuple[int, Union[float, bool]]], Dict[str, float]] = None
    speculative: Speculative = None  # not llama.cpp's: as on the OpenAI endpoints

    _stop = field_validator("stop")(_check_stop)

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, bias: Union[None, list, dict]) -> Union[None, list, dict]:
        if isinstance(bias, dict):
            return _check_bias_map(bias)
        _check_bias_count(len(bias or []))
        for token, value in bias or []:
            if not isinstance(value, bool):
                _check_bias_value(token, value)
        return bias


class InfillRequest(LlamaCppCompletionRequest):
    """POST /infill: `input_prefix` + gap + `input_suffix`; `prompt` starts the middle."""

    prompt: str = ""
    input_prefix: str = ""
    input_suffix: str = ""
    input_extra: List[ExtraChunk] = Field(default_factory=list)


class TokenizeRequest(_Body):
    """POST /tokenize."""

    content: str
    add_special: bool = False
    with_pieces: bool = False


class DetokenizeRequest(_Body):
    """POST /detokenize."""

    tokens: List[int]
