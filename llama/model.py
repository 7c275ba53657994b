"""The Code Llama Transformer: the Llama 2 equations, sharded with fairscale model parallelism.

This module is only the math. It knows nothing about files, prompts or process groups: the
fairscale layers ask fairscale for the model-parallel group, which the caller set up, and sum or
gather the ranks' partial results through `llama.distributed`.
"""

import warnings
from dataclasses import dataclass
from functools import lru_cache
from itertools import accumulate
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import fairscale.nn.model_parallel.initialize as fs_init
import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel.layers import (
    ColumnParallelLinear,
    ParallelEmbedding,
    RowParallelLinear,
)
from torch import nn

from llama import distributed, fused_decode, kernels, kv_cache, quantization

# A position (or one position per batch row) where a forward chunk starts in the KV cache.
StartPos = Union[int, Sequence[int]]


class Segment(NamedTuple):
    """One sequence's tokens inside a chunk whose tokens are laid out one after another."""

    row: int  # KV-cache row of the sequence
    offset: int  # index of its first token in the chunk
    length: int  # number of its tokens in the chunk
    start: int  # cache position of its first token


def pack_segments(chunks: Sequence[Tuple[int, int, int]]) -> List[Segment]:
    """Lay chunks given as (cache row, start position, length) end to end: their `Segment`s."""
    lengths = [length for _, _, length in chunks]
    ends = list(accumulate(lengths))
    return [Segment(row, end - n, n, start) for (row, start, n), end in zip(chunks, ends)]


def causal_visibility(
    n_queries: int, kv_len: int, first_pos: int, device: Optional[torch.device] = None
) -> torch.Tensor:
    """[n_queries, kv_len] bool: whether query i (at cache position `first_pos + i`) sees key j
    (cache position j) of its own row: iff j <= first_pos + i."""
    return torch.ones(n_queries, kv_len, dtype=torch.bool, device=device).tril(first_pos)


@dataclass
class AttentionInputs:
    """What every layer's attention needs to know about a chunk (computed once per forward).

    One of three layouts:
    - `segments`: several tokens per sequence laid end to end; each sequence attends to its own
      cache row, causally.
    - `rows`/`write_pos`/`kv_len`/`mask`/`lengths`: one new token per row of a contiguous range of
      cache rows, all rows in one batched attention call (`Transformer.forward`).
    - `row_index`/`write_pos`/`lengths`/`kv_len`: one new token for each of any cache rows
      (`Transformer.forward_decode`); `host_lengths` (eager only) lets each row attend over
      exactly its own positions, in place, so a row's result does not depend on the other rows;
      `row_range` (eager, where `DECODE_ATTENTION` says "range") marks rows that are consecutive
      cache rows, attended in one masked call over a view of them.
    """

    cos: torch.Tensor  # rotary angles, fp32, broadcastable to [B, L, 1, head_dim // 2]
    sin: torch.Tensor
    segments: Optional[List[Segment]] = None
    rows: Optional[slice] = None
    write_pos: Union[int, torch.Tensor] = 0
    kv_len: int = 0
    mask: Optional[torch.Tensor] = None
    lengths: Optional[torch.Tensor] = None  # [B] positions each row attends to (int64)
    row_index: Optional[torch.Tensor] = None  # [B] cache row of each batch row (int64)
    host_rows: Optional[List[int]] = None
    host_lengths: Optional[List[int]] = None
    row_range: Optional[slice] = None


# How an eager decode step attends where no attention kernel applies, per device type. "rows": each
# batch row over exactly its own positions, one call per row (a row's result does not depend on
# the other rows); "range": rows that are consecutive cache rows in one masked call over a view of
# them (fewer launches on a GPU), other rows as "rows". Both read the cache in place: nothing
# copies the rows' keys and values. Compiled steps share one masked call over the indexed rows.
DECODE_ATTENTION = {"cpu": "rows"}
DEFAULT_DECODE_ATTENTION = "range"  # GPUs and other devices


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

    def uses_kernel(self, x: torch.Tensor) -> bool:
        """Whether `forward(x)` runs `kernels.rms_norm`: bf16 on the CPU, where the kernel gives the
        torch operations' bits (`norm_kernel_agrees`)."""
        return kernels.rms_norm_applies(x, self.weight) and norm_kernel_agrees(
            x.shape[-1], self.eps, kernels.variant()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # bf16 on the CPU: the same operations in one kernel pass per row, when it agrees here.
        if self.uses_kernel(x):
            return kernels.rms_norm(x, self.weight, self.eps)
        return normalize(x.float(), self.eps).type_as(x) * self.weight


def normalize(xf: torch.Tensor, eps: float) -> torch.Tensor:
    """The fp32 rows `xf` divided by their root mean square (plus `eps`), as the reference does."""
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)


@lru_cache(maxsize=None)
def norm_kernel_agrees(dim: int, eps: float, variant: Optional[str]) -> bool:
    """Whether `kernels.rms_norm` gives the fp32 values of `normalize` and `RMSNorm`'s result bit for
    bit on random bf16 rows of `dim` with this torch build and CPU (the order of torch's sum depends
    on them), checked once per dim, eps and kernel `variant`; a RuntimeWarning when it does not."""
    gen = torch.Generator().manual_seed(dim)
    with torch.no_grad():
        x = (torch.randn(4, dim, generator=gen) * torch.rand(4, 1, generator=gen) * 4).to(torch.bfloat16)
        weight = torch.randn(dim, generator=gen).to(torch.bfloat16)
        normed = torch.empty(4, dim)
        out = kernels.rms_norm(x, weight, eps, normed)
        want = normalize(x.float(), eps)
        agrees = torch.equal(normed, want) and torch.equal(out, want.type_as(x) * weight)
    if not agrees:
        warnings.warn(
            f"the RMSNorm kernel ({variant}) does not reproduce torch's sum on rows of {dim} with this torch "
            "build; using torch's operations",
            RuntimeWarning,
            stacklevel=2,
        )
    return agrees


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
    if kernels.rotary_applies(x, cos):
        return kernels.rotary(x, cos, sin)
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
        if self.gather_output:
            out = distributed.model_parallel_gather_last_dim(out)
        return out


def project(x: torch.Tensor, layers: Sequence[ColumnLinear]) -> List[torch.Tensor]:
    """Each of `layers` applied to `x` (column-parallel layers that keep this rank's share of the
    outputs): in one kernel call when their weights allow it (`kernels.fused_linear`, or
    `quantization.fused_linear` for quantized weights: the same results), else one call each."""
    if not any(layer.gather_output for layer in layers):
        weights = [layer.weight for layer in layers]
        if kernels.fused_linear_applies(x, weights):
            return kernels.fused_linear(x, weights)
        if quantization.fused_linear_applies(x, weights):
            return quantization.fused_linear(x, weights)
    return [layer(x) for layer in layers]


class Embedding(ParallelEmbedding):
    """fairscale's parallel embedding (each rank holds a slice of every token's vector), its
    slices gathered with a collective that `torch.compile` can trace."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return distributed.model_parallel_gather_last_dim(F.embedding(tokens, self.weight))


class RowLinear(RowParallelLinear):
    """fairscale's row-parallel linear layer (inference only, input already split by rank),
    multiplying with `kernels.linear`, then summing the ranks' partial results."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return distributed.model_parallel_all_reduce(kernels.linear(x, self.weight))


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
        self.kv_cache: Optional[kv_cache.KVCache] = None

    def allocate_cache(
        self,
        max_batch_size: int,
        max_seq_len: int,
        dtype: torch.dtype,
        device: torch.device,
        kv_cache_dtype: Optional[str] = None,
        blocks: Optional[kv_cache.BlockTable] = None,
    ) -> None:
        """(Re)allocate this layer's KV cache (`llama.kv_cache`), zeroed: reads in `dtype`, stored
        as `kv_cache_dtype` (None: in `dtype`; "int8"), in the blocks of `blocks` when given.

        Raises:
            ValueError: for an unknown `kv_cache_dtype`.
        """
        # Layout [batch, kv_heads, seq, head_dim]: what scaled_dot_product_attention reads.
        shape = (max_batch_size, self.n_local_kv_heads, max_seq_len, self.head_dim)
        self.kv_cache = kv_cache.allocate(kv_cache_dtype, shape, dtype, device, blocks)

    @property
    def cache_k(self) -> Optional[torch.Tensor]:
        """The stored keys [rows, kv_heads, max_seq_len, head_dim] (int8 codes in an int8 cache);
        None before `allocate_cache`."""
        return None if self.kv_cache is None else self.kv_cache.keys

    @property
    def cache_v(self) -> Optional[torch.Tensor]:
        """The stored values, laid out as `cache_k`; None before `allocate_cache`."""
        return None if self.kv_cache is None else self.kv_cache.values

    # Query tokens per attention call over several tokens of a sequence: each block of queries
    # reads only the keys up to its last position (causal), and the mask stays small.
    query_block: int = 64

    def forward(self, x: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        q, k, v = project(x, (self.wq, self.wk, self.wv))
        q = q.view(bsz, seqlen, self.n_local_heads, self.head_dim)
        k = k.view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        v = v.view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        q, k = apply_rotary(q, inputs.cos, inputs.sin), apply_rotary(k, inputs.cos, inputs.sin)
        if inputs.row_index is not None:
            out = self._attend_rows(q, k, v, inputs)
        elif inputs.segments is None:
            out = self._attend_one_token_per_row(q, k, v, inputs)
        else:
            out = self._attend_segments(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), inputs.segments)
        return self.wo(out.reshape(bsz, seqlen, -1))

    def _attend_one_token_per_row(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: AttentionInputs
    ) -> torch.Tensor:
        """Decode step: q/k/v [B, 1, heads, D], one cache row per batch row; returns [B, 1, H*D]."""
        bsz, cache = q.shape[0], self.kv_cache
        cache.write_rows(inputs.rows, inputs.write_pos, k[:, 0], v[:, 0])
        if cache.decode_kernel_applies(q):
            heads = q.view(bsz, self.n_local_heads, self.head_dim)
            return cache.decode_attention(heads, inputs.lengths, inputs.rows).view(bsz, 1, -1)
        keys, values = cache.read(inputs.rows, inputs.kv_len)
        # Grouped-query attention without repeating K/V: the n_rep query heads that share a kv
        # head are stacked along the query axis, so every kv head is read once.
        q = q.view(bsz, self.n_local_kv_heads, self.n_rep, self.head_dim)
        mask = inputs.mask
        if mask is not None and self.n_rep > 1:
            mask = mask.expand(-1, -1, self.n_rep, -1)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        return out.reshape(bsz, 1, -1)

    def _attend_rows(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: AttentionInputs
    ) -> torch.Tensor:
        """One new token for each of any cache rows: q/k/v [B, 1, heads, D]; returns [B, 1, H*D]."""
        bsz, cache, rows = q.shape[0], self.kv_cache, inputs.row_index
        cache.write_rows(rows, inputs.write_pos, k[:, 0], v[:, 0])
        if cache.decode_kernel_applies(q):  # each row over its own positions, in place
            heads = q.view(bsz, self.n_local_heads, self.head_dim)
            return cache.decode_attention(heads, inputs.lengths, rows).view(bsz, 1, -1)
        if inputs.row_range is not None:  # consecutive cache rows: one masked call over a view
            rows = inputs.row_range
        elif inputs.host_lengths is not None:  # each row over exactly its own positions
            out = torch.empty_like(q)
            for b, (row, length) in enumerate(zip(inputs.host_rows, inputs.host_lengths)):
                query = q[b].view(1, self.n_local_kv_heads, self.n_rep, self.head_dim)
                keys, values = cache.read(slice(row, row + 1), length)
                attended = F.scaled_dot_product_attention(query, keys, values)
                out[b] = attended.view(1, self.n_local_heads, self.head_dim)
            return out.view(bsz, 1, -1)
        keys, values = cache.read(rows, inputs.kv_len)
        q = q.view(bsz, self.n_local_kv_heads, self.n_rep, self.head_dim)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=inputs.mask).reshape(bsz, 1, -1)

    def _attend_segments(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: List[Segment]
    ) -> torch.Tensor:
        """Tokens of several sequences one after another: q/k/v [T, heads, D]; returns [T, H*D]."""
        out = torch.empty_like(q)
        for seg in segments:
            end = seg.start + seg.length
            tokens = slice(seg.offset, seg.offset + seg.length)
            self.kv_cache.write_tokens(seg.row, seg.start, k[tokens], v[tokens])
            if self.kv_cache.prefill_kernel_applies(q):  # in place, whatever the storage
                out[tokens] = self.kv_cache.prefill_attention(q[tokens], seg.row, seg.start)
                continue
            cache_k, cache_v = self.kv_cache.visible(seg.row, end)  # [kv_heads, >= end, D]
            for first in range(0, seg.length, self.query_block):
                last = min(seg.length, first + self.query_block)
                n, kv_len = last - first, seg.start + last
                block = slice(seg.offset + first, seg.offset + last)
                visible = causal_visibility(n, kv_len, seg.start + first, q.device)
                mask = visible.expand(self.n_rep, n, kv_len).reshape(1, 1, self.n_rep * n, kv_len)
                queries = q[block].transpose(0, 1).reshape(1, self.n_local_kv_heads, self.n_rep * n, -1)
                attended = F.scaled_dot_product_attention(
                    queries, cache_k[None, :, :kv_len], cache_v[None, :, :kv_len], attn_mask=mask
                )
                out[block] = attended.view(self.n_local_heads, n, self.head_dim).transpose(0, 1)
        return out.flatten(1)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = ColumnLinear(dim, hidden_dim, bias=False, gather_output=False, init_method=_no_init)
        self.w2 = RowLinear(hidden_dim, dim, bias=False, input_is_parallel=True, init_method=_no_init)
        self.w3 = ColumnLinear(dim, hidden_dim, bias=False, gather_output=False, init_method=_no_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = project(x, (self.w1, self.w3))
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), inputs)
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
        self.tok_embeddings = Embedding(params.vocab_size, params.dim, init_method=_no_init)
        self.layers = nn.ModuleList(TransformerBlock(i, params) for i in range(params.n_layers))
        self.norm = RMSNorm(params.dim, eps=params.norm_eps)
        self.output = ColumnLinear(params.dim, params.vocab_size, bias=False, init_method=_no_init)
        self.kv_blocks: Optional[kv_cache.BlockTable] = None  # a paged cache's block table
        self._decode_layers: Optional[fused_decode.DecodeLayers] = None
        if torch.empty(0).device.type != "meta":
            self.allocate_cache(torch.get_default_dtype(), torch.empty(0).device)

    def allocate_cache(
        self,
        dtype: torch.dtype,
        device: Union[str, torch.device],
        kv_cache_dtype: Optional[str] = None,
        kv_cache_tokens: Optional[int] = None,
    ) -> None:
        """(Re)allocate every layer's KV cache, zeroed, on `device`: read in `dtype`, stored in
        `dtype` (kv_cache_dtype None) or as int8 codes and scales ("int8", `llama.kv_cache`).
        With `kv_cache_tokens`, the cache is paged: a pool of that many positions (in blocks of
        `kv_cache.KV_BLOCK_LEN`) shared by the rows through `kv_blocks`, instead of
        max_batch_size x max_seq_len positions.

        Raises:
            ValueError: for an unknown `kv_cache_dtype` or a `kv_cache_tokens` below 1.
        """
        kv_cache.check_kv_cache_dtype(kv_cache_dtype)
        device = torch.device(device)
        rows, max_seq_len = self.params.max_batch_size, self.params.max_seq_len
        self.kv_blocks = None
        self._decode_layers = None  # its tables point at the caches being replaced
        if kv_cache_tokens is not None:
            self.kv_blocks = kv_cache.BlockTable(rows, max_seq_len, kv_cache_tokens, device)
        for layer in self.layers:
            layer.attention.allocate_cache(rows, max_seq_len, dtype, device, kv_cache_dtype, self.kv_blocks)

    def _fit_blocks(self, row: int, end: int, shrink: bool) -> None:
        """A paged cache's row `row` holds the blocks of positions < end (`BlockTable.fit`)."""
        if self.kv_blocks is not None:
            self.kv_blocks.fit(row, end, shrink)

    def fit_decode_rows(self, rows: Sequence[int], lengths: Sequence[int]) -> None:
        """Before a decode pass: each row of a paged cache holds the blocks of its first `lengths`
        positions (taking blocks, never giving any back; nothing happens to a dense cache). The
        eager `forward_decode` does it itself; a compiled one cannot, so its caller does.

        Raises:
            kv_cache.CacheFull: if the pool has no free block for a row that needs one.
        """
        for row, length in zip(rows, lengths):
            self._fit_blocks(row, length, shrink=False)

    def copy_cache_positions(self, source: int, row: int, positions: int) -> None:
        """Copy the keys and values of positions 0 .. positions - 1 of cache row `source` into row
        `row` in every layer (a prefix `row`'s sequence shares with `source`'s), instead of
        computing them again.

        Raises:
            kv_cache.CacheFull: if a paged cache has no free blocks for `row`.
        """
        self._fit_blocks(row, positions, shrink=True)
        for layer in self.layers:
            layer.attention.kv_cache.copy_positions(source, row, positions)

    def trim_cache_rows(self, kept: Sequence[Tuple[int, int]]) -> None:
        """For each (row, positions) of `kept`, a paged cache's row keeps the blocks of its first
        `positions` positions only and gives the others back (their positions are never read
        again); a dense cache is left as it is."""
        for row, positions in kept:
            self._fit_blocks(row, positions, shrink=True)

    def _check_fits(self, rows: range, first_pos: int, end_pos: int) -> None:
        max_seq_len, max_batch = self.params.max_seq_len, self.params.max_batch_size
        if first_pos < 0 or end_pos > max_seq_len:
            raise ValueError(
                f"positions {first_pos}..{end_pos - 1} do not fit in the KV cache of "
                f"max_seq_len={max_seq_len}"
            )
        if rows.start < 0 or rows.stop > max_batch:
            raise ValueError(
                f"batch rows {rows.start}..{rows.stop - 1} do not fit in the KV cache of "
                f"max_batch_size={max_batch}"
            )

    def _rotary(self, positions: torch.Tensor) -> List[torch.Tensor]:
        """cos and sin of the rotary angles for `positions` [B, L]: each [B, L, 1, head_dim // 2]."""
        angles = rotary_angles(positions, self.params.head_dim, self.params.rope_theta)[:, :, None, :]
        return [angles.cos(), angles.sin()]

    def _attention_inputs(
        self, start_pos: StartPos, bsz: int, seqlen: int, device: torch.device, row_offset: int
    ) -> AttentionInputs:
        """Rotary angles, cache rows and positions, and attention layout for a [B, L] chunk."""
        if isinstance(start_pos, int):
            starts: List[int] = [start_pos] * bsz
        else:
            starts = [int(s) for s in start_pos]
            if len(starts) != bsz:
                raise ValueError(f"start_pos has {len(starts)} entries for a batch of {bsz} rows")
        self._check_fits(range(row_offset, row_offset + bsz), min(starts), max(starts) + seqlen)
        for b, start in enumerate(starts):
            self._fit_blocks(row_offset + b, start + seqlen, shrink=seqlen > 1)
        uniform = all(s == starts[0] for s in starts)
        if not uniform and seqlen != 1:
            raise ValueError("per-row start positions are supported for one token per row only")

        start_t = torch.tensor(starts, device=device)
        positions = start_t[:, None] + torch.arange(seqlen, device=device)  # [B, L]
        cos, sin = self._rotary(positions)
        if seqlen > 1:
            segments = [Segment(row_offset + b, b * seqlen, seqlen, starts[b]) for b in range(bsz)]
            return AttentionInputs(cos, sin, segments=segments)
        kv_len = max(starts) + 1
        mask = None  # rows at the same position see every cached position
        if not uniform:  # key j is visible to row b iff j <= its position
            keys = torch.arange(kv_len, device=device)
            mask = (keys[None, :] <= start_t[:, None])[:, None, None, :]  # [B, 1, 1, kv_len]
        return AttentionInputs(
            cos,
            sin,
            rows=slice(row_offset, row_offset + bsz),
            write_pos=starts[0] if uniform else start_t,
            kv_len=kv_len,
            mask=mask,
            lengths=start_t + 1,
        )

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
        inputs = self._attention_inputs(start_pos, bsz, seqlen, tokens.device, row_offset)
        h = self._layers(self.tok_embeddings(tokens), inputs)
        if last_only:
            h = h[:, -1:]
        return self.output(self.norm(h)).float()

    def forward_packed(
        self, sequences: Sequence[torch.Tensor], *, row_offset: int = 0, last_only: bool = False
    ) -> torch.Tensor:
        """Prefill several sequences of any lengths in one pass, each into its own cache row.

        The tokens are laid end to end (no padding), so every matrix product runs once over all
        of them; attention stays within each sequence. Sequence i starts at position 0 of cache
        row `row_offset + i`.

        Args:
            sequences: 1-D token-id tensors, each at least one token long.
            row_offset: cache row of the first sequence.
            last_only: logits of each sequence's last token only.

        Returns:
            float32 logits: [len(sequences), vocab] with `last_only`, else [total tokens, vocab]
            (the sequences' positions one after another).

        Raises:
            ValueError: if a sequence is empty or the sequences do not fit in the cache.
        """
        lengths = [int(seq.numel()) for seq in sequences]
        if not lengths or min(lengths) < 1:
            raise ValueError("forward_packed needs at least one sequence, each with at least one token")
        tokens = torch.cat([seq.reshape(-1) for seq in sequences])
        segments = pack_segments([(row_offset + i, 0, n) for i, n in enumerate(lengths)])
        return self.forward_segments(tokens, segments, last_only=last_only)

    def forward_segments(
        self, tokens: torch.Tensor, segments: Sequence[Segment], *, last_only: bool = False
    ) -> torch.Tensor:
        """Run chunks of several sequences, laid end to end, each at its own cache row and position.

        Each segment's tokens are written to its cache row from `segment.start` on and attend
        causally to everything before them in that row (earlier chunks, or a reused prefix).

        Args:
            tokens: 1-D token ids, the segments' tokens one after another (see `pack_segments`).
            segments: where each chunk lies in `tokens` and in the cache.
            last_only: logits of each segment's last token only.

        Returns:
            float32 logits: [len(segments), vocab] with `last_only`, else [len(tokens), vocab].

        Raises:
            ValueError: if a segment does not fit in the cache.
        """
        for seg in segments:
            self._check_fits(range(seg.row, seg.row + 1), seg.start, seg.start + seg.length)
        for seg in segments:  # what a chunk writes ends its row: later positions are a previous sequence's
            self._fit_blocks(seg.row, seg.start + seg.length, shrink=True)
        device = tokens.device
        positions = torch.cat(
            [torch.arange(seg.start, seg.start + seg.length, device=device) for seg in segments]
        )[None]
        inputs = AttentionInputs(*self._rotary(positions), segments=list(segments))
        h = self._layers(self.tok_embeddings(tokens.reshape(1, -1)), inputs)[0]
        if last_only:
            h = h[torch.tensor([seg.offset + seg.length - 1 for seg in segments], device=device)]
        return self.output(self.norm(h)).float()

    def forward_decode(
        self, tokens: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """One new token for each of any cache rows (the decode step of a running batch).

        Token b is written at position `positions[b]` of cache row `rows[b]` and attends to that
        row's positions 0..positions[b]. Eager, every row reads its cache row in place
        (`DECODE_ATTENTION`), on the CPU over exactly its own positions, so its logits are the
        same whatever other rows share the step. Compiled, the rows share one masked attention
        call.

        Args:
            tokens, rows, positions: [B] int64 tensors on the model's device.

        Returns:
            float32 logits [B, vocab].

        Raises:
            ValueError: if a row or position does not fit in the cache (checked when eager).
        """
        lengths = positions + 1
        host_rows = host_lengths = row_range = None
        kv_len = self.params.max_seq_len
        if not torch.compiler.is_compiling():
            host_rows, host_lengths = rows.tolist(), lengths.tolist()
            for row, length in zip(host_rows, host_lengths):
                self._check_fits(range(row, row + 1), length - 1, length)
            self.fit_decode_rows(host_rows, host_lengths)
            decode_layers = self._fused_decode_layers(len(host_rows))
            if decode_layers is not None:
                cos, sin = (angles.view(len(host_rows), -1) for angles in self._rotary(positions[:, None]))
                embedded = self.tok_embeddings(tokens)
                h = decode_layers.run(embedded, rows.to(torch.int64), lengths.to(torch.int64), cos, sin)
                return self.output(self.norm(h[:, None])).float()[:, 0]
            kv_len = max(host_lengths)
            plan = DECODE_ATTENTION.get(tokens.device.type, DEFAULT_DECODE_ATTENTION)
            first = host_rows[0] if host_rows else 0
            if plan == "range" and host_rows == list(range(first, first + len(host_rows))):
                row_range = slice(first, first + len(host_rows))
        mask = None  # each row attends over exactly its own positions: no mask needed
        if host_lengths is None or row_range is not None:
            keys = torch.arange(kv_len, device=tokens.device)
            mask = (keys[None, :] < lengths[:, None])[:, None, None, :]  # [B, 1, 1, kv_len]
        inputs = AttentionInputs(
            *self._rotary(positions[:, None]),
            write_pos=positions,
            kv_len=kv_len,
            mask=mask,
            lengths=lengths,
            row_index=rows,
            host_rows=host_rows,
            host_lengths=host_lengths,
            row_range=row_range,
        )
        h = self._layers(self.tok_embeddings(tokens[:, None]), inputs)
        return self.output(self.norm(h)).float()[:, 0]

    # Whether an eager decode step may run each layer in one kernel call (`llama.fused_decode`):
    # the same logits bit for bit; False runs the layers one by one (to compare the two).
    fuse_decode_layers: bool = True

    def _apply(self, fn, *args, **kwargs):
        # `to`, `half`, `cuda` and the like replace the tensors the decode-layer tables point at.
        self._decode_layers = None
        return super()._apply(fn, *args, **kwargs)

    def _fused_decode_layers(self, rows: int) -> Optional[fused_decode.DecodeLayers]:
        """The layer tables of `llama.fused_decode` when a decode step of `rows` rows may use them."""
        if not self.fuse_decode_layers:
            return None
        if self._decode_layers is None:
            self._decode_layers = fused_decode.DecodeLayers(self)
        return self._decode_layers if self._decode_layers.applies(rows) else None

    def _layers(self, h: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        for layer in self.layers:
            h = layer(h, inputs)
        return h
