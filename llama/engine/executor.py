"""Runs a planned step on the model: all that a model-parallel rank other than 0 needs.

Rank 0 broadcasts each step's `Plan` before running it; the other ranks `follow`, running the
same plans so every rank's collective calls line up. Messages are tuples: ("step", plan),
("draft", plan) for a pass of the draft model, ("idle",) heartbeats, ("result", value) for a
batch call's result, ("error", message) when rank 0 failed a batch call (the followers raise it
too), and ("shutdown",).
"""

from typing import Any, Callable, Optional, Tuple

import torch

from llama import distributed
from llama.engine.scheduler import Plan
from llama.model import Transformer, pack_segments


class FollowerError(RuntimeError):
    """Raised on a model-parallel rank > 0 when rank 0 failed the batch call being followed."""


class Executor:
    """Runs plans on `model`.

    Args:
        model: the loaded `Transformer`; its cache rows are the scheduler's slots.
        decode_fn: replaces `model.forward_decode` (e.g. a compiled version); settable later.
    """

    def __init__(self, model: Transformer, decode_fn: Optional[Callable[..., torch.Tensor]] = None):
        self.model = model
        self.decode_fn = decode_fn
        self.draft: Optional["Executor"] = None  # runs the draft model's passes, when there is one

    @property
    def device(self) -> torch.device:
        return self.model.tok_embeddings.weight.device

    @torch.inference_mode()
    def run(self, plan: Plan) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Run the plan's decode pass and packed prefill pass.

        Returns:
            (decode logits [decode rows, vocab] or None, prefill logits [chunks or prefill tokens,
            vocab] or None): the prefill logits hold each chunk's last position, or every position
            with `plan.all_logits`.
        """
        device = self.device
        decode_logits = prefill_logits = None
        if plan.trim:  # a paged cache's rows give back the blocks past what the scheduler keeps
            self.model.trim_cache_rows(plan.trim)
        for source, row, positions in plan.copy:  # prefixes other slots computed
            self.model.copy_cache_positions(source, row, positions)
        if plan.decode:
            if self.decode_fn is not None:  # compiled: the step reads the block table as it finds it
                self.model.fit_decode_rows(
                    [slot for slot, _, _ in plan.decode], [p + 1 for _, p, _ in plan.decode]
                )
            slots, positions, tokens = (torch.tensor(column, device=device) for column in zip(*plan.decode))
            decode = self.decode_fn or self.model.forward_decode
            decode_logits = decode(tokens, slots, positions)
        if plan.prefill:
            segments = pack_segments([(slot, start, len(chunk)) for slot, start, chunk in plan.prefill])
            tokens = torch.tensor([t for _, _, chunk in plan.prefill for t in chunk], device=device)
            prefill_logits = self.model.forward_segments(tokens, segments, last_only=not plan.all_logits)
        return decode_logits, prefill_logits

    def follow(self, until_result: bool = False) -> Any:
        """On model-parallel ranks > 0: run rank 0's plans until it shuts down (returns None) or,
        with `until_result`, until it broadcasts a batch result (returned).

        Raises:
            FollowerError: with `until_result`, when rank 0 broadcasts that the batch call failed.
        """
        while True:
            message = distributed.broadcast_from_first_rank(None)
            kind = message[0]
            if kind == "step":
                self.run(message[1])
            elif kind == "draft":
                self.draft.run(message[1])
            elif kind == "result" and until_result:
                return message[1]
            elif kind == "error" and until_result:
                raise FollowerError(f"model-parallel rank 0 failed: {message[1]}")
            elif kind == "shutdown":
                return None
