"""Request bodies of the endpoints, as pydantic models that check types and ranges.

Types are strict (a string is not a number, a number is not a boolean) and unknown fields are
ignored, so the bodies editors and client libraries send are accepted as they are.
"""

from typing import Dict, List, Literal, Optional, Tuple, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOP_STRINGS = 4
MAX_LOGPROBS = 5
MAX_CHOICES = 16


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


def _check_stop(stop: Union[None, str, List[str]]) -> Union[None, str, List[str]]:
    stops = [stop] if isinstance(stop, str) else (stop or [])
    if len(stops) > MAX_STOP_STRINGS:
        raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(stops)}")
    if any(not s for s in stops):
        raise ValueError("stop strings must not be empty")
    return stop


class OpenAISampling(_Body):
    """Sampling fields shared by the OpenAI endpoints (OpenAI's ranges and defaults)."""

    model: Optional[str] = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Union[None, str, List[str]] = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: Optional[Dict[str, float]] = None
    seed: Optional[int] = None
    user: Optional[str] = None
    # Extras beyond OpenAI's parameters (as vLLM names them).
    top_k: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    stop_token_ids: Optional[List[int]] = None

    _stop = field_validator("stop")(_check_stop)

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, bias: Optional[Dict[str, float]]) -> Optional[Dict[str, float]]:
        for key, value in (bias or {}).items():
            if not key.strip().lstrip("-").isdigit():
                raise ValueError(f"logit_bias keys must be token ids (integers as strings), got {key!r}")
            if not -100.0 <= value <= 100.0:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {value} for token {key}")
        return bias


class CompletionRequest(OpenAISampling):
    """POST /v1/completions."""

    prompt: Union[str, List[str], List[int], List[List[int]]]  # text(s) or token ids
    suffix: Optional[str] = None
    suffix_first: bool = False  # extra: the suffix-prefix-middle infilling order
    max_tokens: Optional[int] = Field(16, ge=0)
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, prompt: Union[str, list]) -> Union[str, list]:
        if isinstance(prompt, list) and (not prompt or any(isinstance(p, list) and not p for p in prompt)):
            raise ValueError(
                "prompt must be a string, a non-empty list of strings, or non-empty token id lists"
            )
        return prompt


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
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)


class ExtraChunk(_Body):
    filename: str = ""
    text: str


class LlamaCppCompletionRequest(_Body):
    """POST /completion (llama.cpp server's fields and defaults)."""

    prompt: Union[str, List[int]] = ""
    n_predict: int = Field(-1, ge=-1)  # -1: until the context is full
    temperature: float = Field(0.8, ge=0.0)
    top_k: int = Field(40, ge=0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    min_p: float = Field(0.05, ge=0.0, le=1.0)
    repeat_penalty: float = Field(1.0, gt=0.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    stop: List[str] = Field(default_factory=list)
    stream: bool = False
    seed: int = -1  # -1: random
    n_probs: int = Field(0, ge=0, le=MAX_LOGPROBS)
    cache_prompt: bool = True  # accepted; the engine always reuses cached prefixes
    logit_bias: Union[None, List[Tuple[int, Union[float, bool]]], Dict[str, float]] = None

    _stop = field_validator("stop")(_check_stop)


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
