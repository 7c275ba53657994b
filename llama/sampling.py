"""Per-request sampling: parameters, per-row state, and one sampling call over a mixed batch.

Each request gets a `RowSampler` holding its `SamplingParams`, the tokens it has seen and, when
seeded, its own random generator. `sample_rows` picks the next token of every row of a batch whose
rows may all use different settings; a seeded row's token depends only on its own logits and
generator, never on the other rows.
"""

from dataclasses import dataclass
from typing import List, Mapping, Optional, Sequence, Tuple, Union

import torch

from llama import limits
from llama.limits import check_number, is_int


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens. The defaults are greedy decoding with no controls.

    The logits are transformed in this order: `logit_bias` is added, `repetition_penalty`
    divides the positive (multiplies the negative) logits of tokens seen in the prompt or the
    generated text, `presence_penalty` and `frequency_penalty` are subtracted for generated
    tokens. Then temperature 0 takes the argmax; otherwise the logits are divided by
    `temperature` and `top_k`, `top_p` and `min_p` restrict the distribution sampled from.
    """

    temperature: float = 0.0  # [0, 100]; below limits.GREEDY_TEMPERATURE (0 included) = greedy
    top_p: float = 1.0  # (0, 1]; below limits.MIN_TOP_P it keeps only the most likely token
    top_k: int = 0  # 0 = off; [0, 2**31 - 1], values beyond the vocabulary keep every token
    min_p: float = 0.0  # [0, 1]
    repetition_penalty: float = 1.0  # [0.01, 100], multiplicative (HF/CTRL form), prompt + generated
    presence_penalty: float = 0.0  # [-2, 2], additive OpenAI form, generated tokens
    frequency_penalty: float = 0.0  # [-2, 2], additive OpenAI form, generated tokens
    logit_bias: Optional[Mapping[int, float]] = None  # token id -> bias in [-100, 100]
    seed: Optional[int] = None  # per-request generator; None = the process's global generator

    @property
    def is_greedy(self) -> bool:
        """True when the next token is the argmax (temperature below `limits.GREEDY_TEMPERATURE`,
        0 included); the seed is then unused."""
        return self.temperature < limits.GREEDY_TEMPERATURE

    @property
    def has_penalties(self) -> bool:
        """True when any logit transformation (bias, repetition, presence, frequency) is active."""
        return bool(self.logit_bias) or self.repetition_penalty != 1.0 or self.has_additive_penalties

    @property
    def has_additive_penalties(self) -> bool:
        """True when the presence or the frequency penalty is non-zero."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def validate(self, vocab_size: int) -> None:
        """Check every field against its bounds in `llama.limits` (all finite, so no value can
        overflow a sampling step).

        Raises:
            ValueError: naming the first parameter out of range, its value and the range.
        """
        check_number(
            "temperature",
            self.temperature,
            f"a number in [0, {limits.MAX_TEMPERATURE:g}] (below {limits.GREEDY_TEMPERATURE:g} = greedy)",
            lambda v: 0 <= v <= limits.MAX_TEMPERATURE,
        )
        check_number("top_p", self.top_p, "in (0, 1]", lambda v: 0 < v <= 1)
        limits.check_int("top_k", self.top_k, 0, limits.MAX_TOP_K, " (0 = off)")
        check_number("min_p", self.min_p, "in [0, 1]", lambda v: 0 <= v <= 1)
        low, high = limits.MIN_REPETITION_PENALTY, limits.MAX_REPETITION_PENALTY
        check_number(
            "repetition_penalty",
            self.repetition_penalty,
            f"in [{low:g}, {high:g}] (1 = off)",
            lambda v: low <= v <= high,
        )
        for name in ("presence_penalty", "frequency_penalty"):
            check_number(
                name, getattr(self, name), "in [-2, 2]", lambda v: abs(v) <= limits.MAX_ADDITIVE_PENALTY
            )
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, Mapping):
                raise ValueError(
                    f"logit_bias must map token ids to biases, got {type(self.logit_bias).__name__}"
                )
            if len(self.logit_bias) > limits.MAX_LOGIT_BIAS_ENTRIES:
                raise ValueError(
                    f"logit_bias holds at most {limits.MAX_LOGIT_BIAS_ENTRIES} entries, "
                    f"got {len(self.logit_bias)}"
                )
            for token_id, bias in self.logit_bias.items():
                if not is_int(token_id) or not 0 <= token_id < vocab_size:
                    raise ValueError(
                        f"logit_bias token id {token_id!r} is outside the vocabulary: "
                        f"ids must be integers in [0, {vocab_size - 1}]"
                    )
                check_number(
                    f"logit_bias[{token_id}]",
                    bias,
                    "in [-100, 100]",
                    lambda v: abs(v) <= limits.MAX_LOGIT_BIAS,
                )
        if self.seed is not None and (not is_int(self.seed) or not 0 <= self.seed < limits.SEED_LIMIT):
            raise ValueError(f"seed must be None or an integer in [0, 2**64 - 1], got {self.seed!r}")


class RowSampler:
    """The sampling state of one request: its parameters, seen tokens and random generator.

    Token bookkeeping is a [vocab] tensor updated in place per token (`observe`), so the cost of
    a step does not grow with the context; requests without penalties keep no such tensor.
    """

    def __init__(
        self,
        params: SamplingParams,
        prompt_tokens: Sequence[int],
        vocab_size: int,
        device: Union[str, torch.device] = "cpu",
    ):
        """State for a request with `params` whose prompt is `prompt_tokens`.

        Raises:
            ValueError: as `SamplingParams.validate`, or if a prompt token is outside the vocabulary.
        """
        params.validate(vocab_size)
        self.params = params
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.generator: Optional[torch.Generator] = None
        if params.seed is not None and not params.is_greedy:
            self.generator = torch.Generator(device=self.device)
            self.generator.manual_seed(params.seed)
        self.bias_ids: Optional[torch.Tensor] = None
        self.bias_values: Optional[torch.Tensor] = None
        if params.logit_bias:
            self.bias_ids = torch.tensor(list(params.logit_bias.keys()), dtype=torch.long, device=self.device)
            self.bias_values = torch.tensor(
                [float(v) for v in params.logit_bias.values()], dtype=torch.float32, device=self.device
            )
        # Tokens of the prompt and of the output (repetition penalty), and how often each token
        # was generated (presence and frequency penalties).
        self.seen: Optional[torch.Tensor] = None
        self.generated_counts: Optional[torch.Tensor] = None
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=self.device)
            if len(prompt_tokens):
                prompt = torch.tensor(list(prompt_tokens), dtype=torch.long, device=self.device)
                if int(prompt.min()) < 0 or int(prompt.max()) >= vocab_size:
                    raise ValueError(f"prompt token ids must be in [0, {vocab_size - 1}]")
                self.seen[prompt] = True
        if params.has_additive_penalties:
            self.generated_counts = torch.zeros(vocab_size, dtype=torch.float32, device=self.device)
        self.num_generated = 0

    def observe(self, token_id: int) -> None:
        """Record that `token_id` was generated (call once per token, in order)."""
        if self.seen is not None:
            self.seen[token_id] = True
        if self.generated_counts is not None:
            self.generated_counts[token_id] += 1
        self.num_generated += 1

    def apply_penalties(self, logits: torch.Tensor) -> torch.Tensor:
        """This row's [vocab] logits after logit bias, repetition, presence and frequency
        penalties (a new tensor; `logits` itself is left unchanged)."""
        params = self.params
        if self.bias_ids is not None:
            logits = logits.index_add(0, self.bias_ids, self.bias_values)
        if self.seen is not None:
            penalty = params.repetition_penalty
            penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
            logits = torch.where(self.seen, penalized, logits)
        if self.generated_counts is not None:
            counts = self.generated_counts
            logits = (
                logits - counts * params.frequency_penalty - (counts > 0).float() * params.presence_penalty
            )
        return logits


def sample_rows(logits: torch.Tensor, samplers: List[RowSampler]) -> torch.Tensor:
    """The next token of each row, row i sampled with `samplers[i]`.

    Args:
        logits: [batch, vocab] float32 logits of the last position of each row.
        samplers: one RowSampler per row, in row order (settings may differ per row).

    Returns:
        [batch] long token ids on `logits.device`. Greedy rows take the argmax; a seeded row
        samples with its own generator on its own, so its token does not depend on the other
        rows; the remaining rows share one draw from the global generator. When every row is an
        unseeded temperature/top_p row with the same settings, this equals the reference
        `sample_top_p(softmax(logits / temperature), top_p)` on the whole batch.

    Raises:
        ValueError: if `logits` is not [len(samplers), vocab].
    """
    if logits.dim() != 2 or logits.shape[0] != len(samplers):
        raise ValueError(
            f"logits must be [batch, vocab] with one row per sampler: got shape {tuple(logits.shape)} "
            f"for {len(samplers)} samplers"
        )
    if samplers and logits.shape[1] != samplers[0].vocab_size:
        raise ValueError(
            f"logits have {logits.shape[1]} columns, the samplers a vocabulary of "
            f"{samplers[0].vocab_size}"
        )
    penalized = [i for i, s in enumerate(samplers) if s.params.has_penalties]
    if penalized:  # the fast path skips this for rows without penalties
        logits = logits.clone()
        for i in penalized:
            logits[i] = samplers[i].apply_penalties(logits[i])

    out = torch.empty(len(samplers), dtype=torch.long, device=logits.device)
    greedy = [i for i, s in enumerate(samplers) if s.params.is_greedy]
    if greedy:
        out[greedy] = torch.argmax(logits[greedy], dim=-1)
    shared = []
    for i, sampler in enumerate(samplers):
        if sampler.params.is_greedy:
            continue
        if sampler.generator is None:
            shared.append(i)
        else:
            out[i] = _sample(logits[i : i + 1], [sampler.params], sampler.generator)[0]
    if shared:
        out[shared] = _sample(logits[shared], [samplers[i].params for i in shared], None)
    return out


def sample_top_p(probs: torch.Tensor, p: float) -> torch.Tensor:
    """Sample from the smallest set of most likely tokens whose probability mass reaches `p`
    (the reference release's sampler).

    Args:
        probs: [batch, vocab] probabilities.
        p: nucleus mass; p -> 0 keeps only the most likely token (greedy).

    Returns:
        [batch] sampled token ids.
    """
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    mass_before = torch.cumsum(probs_sort, dim=-1) - probs_sort
    probs_sort = probs_sort.masked_fill(mass_before > p, 0.0)
    probs_sort = probs_sort / probs_sort.sum(dim=-1, keepdim=True)
    choice = torch.multinomial(probs_sort, num_samples=1)
    return torch.gather(probs_idx, -1, choice)[:, 0]


def _top_p(params: SamplingParams) -> float:
    """The nucleus mass used: tiny masses (which round to 0 in float32) keep the top token."""
    return max(params.top_p, limits.MIN_TOP_P)


def _sample(logits: torch.Tensor, params: List[SamplingParams], generator: Optional[torch.Generator]):
    """One multinomial draw per row of `logits` [rows, vocab] from the filtered distributions."""
    temperatures = {p.temperature for p in params}
    top_ps = {p.top_p for p in params}
    plain = all(p.top_k == 0 and p.min_p == 0 for p in params)
    if generator is None and plain and len(temperatures) == 1 and len(top_ps) == 1:
        return sample_top_p(torch.softmax(logits / params[0].temperature, dim=-1), _top_p(params[0]))
    probs_sort, probs_idx = _filtered_sorted_probs(logits, params)
    choice = torch.multinomial(probs_sort, num_samples=1, generator=generator)
    return torch.gather(probs_idx, -1, choice)[:, 0]


def sampling_probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distributions a sampled (not greedy) request with `params` draws from.

    Args:
        logits: [n, vocab] logits after any penalties, one row per position.
        params: the request's settings (temperature, top_k, top_p, min_p).

    Returns:
        [n, vocab] probabilities in vocabulary order, each row summing to 1.
    """
    probs_sort, probs_idx = _filtered_sorted_probs(logits, [params] * logits.shape[0])
    return torch.zeros_like(probs_sort).scatter_(-1, probs_idx, probs_sort)


def _filtered_sorted_probs(
    logits: torch.Tensor, params: List[SamplingParams]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per row: the probabilities sorted in descending order after temperature, top_k, top_p
    and min_p (renormalised), and the token id of each sorted position."""
    device = logits.device
    temperature = torch.tensor([p.temperature for p in params], dtype=logits.dtype, device=device)
    probs = torch.softmax(logits / temperature[:, None], dim=-1)
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    positions = torch.arange(probs.shape[-1], device=device)

    top_k = [p.top_k for p in params]
    if any(top_k):
        vocab = probs.shape[-1]
        k = torch.tensor([min(kk, vocab) if kk > 0 else vocab for kk in top_k], device=device)
        probs_sort = probs_sort.masked_fill(positions >= k[:, None], 0.0)
        # top_p then measures mass within the top k tokens.
        has_k = torch.tensor([kk > 0 for kk in top_k], device=device)
        probs_sort = torch.where(has_k[:, None], probs_sort / probs_sort.sum(-1, keepdim=True), probs_sort)

    top_p = torch.tensor([_top_p(p) for p in params], dtype=probs.dtype, device=device)
    mass_before = torch.cumsum(probs_sort, dim=-1) - probs_sort
    probs_sort = probs_sort.masked_fill(mass_before > top_p[:, None], 0.0)

    min_p = [p.min_p for p in params]
    if any(min_p):
        min_p_t = torch.tensor(min_p, dtype=probs.dtype, device=device)
        probs_sort = probs_sort.masked_fill(probs_sort < min_p_t[:, None] * probs_sort[:, :1], 0.0)
    return probs_sort / probs_sort.sum(dim=-1, keepdim=True), probs_idx


def token_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, top: int
) -> Tuple[torch.Tensor, Optional[Tuple[torch.Tensor, torch.Tensor]]]:
    """Log-probabilities of the chosen tokens under the raw model distribution.

    Args:
        logits: [batch, vocab] raw logits (before penalties and temperature).
        tokens: [batch] chosen token ids.
        top: how many most likely alternatives to return per row; 0 for none.

    Returns:
        ([batch] logprob of each chosen token, None when top == 0 else
        ([batch, top] ids, [batch, top] logprobs) of the most likely tokens, most likely first).

    Raises:
        ValueError: if `top` is not in [0, vocab] or the shapes do not match.
    """
    if logits.dim() != 2 or tokens.shape != (logits.shape[0],):
        raise ValueError(
            f"expected logits [batch, vocab] and tokens [batch], got {tuple(logits.shape)} and "
            f"{tuple(tokens.shape)}"
        )
    if not is_int(top) or not 0 <= top <= logits.shape[-1]:
        raise ValueError(f"top must be an integer in [0, {logits.shape[-1]}], got {top!r}")
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(-1, tokens.to(torch.long)[:, None])[:, 0]
    if top == 0:
        return chosen, None
    top_logprobs, top_ids = torch.topk(logprobs, top, dim=-1)
    return chosen, (top_ids, top_logprobs)
