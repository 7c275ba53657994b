"""The Code Llama Transformer: the Llama 2 equations, sharded with fairscale model parallelism.

This module is only the math. It knows nothing about files, prompts or process groups: the
fairscale layers ask fairscale for the model-parallel group, which the caller set up.
"""

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import fairscale.nn.model_parallel.initialize as fs_init
import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel.layers import (
    ColumnParallelLinear,
    ParallelEmbedding,
    RowParallelLinear,
)
from fairscale.nn.model_parallel.mappings import (
    gather_from_model_parallel_region,
    reduce_from_model_parallel_region,
)
from torch import nn

from llama import kernels

# A position (or one position per batch row) where a forward chunk starts in the KV cache.
StartPos = Union[int, Sequence[int]]


@dataclass
class ModelArgs:
    """Hyper-parameters of a Llama 2 / Code Llama model (the fields of `params.json`).

    `max_batch_size` and `max_seq_len` are not part of the checkpoint: they size the KV cache.
    """

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None
    vocab_size: int = -1
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_batch_size: int = 32
    max_seq_len: int = 2048

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads (equal to `n_heads` unless grouped-query attention)."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """SwiGLU hidden size: 2/3 of 4*dim, times the multiplier, rounded up to `multiple_of`."""
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32, as the reference does, then return to the activation dtype.
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rotary_angles(positions: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """Rotation angles (fp32) for `positions` [..., L]: returns [..., L, head_dim // 2].

    Always fp32: with theta = 1e6 and positions in the tens of thousands, half-precision
    angles are off by whole radians.
    """
    exponents = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32)
    inv_freq = 1.0 / (theta ** (exponents / head_dim))
    return positions.to(torch.float32)[..., None] * inv_freq


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (2i, 2i+1) of each head of `x` [B, L, H, D] by the given angles.

    `cos`/`sin` are [B or 1, L, 1, D/2] fp32; the rotation runs in fp32 and the result is
    cast back to `x`'s dtype.
    """
    pairs = x.float().unflatten(-1, (-1, 2))
    real, imag = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


def _no_init(tensor: torch.Tensor) -> torch.Tensor:
    # Weights come from a checkpoint: skip fairscale's random initialisation.
    return tensor


class ColumnLinear(ColumnParallelLinear):
    """fairscale's column-parallel linear layer (inference only), multiplying with `kernels.linear`.

    The input is already replicated on every rank, so only the optional gather remains.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = kernels.linear(x, self.weight)
        if self.gather_output and fs_init.get_model_parallel_world_size() > 1:
            out = gather_from_model_parallel_region(out)
        return out


class RowLinear(RowParallelLinear):
    """fairscale's row-parallel linear layer (inference only, input already split by rank),
    multiplying with `kernels.linear`, then summing the ranks' partial results."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = kernels.linear(x, self.weight)
        if fs_init.get_model_parallel_world_size() > 1:
            out = reduce_from_model_parallel_region(out)
        return out


class Attention(nn.Module):
    """Grouped-query self-attention with a preallocated KV cache."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        mp = fs_init.get_model_parallel_world_size()
        self.head_dim = args.head_dim
        self.n_local_heads = args.n_heads // mp
        self.n_local_kv_heads = args.kv_heads // mp
        self.n_rep = self.n_local_heads // self.n_local_kv_heads
        self.wq = ColumnLinear(
            args.dim, args.n_heads * self.head_dim, bias=False, gather_output=False, init_method=_no_init
        )
        self.wk = ColumnLinear(
            args.dim, args.kv_heads * self.head_dim, bias=False, gather_output=False, init_method=_no_init
        )
        self.wv = ColumnLinear(
            args.dim, args.kv_heads * self.head_dim, bias=False, gather_output=False, init_method=_no_init
        )
        self.wo = RowLinear(
            args.n_heads * self.head_dim, args.dim, bias=False, input_is_parallel=True, init_method=_no_init
        )
        self.cache_k: Optional[torch.Tensor] = None
        self.cache_v: Optional[torch.Tensor] = None

    def allocate_cache(
        self, max_batch_size: int, max_seq_len: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        # Layout [batch, kv_heads, seq, head_dim]: what scaled_dot_product_attention reads.
        shape = (max_batch_size, self.n_local_kv_heads, max_seq_len, self.head_dim)
        self.cache_k = torch.zeros(shape, dtype=dtype, device=device)
        self.cache_v = torch.zeros(shape, dtype=dtype, device=device)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        rows: slice,
        write_pos: Union[int, torch.Tensor],
        kv_len: int,
        mask: Optional[torch.Tensor],
    ) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        q = self.wq(x).view(bsz, seqlen, self.n_local_heads, self.head_dim)
        k = self.wk(x).view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        v = self.wv(x).view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

        cache_k, cache_v = self.cache_k[rows], self.cache_v[rows]
        if isinstance(write_pos, int):
            cache_k[:, :, write_pos : write_pos + seqlen] = k.transpose(1, 2)
            cache_v[:, :, write_pos : write_pos + seqlen] = v.transpose(1, 2)
        else:  # one position per row, one token per row
            batch = torch.arange(bsz, device=x.device)
            cache_k[batch, :, write_pos] = k[:, 0]
            cache_v[batch, :, write_pos] = v[:, 0]
        keys, values = cache_k[:, :, :kv_len], cache_v[:, :, :kv_len]

        # Grouped-query attention without repeating K/V: the n_rep query heads that share a
        # kv head are stacked along the query axis, so every kv head is read once.
        q = q.transpose(1, 2).reshape(bsz, self.n_local_kv_heads, self.n_rep * seqlen, self.head_dim)
        if mask is not None and self.n_rep > 1:
            mask = mask.unsqueeze(2).expand(-1, -1, self.n_rep, -1, -1).flatten(2, 3)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        out = out.view(bsz, self.n_local_heads, seqlen, self.head_dim).transpose(1, 2)
        return self.wo(out.reshape(bsz, seqlen, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = ColumnLinear(dim, hidden_dim, bias=False, gather_output=False, init_method=_no_init)
        self.w2 = RowLinear(hidden_dim, dim, bias=False, input_is_parallel=True, init_method=_no_init)
        self.w3 = ColumnLinear(dim, hidden_dim, bias=False, gather_output=False, init_method=_no_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x: torch.Tensor, *attention_args) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), *attention_args)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """A Llama 2 / Code Llama decoder with one KV cache of `max_batch_size x max_seq_len`.

    Built from fairscale parallel layers, so fairscale model parallelism must be initialised
    (a one-rank group is enough). The KV cache is allocated in the current default dtype and
    device; `allocate_cache` re-allocates it (e.g. after the weights were loaded elsewhere).
    """

    def __init__(self, params: ModelArgs):
        super().__init__()
        self.params = params
        self.vocab_size = params.vocab_size
        self.n_layers = params.n_layers
        self.tok_embeddings = ParallelEmbedding(params.vocab_size, params.dim, init_method=_no_init)
        self.layers = nn.ModuleList(TransformerBlock(i, params) for i in range(params.n_layers))
        self.norm = RMSNorm(params.dim, eps=params.norm_eps)
        self.output = ColumnLinear(params.dim, params.vocab_size, bias=False, init_method=_no_init)
        if torch.empty(0).device.type != "meta":
            self.allocate_cache(torch.get_default_dtype(), torch.empty(0).device)

    def allocate_cache(self, dtype: torch.dtype, device: Union[str, torch.device]) -> None:
        """(Re)allocate every layer's KV cache, zeroed, in `dtype` on `device`."""
        for layer in self.layers:
            layer.attention.allocate_cache(
                self.params.max_batch_size, self.params.max_seq_len, dtype, torch.device(device)
            )

    def _attention_inputs(
        self, start_pos: StartPos, bsz: int, seqlen: int, device: torch.device, row_offset: int
    ) -> Tuple[torch.Tensor, torch.Tensor, slice, Union[int, torch.Tensor], int, Optional[torch.Tensor]]:
        """Rotary angles, cache rows and write positions, and the attention mask for a chunk."""
        max_seq_len, max_batch = self.params.max_seq_len, self.params.max_batch_size
        if isinstance(start_pos, int):
            starts: List[int] = [start_pos] * bsz
        else:
            starts = [int(s) for s in start_pos]
            if len(starts) != bsz:
                raise ValueError(f"start_pos has {len(starts)} entries for a batch of {bsz} rows")
        if min(starts) < 0 or max(starts) + seqlen > max_seq_len:
            raise ValueError(
                f"positions {min(starts)}..{max(starts) + seqlen - 1} do not fit in the KV cache of "
                f"max_seq_len={max_seq_len}"
            )
        if row_offset < 0 or row_offset + bsz > max_batch:
            raise ValueError(
                f"batch rows {row_offset}..{row_offset + bsz - 1} do not fit in the KV cache of "
                f"max_batch_size={max_batch}"
            )
        uniform = all(s == starts[0] for s in starts)
        if not uniform and seqlen != 1:
            raise ValueError("per-row start positions are supported for one token per row only")
        kv_len = max(starts) + seqlen

        start_t = torch.tensor(starts, device=device)
        positions = start_t[:, None] + torch.arange(seqlen, device=device)  # [B, L]
        angles = rotary_angles(positions, self.params.head_dim, self.params.rope_theta)
        cos, sin = angles.cos()[:, :, None, :], angles.sin()[:, :, None, :]

        if uniform and seqlen == 1:
            mask = None  # one new token sees every cached position
        else:
            # Key j is visible to the query at absolute position p iff j <= p. Correct for any
            # start position and chunk length (not only square prompt chunks).
            keys = torch.arange(kv_len, device=device)
            mask = (keys[None, None, :] <= positions[:, :, None])[:, None]  # [B, 1, L, kv_len]
        write_pos: Union[int, torch.Tensor] = starts[0] if uniform else start_t
        rows = slice(row_offset, row_offset + bsz)
        return cos, sin, rows, write_pos, kv_len, mask

    def forward(
        self,
        tokens: torch.Tensor,
        start_pos: StartPos = 0,
        *,
        last_only: bool = False,
        row_offset: int = 0,
    ) -> torch.Tensor:
        """Run `tokens` [B, L] through the model, reading and extending the KV cache.

        Args:
            tokens: token ids, [batch, chunk length].
            start_pos: cache position of the chunk's first token: one int for every row, or one
                int per row (then the chunk must be a single token per row).
            last_only: compute logits for the last position only (what generation needs).
            row_offset: first KV-cache row used by this batch (rows row_offset..row_offset+B-1).

        Returns:
            float32 logits, [B, L, vocab] (or [B, 1, vocab] with `last_only`).

        Raises:
            ValueError: if the positions or rows do not fit in the preallocated cache.
        """
        bsz, seqlen = tokens.shape
        h = self.tok_embeddings(tokens)
        attention_args = self._attention_inputs(start_pos, bsz, seqlen, tokens.device, row_offset)
        for layer in self.layers:
            h = layer(h, *attention_args)
        if last_only:
            h = h[:, -1:]
        return self.output(self.norm(h)).float()
