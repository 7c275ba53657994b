"""STAND-IN (replaced by the real module): minimal per-row sampling."""

from dataclasses import dataclass
from typing import List, Mapping, Optional, Sequence, Tuple

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Optional[Mapping[int, float]] = None
    seed: Optional[int] = None

    def validate(self, vocab_size: int) -> None:
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0


class RowSampler:
    def __init__(self, params: SamplingParams, prompt_tokens: Sequence[int], vocab_size: int, device) -> None:
        self.params = params
        self.generator = None
        if params.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(params.seed)

    def observe(self, token_id: int) -> None:
        pass


def sample_rows(logits: torch.Tensor, samplers: List[RowSampler]) -> torch.Tensor:
    from llama.generation import sample_top_p

    if (
        all(s.params.seed is None for s in samplers)
        and len({(s.params.temperature, s.params.top_p) for s in samplers}) == 1
    ):
        p = samplers[0].params
        if p.temperature <= 0:
            return torch.argmax(logits, dim=-1)
        return sample_top_p(torch.softmax(logits / p.temperature, dim=-1), p.top_p)
    out = []
    for row, s in zip(logits, samplers):
        if s.params.temperature <= 0:
            out.append(torch.argmax(row))
            continue
        probs = torch.softmax(row / s.params.temperature, dim=-1)[None]
        ps, pi = torch.sort(probs, dim=-1, descending=True)
        ps = ps.masked_fill(torch.cumsum(ps, -1) - ps > s.params.top_p, 0.0)
        choice = torch.multinomial(ps / ps.sum(-1, keepdim=True), 1, generator=s.generator)
        out.append(pi[0, choice[0, 0]])
    return torch.stack(out)


def token_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, top: int
) -> Tuple[torch.Tensor, Optional[Tuple[torch.Tensor, torch.Tensor]]]:
    lp = torch.log_softmax(logits, dim=-1)
    chosen = lp.gather(-1, tokens[:, None])[:, 0]
    if top <= 0:
        return chosen, None
    values, ids = lp.topk(top, dim=-1)
    return chosen, (ids, values)
