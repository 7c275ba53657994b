"""The key/value cache of one attention layer: how it is stored, written and read.

A cache holds, for each of `rows` sequences (the engine's slots), the keys and values of every
position up to `max_seq_len`, for the layer's kv heads. Attention talks to it in terms of cache
rows and positions only:

- `write_tokens` / `write_rows` store new keys and values (a chunk of one sequence, or one
  token for each of several rows);
- `read` gives the keys and values of positions 0 .. length - 1 of some rows in the activation
  dtype (what torch's attention reads), and `visible` those of one row for a prefill chunk;
- `decode_kernel_applies` / `decode_attention` run the hand-written decode attention over the
  stored form, in place.

Two storages:

- `DenseKVCache` (`kv_cache_dtype=None`): keys and values in the activation dtype, laid out
  [rows, kv_heads, max_seq_len, head_dim]; reads are views, nothing is copied.
- `Int8KVCache` (`kv_cache_dtype="int8"`): int8 codes in that layout and one fp32 scale per
  (row, kv head, position), symmetric: scale = absmax / 127 over the head_dim values of that
  token and head, code = round(value / scale). Written values are quantized; the decode kernel
  reads the codes and scales in place, every other read dequantizes the positions it asks for.
  fp32 scales (not bf16) keep every dequantized value within scale / 2 of the written one: a bf16
  scale can be off by 2^-9 of itself, which moves a value with code 127 by a further 0.25 scale
  (half the codes' own rounding). They cost 4 bytes per head_dim values (3% at head_dim 128).

Memory on demand (CPU): both storages live in anonymous memory mappings (`zeroed`), whose pages the
operating system hands out, zero-filled, when they are first written. A cache of 8 rows of 100,000
positions takes memory only for the positions sequences have reached, so right after loading the
process holds about the weights. When a prompt chunk is written into a row, the pages of the row's
positions after it (left by the row's previous sequence, never read again) are returned
(`madvise(MADV_DONTNEED)`), so memory follows the sequences in the rows: live ones, and the finished
ones kept for prefix reuse. On other devices the cache is allocated (and zeroed) in full.

Both keep the row/position addressing out of the attention code, so a block-table (paged)
storage can be added here as a third class that maps (row, position) through its table.
"""

import math
import mmap
from typing import Dict, Optional, Sequence, Tuple, Union

import torch

from llama import kernels

# `kv_cache_dtype` values besides None (the activation dtype).
KV_CACHE_DTYPES = ("int8",)
# Bytes of one int8 cache scale (fp32).
INT8_SCALE_BYTES = 4
INT8_MAX = 127

# Which cache rows a call reads or writes: one row, a contiguous range, or any rows (a [B] tensor).
Rows = Union[int, slice, torch.Tensor]
# Where a one-token-per-row write goes: one position for every row, or one per row ([B] tensor).
Positions = Union[int, torch.Tensor]


def check_kv_cache_dtype(kv_cache_dtype: Optional[str]) -> Optional[str]:
    """`kv_cache_dtype` if it names a cache storage: None (the activation dtype) or "int8".

    Raises:
        ValueError: for anything else, naming the accepted values.
    """
    if kv_cache_dtype is None or kv_cache_dtype in KV_CACHE_DTYPES:
        return kv_cache_dtype
    raise ValueError(
        f"unknown kv_cache_dtype {kv_cache_dtype!r}: use None (the cache in the model's dtype) or "
        f"{' or '.join(repr(name) for name in KV_CACHE_DTYPES)} (int8 codes with one scale per token "
        "and head, half the memory of a 16-bit cache)"
    )


def bytes_per_position(kv_cache_dtype: Optional[str], dtype: torch.dtype, head_dim: int) -> int:
    """Bytes the cache takes for the keys (or the values) of one position of one kv head: head_dim
    values in `dtype` (the activation dtype), or head_dim int8 codes and their fp32 scale.

    Raises:
        ValueError: for an unknown `kv_cache_dtype`.
    """
    if check_kv_cache_dtype(kv_cache_dtype) == "int8":
        return head_dim + INT8_SCALE_BYTES
    return head_dim * torch.empty(0, dtype=dtype).element_size()


def quantize_int8(values: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes of `values` [..., D] with one fp32 scale per vector of D.

    Returns:
        (codes [..., D] int8, scales [...] fp32): scale = absmax / 127 of the vector (computed in
        fp32), codes = round(value / scale) clamped to [-127, 127]; an all-zero vector gets
        scale 0 and codes 0.
    """
    wide = values.float()
    scales = wide.abs().amax(dim=-1) / INT8_MAX
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = torch.round(wide / safe[..., None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return codes, scales


def dequantize_int8(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """codes [..., D] * scales [...] computed in fp32, returned in `dtype` (one rounding)."""
    return (codes.float() * scales[..., None]).to(dtype)


def zeroed(
    shape: Sequence[int], dtype: torch.dtype, device: torch.device
) -> Tuple[torch.Tensor, Optional[mmap.mmap]]:
    """A zero tensor of `shape`, and on the CPU the anonymous memory mapping that holds it (None
    elsewhere): its pages take memory only once written (see the module docstring)."""
    nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    if torch.device(device).type != "cpu" or nbytes == 0:
        return torch.zeros(shape, dtype=dtype, device=device), None
    mapping = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE)
    # The tensor keeps the mapping alive (it holds the buffer); pages are zero until written.
    return torch.frombuffer(mapping, dtype=torch.uint8).view(dtype).view(*shape), mapping


def release_positions(tensor: torch.Tensor, mapping: Optional[mmap.mmap], row: int, start: int) -> None:
    """Return to the operating system the whole pages that hold positions `start` and later of
    cache row `row` of `tensor` [rows, kv_heads, max_seq_len, ...] (which lives in `mapping`, as
    `zeroed` makes it); they read as zeros afterwards. Nothing happens without a mapping."""
    if mapping is None or start >= tensor.shape[2]:
        return
    size, page = tensor.element_size(), mmap.PAGESIZE
    for head in range(tensor.shape[1]):
        base = row * tensor.stride(0) + head * tensor.stride(1)
        first = (base + start * tensor.stride(2)) * size
        last = (base + tensor.shape[2] * tensor.stride(2)) * size
        first, last = -(-first // page) * page, last // page * page
        if last > first:
            mapping.madvise(mmap.MADV_DONTNEED, first, last - first)


class DenseKVCache:
    """Keys and values in the activation dtype, [rows, kv_heads, max_seq_len, head_dim] each
    (what scaled_dot_product_attention and the bf16 kernels read in place)."""

    kv_cache_dtype: Optional[str] = None

    def __init__(
        self,
        rows: int,
        kv_heads: int,
        max_seq_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        shape = (rows, kv_heads, max_seq_len, head_dim)
        self.dtype = dtype
        self.keys, key_mapping = zeroed(shape, dtype, device)
        self.values, value_mapping = zeroed(shape, dtype, device)
        self._mappings: Dict[str, Optional[mmap.mmap]] = {"keys": key_mapping, "values": value_mapping}

    def write_tokens(self, row: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store keys/values `k`, `v` [n, kv_heads, D] at positions start .. start + n - 1 of `row`;
        the row's later positions (a previous sequence's) give their memory back."""
        end = start + k.shape[0]
        self.keys[row, :, start:end] = k.transpose(0, 1)
        self.values[row, :, start:end] = v.transpose(0, 1)
        for name, mapping in self._mappings.items():
            release_positions(getattr(self, name), mapping, row, end)

    def write_rows(self, rows: Rows, positions: Positions, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store one token's keys/values `k`, `v` [B, kv_heads, D] for each of B rows: batch row b
        at cache row `rows[b]` (a slice or [B] tensor), position `positions` (one int for all, or a
        [B] tensor)."""
        index = _row_position_index(rows, positions, k.shape[0], k.device)
        self.keys[index] = _at_position(k, positions)
        self.values[index] = _at_position(v, positions)

    def read(self, rows: Rows, length: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of positions 0 .. length - 1 of `rows` (views): [kv_heads, length, D] for
        one row, else [B, kv_heads, length, D]."""
        return self.keys[rows, :, :length], self.values[rows, :, :length]

    def visible(self, row: int, end: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of `row` [kv_heads, >= end, D] for a prefill chunk ending at position
        end - 1, in the activation dtype (here: the whole row, a view)."""
        return self.keys[row], self.values[row]

    def decode_kernel_applies(self, q: torch.Tensor) -> bool:
        """Whether `decode_attention(q, ...)` runs the hand-written kernel for queries `q`."""
        return kernels.attention_applies(q, self.keys)

    def prefill_kernel_applies(self, q: torch.Tensor) -> bool:
        """Whether `prefill_attention(q, ...)` runs the hand-written kernel for queries `q` [L, heads, D]."""
        return kernels.prefill_attention_applies(q, self.keys[0])

    def prefill_attention(self, q: torch.Tensor, row: int, start: int) -> torch.Tensor:
        """The prefill-attention kernel (`kernels.prefill_attention`) over `row` in place: the
        tokens of `q` [L, heads, D] at positions start .. start + L - 1 (already written), each
        over the positions up to its own. Check `prefill_kernel_applies`."""
        return kernels.prefill_attention(q, self.keys[row], self.values[row], start)

    def decode_attention(
        self, q: torch.Tensor, lengths: torch.Tensor, rows: Union[slice, torch.Tensor]
    ) -> torch.Tensor:
        """The decode-attention kernel (`kernels.decode_attention`) over the cache in place: batch
        row b of `q` [B, heads, D] attends to the first `lengths[b]` positions of its cache row
        (rows[b] of a [B] tensor, or the b-th row of a slice). Check `decode_kernel_applies`."""
        if isinstance(rows, slice):
            return kernels.decode_attention(q, self.keys[rows], self.values[rows], lengths)
        return kernels.decode_attention(q, self.keys, self.values, lengths, rows)


class Int8KVCache:
    """Keys and values as int8 codes [rows, kv_heads, max_seq_len, head_dim] with one fp32 scale
    per (row, kv head, position) (see the module docstring); reads give the activation dtype."""

    kv_cache_dtype: Optional[str] = "int8"

    def __init__(
        self,
        rows: int,
        kv_heads: int,
        max_seq_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        shape = (rows, kv_heads, max_seq_len, head_dim)
        self.dtype = dtype  # of what reads return
        self._mappings: Dict[str, Optional[mmap.mmap]] = {}
        self.keys, self._mappings["keys"] = zeroed(shape, torch.int8, device)
        self.values, self._mappings["values"] = zeroed(shape, torch.int8, device)
        self.key_scales, self._mappings["key_scales"] = zeroed(shape[:-1], torch.float32, device)
        self.value_scales, self._mappings["value_scales"] = zeroed(shape[:-1], torch.float32, device)

    def _store(self, index: tuple, k: torch.Tensor, v: torch.Tensor) -> None:
        # The index never selects along head_dim, so it addresses the scales as it does the codes.
        self.keys[index], self.key_scales[index] = quantize_int8(k)
        self.values[index], self.value_scales[index] = quantize_int8(v)

    def write_tokens(self, row: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Quantize and store `k`, `v` [n, kv_heads, D] at positions start .. start + n - 1 of `row`;
        the row's later positions give their memory back (see `DenseKVCache.write_tokens`)."""
        index = (row, slice(None), slice(start, start + k.shape[0]))
        self._store(index, k.transpose(0, 1), v.transpose(0, 1))
        for name, mapping in self._mappings.items():
            release_positions(getattr(self, name), mapping, row, start + k.shape[0])

    def write_rows(self, rows: Rows, positions: Positions, k: torch.Tensor, v: torch.Tensor) -> None:
        """Quantize and store one token's `k`, `v` [B, kv_heads, D] for each of B rows (see
        `DenseKVCache.write_rows`)."""
        index = _row_position_index(rows, positions, k.shape[0], k.device)
        self._store(index, _at_position(k, positions), _at_position(v, positions))

    def read(self, rows: Rows, length: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Positions 0 .. length - 1 of `rows`, dequantized into new tensors in the activation
        dtype: [kv_heads, length, D] for one row, else [B, kv_heads, length, D]."""
        index = (rows, slice(None), slice(None, length))
        return (
            dequantize_int8(self.keys[index], self.key_scales[index], self.dtype),
            dequantize_int8(self.values[index], self.value_scales[index], self.dtype),
        )

    def visible(self, row: int, end: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Positions 0 .. end - 1 of `row` [kv_heads, end, D], dequantized into a temporary in the
        activation dtype (the prefill chunk's keys and values, where the kernel does not apply)."""
        return self.read(row, end)

    def decode_kernel_applies(self, q: torch.Tensor) -> bool:
        """Whether `decode_attention(q, ...)` runs the hand-written int8 kernel for queries `q`."""
        return kernels.int8_attention_applies(q, self.keys)

    def prefill_kernel_applies(self, q: torch.Tensor) -> bool:
        """Whether `prefill_attention(q, ...)` runs the hand-written int8 kernel for `q` [L, heads, D]."""
        return kernels.prefill_attention_int8_applies(q, self.keys[0])

    def prefill_attention(self, q: torch.Tensor, row: int, start: int) -> torch.Tensor:
        """The int8 prefill-attention kernel (`kernels.prefill_attention_int8`) over the codes and
        scales of `row` in place (see `DenseKVCache.prefill_attention`)."""
        return kernels.prefill_attention_int8(
            q, self.keys[row], self.values[row], self.key_scales[row], self.value_scales[row], start
        )

    def decode_attention(
        self, q: torch.Tensor, lengths: torch.Tensor, rows: Union[slice, torch.Tensor]
    ) -> torch.Tensor:
        """The int8 decode-attention kernel (`kernels.decode_attention_int8`) over the codes and
        scales in place (see `DenseKVCache.decode_attention`)."""
        if isinstance(rows, slice):
            return kernels.decode_attention_int8(
                q, self.keys[rows], self.values[rows], self.key_scales[rows], self.value_scales[rows], lengths
            )
        return kernels.decode_attention_int8(
            q, self.keys, self.values, self.key_scales, self.value_scales, lengths, rows
        )


KVCache = Union[DenseKVCache, Int8KVCache]


def allocate(
    kv_cache_dtype: Optional[str],
    shape: Sequence[int],
    dtype: torch.dtype,
    device: torch.device,
) -> KVCache:
    """A zeroed cache of `shape` (rows, kv_heads, max_seq_len, head_dim) whose reads are in `dtype`
    (the activation dtype), stored as `kv_cache_dtype` (None: in `dtype`; "int8").

    Raises:
        ValueError: for an unknown `kv_cache_dtype`.
    """
    if check_kv_cache_dtype(kv_cache_dtype) == "int8":
        return Int8KVCache(*shape, dtype, device)
    return DenseKVCache(*shape, dtype, device)


def _row_position_index(rows: Rows, positions: Positions, batch: int, device: torch.device) -> tuple:
    """The cache index of one token for each of `batch` rows (see `write_rows`)."""
    if isinstance(positions, int):  # a slice, not an index: compiles once for all positions
        return (rows, slice(None), slice(positions, positions + 1))
    if isinstance(rows, slice):  # one position per row of a contiguous range
        rows = torch.arange(rows.start or 0, (rows.start or 0) + batch, device=device)
    return (rows, slice(None), positions)


def _at_position(x: torch.Tensor, positions: Positions) -> torch.Tensor:
    """One token per row [B, kv_heads, D], shaped for `_row_position_index`'s index."""
    return x[:, :, None] if isinstance(positions, int) else x
