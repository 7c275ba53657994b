"""The bounds of every request parameter, in one table read by the engine and the HTTP schemas.

Each bound is finite, so no value a client can send overflows a computation inside a step
(a temperature of 1e-39 divides logits into infinities; a bias of 1e39 does too). Values below
`GREEDY_TEMPERATURE` are decoded greedily, as the common servers do; the others are refused with
a message naming the parameter and its range (HTTP 400).
"""

import math
from numbers import Real
from typing import Callable

# Sampling.
GREEDY_TEMPERATURE = 1e-5  # temperatures below this (0 included) take the argmax
MAX_TEMPERATURE = 100.0
MIN_TOP_P = 1e-8  # smaller nucleus masses keep only the most likely token: they are raised to this
MAX_TOP_K = 2**31 - 1  # 0 = off; anything >= the vocabulary keeps every token
MIN_REPETITION_PENALTY = 0.01
MAX_REPETITION_PENALTY = 100.0
MAX_ADDITIVE_PENALTY = 2.0  # presence and frequency penalties lie in [-2, 2] (OpenAI's range)
MAX_LOGIT_BIAS = 100.0  # each bias lies in [-100, 100] (OpenAI's range)
MAX_LOGIT_BIAS_ENTRIES = 1024
SEED_LIMIT = 2**64  # seeds lie in [0, 2**64 - 1] (torch.Generator.manual_seed)

# Speculative decoding.
MAX_SPECULATIVE_TOKENS = 7  # proposals per step: with the fed token, 8 rows (the kernels' fixed order)
SPECULATION_ROWS = 8  # decode rows a step may grow to with proposals
MAX_NGRAM = 16  # prompt lookup's longest n-gram (feeding it a token costs O(max_ngram))

# Stopping and output.
MAX_STOP_STRINGS = 4
MAX_STOP_STRING_CHARS = 1024
MAX_STOP_TOKEN_IDS = 64
MAX_TOP_LOGPROBS = 5  # alternatives per token
MAX_CHOICES = 16  # OpenAI's `n`


def is_int(value: object) -> bool:
    """True for an int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_number(name: str, value: object, allowed: str, in_range: Callable[[float], bool]) -> None:
    """Refuse a value that is not a finite real number inside the allowed range.

    Raises:
        ValueError: "`name` must be `allowed`, got `value`".
    """
    if (
        isinstance(value, bool)
        or not isinstance(value, Real)
        or not math.isfinite(value)
        or not in_range(value)
    ):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def check_int(name: str, value: object, low: int, high: int, allowed: str = "") -> None:
    """Refuse a value that is not an integer in [low, high].

    Raises:
        ValueError: naming the parameter, the range and the value.
    """
    if not is_int(value) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}]{allowed}, got {value!r}")
