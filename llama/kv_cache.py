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

Paged (`BlockTable`): either storage can instead hold a pool of blocks of `block_len` positions,
[blocks, kv_heads, block_len, head_dim], with one block table shared by every layer mapping each
cache row's positions to blocks (position s of row r is position s % block_len of block
table[r, s // block_len]). Rows take blocks from the pool as their sequences grow and give them
back when a row is refitted to a shorter length or released, so the pool (`kv_cache_tokens`
positions in all) can hold far fewer positions than rows x max_seq_len: what the live sequences
use. On the CPU the pool is a `zeroed` mapping too: a block takes memory when first written and
keeps it for the next row that takes the block. The attention kernels read the blocks in place
through the table; the other reads gather the positions they ask for. Keeping the table's rows
within the pool is the caller's job (the engine reserves each request's blocks when it admits it);
a row asking for more than is free raises `CacheFull`.

The attention code addresses a cache by (row, position) only, so it does not know which storage
or which addressing it talks to.
"""

import math
import mmap
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from llama import kernels

# `kv_cache_dtype` values besides None (the activation dtype).
KV_CACHE_DTYPES = ("int8",)
# Bytes of one int8 cache scale (fp32).
INT8_SCALE_BYTES = 4
INT8_MAX = 127

# Positions per block of a paged cache: a multiple of the attention kernels' key block (64); 256
# keeps a block of a 7B layer's keys at 256 KiB and the table of a 100k-position row at 391 entries.
KV_BLOCK_LEN = 256

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


class CacheFull(RuntimeError):
    """A cache row needs more blocks than the paged cache has free."""


class BlockTable:
    """Which blocks of a paged KV cache hold each cache row's positions (see the module docstring).

    One table serves every layer: block i of each layer's pool holds the same positions. The
    table lives on the cache's device (the kernels read it); the blocks each row holds and the free
    blocks are kept on the host, so fitting a row costs no device round trip.

    Args:
        rows: cache rows (the model's max_batch_size).
        max_seq_len: positions a row may reach.
        tokens: positions the pool holds over all rows (rounded up to whole blocks).
        device: where the table lives.
        block_len: positions per block, a multiple of `kernels.ATTENTION_KEY_BLOCK`.

    Raises:
        ValueError: if `tokens` is below one block, or `block_len` is not a multiple of the
            kernels' key block.
    """

    def __init__(
        self, rows: int, max_seq_len: int, tokens: int, device: torch.device, block_len: int = KV_BLOCK_LEN
    ):
        if block_len < 1 or block_len % kernels.ATTENTION_KEY_BLOCK:
            raise ValueError(
                f"block_len must be a multiple of {kernels.ATTENTION_KEY_BLOCK}, got {block_len}"
            )
        if tokens < 1:
            raise ValueError(f"kv_cache_tokens must be at least 1 (one block of {block_len}), got {tokens}")
        self.block_len = block_len
        self.blocks = -(-tokens // block_len)
        self.blocks_per_row = -(-max_seq_len // block_len)
        self.table = torch.full((rows, self.blocks_per_row), -1, dtype=torch.int64, device=device)
        self._held: List[List[int]] = [[] for _ in range(rows)]
        self._free = list(range(self.blocks - 1, -1, -1))  # popped from the end: lowest first

    @property
    def free_blocks(self) -> int:
        """Blocks no row holds."""
        return len(self._free)

    def held(self, row: int) -> int:
        """Blocks row `row` holds."""
        return len(self._held[row])

    def fit(self, row: int, end: int, shrink: bool = True) -> None:
        """Make row `row` hold the blocks of its positions 0 .. end - 1: missing ones are taken from
        the free blocks; with `shrink`, blocks past them are given back (the row's later positions,
        a previous sequence's, are never read again).

        Raises:
            CacheFull: if the row needs more blocks than are free (nothing changes then).
        """
        held, need = self._held[row], -(-end // self.block_len)
        if need > self.blocks_per_row:
            raise ValueError(
                f"position {end - 1} is past the cache rows' {self.blocks_per_row * self.block_len}"
            )
        if need - len(held) > len(self._free):
            raise CacheFull(
                f"cache row {row} needs {need - len(held)} more blocks of {self.block_len} positions, "
                f"{len(self._free)} of {self.blocks} are free (raise kv_cache_tokens)"
            )
        before = len(held)
        while shrink and len(held) > need:
            self._free.append(held.pop())
        while len(held) < need:
            held.append(self._free.pop())
        if len(held) != before:
            self.table[row] = -1
            if held:
                self.table[row, : len(held)] = torch.tensor(held, dtype=torch.int64)

    def release(self, row: int) -> None:
        """Give back every block of row `row`."""
        self.fit(row, 0)

    def positions(
        self, rows: Rows, start: Positions, count: int, device: torch.device
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(blocks, offsets) of `count` positions from `start` of one row (`rows` an int: [count]
        each) or of one position of each of several rows (`count` rows, `start` one position for
        all or one per row: [count] each)."""
        if isinstance(rows, int):
            where = torch.arange(start, start + count, device=device)
            return self.table[rows, where // self.block_len], where % self.block_len
        rows = _row_indices(rows, count, device)
        where = start if isinstance(start, torch.Tensor) else torch.full((count,), start, device=device)
        return self.table[rows, where // self.block_len], where % self.block_len

    def gather(self, pool: torch.Tensor, rows: Rows, length: int) -> torch.Tensor:
        """Positions 0 .. length - 1 of `rows` of `pool` [blocks, kv_heads, block_len, ...], copied:
        [kv_heads, length, ...] for one row, else [B, kv_heads, length, ...] (positions past a
        row's blocks read block 0: callers mask them)."""
        table = self.table[rows, : -(-length // self.block_len)].clamp(min=0)
        blocks = pool[table]  # [(B,) count, kv_heads, block_len, ...]
        count_axis = table.dim() - 1
        positions = blocks.transpose(count_axis, count_axis + 1).flatten(count_axis + 1, count_axis + 2)
        return positions.narrow(count_axis + 1, 0, length)


class _Addressing:
    """How a storage's tensors [N, kv_heads, L, ...] are addressed: N cache rows of L = max_seq_len
    positions, or (with a `BlockTable`) N blocks of L = block_len positions."""

    blocks: Optional[BlockTable]

    def _shape(self, rows: int, kv_heads: int, max_seq_len: int, head_dim: int) -> Tuple[int, int, int, int]:
        if self.blocks is None:
            return (rows, kv_heads, max_seq_len, head_dim)
        return (self.blocks.blocks, kv_heads, self.blocks.block_len, head_dim)

    def _tokens_index(self, row: int, start: int, count: int, device: torch.device) -> tuple:
        """The index of positions start .. start + count - 1 of `row` ([kv_heads, count, ...] selected
        for a row, [count, kv_heads, ...] for blocks: see `_tokens_value`)."""
        if self.blocks is None:
            return (row, slice(None), slice(start, start + count))
        blocks, offsets = self.blocks.positions(row, start, count, device)
        return (blocks, slice(None), offsets)

    def _tokens_value(self, x: torch.Tensor) -> torch.Tensor:
        """Values [count, kv_heads, ...] laid out for `_tokens_index`."""
        return x.transpose(0, 1) if self.blocks is None else x

    def _rows_index(self, rows: Rows, positions: Positions, batch: int, device: torch.device) -> tuple:
        """The index of one token of each of `batch` rows (values as `_rows_value` lays them out)."""
        if self.blocks is None:
            return _row_position_index(rows, positions, batch, device)
        blocks, offsets = self.blocks.positions(rows, positions, batch, device)
        return (blocks, slice(None), offsets)

    def _rows_value(self, x: torch.Tensor, positions: Positions) -> torch.Tensor:
        """One token per row [B, kv_heads, ...] laid out for `_rows_index`."""
        return _at_position(x, positions) if self.blocks is None else x

    def _select(self, tensor: torch.Tensor, rows: Rows, length: int) -> torch.Tensor:
        """Positions 0 .. length - 1 of `rows`: a view of a row-addressed tensor, gathered from blocks."""
        if self.blocks is None:
            return tensor[rows, :, :length]
        return self.blocks.gather(tensor, rows, length)

    def _kernel_rows(self, rows: Union[slice, torch.Tensor], batch: int, device: torch.device):
        """The rows argument of the decode kernels: a slice stays a view of the rows without a table."""
        return rows if self.blocks is None else _row_indices(rows, batch, device)

    def _copy_positions(self, tensors: Sequence[torch.Tensor], source: int, row: int, count: int) -> None:
        """Positions 0 .. count - 1 of row `source` of each of `tensors` into row `row` (from
        blocks: whole blocks, the last one's later positions too, which `row` writes before it
        reads them)."""
        if self.blocks is None:
            for tensor in tensors:
                tensor[row, :, :count] = tensor[source, :, :count]
            return
        blocks = -(-count // self.blocks.block_len)
        copied, into = self.blocks.table[source, :blocks], self.blocks.table[row, :blocks]
        for tensor in tensors:
            tensor[into] = tensor[copied]

    def _table(self, row: Optional[int] = None) -> Optional[torch.Tensor]:
        """The kernels' block table (of one row for prefill), None without blocks."""
        if self.blocks is None:
            return None
        return self.blocks.table if row is None else self.blocks.table[row]


class DenseKVCache(_Addressing):
    """Keys and values in the activation dtype, [rows, kv_heads, max_seq_len, head_dim] each
    (what scaled_dot_product_attention and the bf16 kernels read in place), or blocks of them
    [blocks, kv_heads, block_len, head_dim] addressed through `blocks`."""

    kv_cache_dtype: Optional[str] = None

    def __init__(
        self,
        rows: int,
        kv_heads: int,
        max_seq_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        blocks: Optional[BlockTable] = None,
    ):
        self.blocks = blocks
        shape = self._shape(rows, kv_heads, max_seq_len, head_dim)
        self.dtype = dtype
        self.keys, key_mapping = zeroed(shape, dtype, device)
        self.values, value_mapping = zeroed(shape, dtype, device)
        self._mappings: Dict[str, Optional[mmap.mmap]] = {"keys": key_mapping, "values": value_mapping}

    def write_tokens(self, row: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store keys/values `k`, `v` [n, kv_heads, D] at positions start .. start + n - 1 of `row`;
        the row's later positions (a previous sequence's) give their memory back (blocks: the
        table was fitted to start + n before)."""
        index = self._tokens_index(row, start, k.shape[0], k.device)
        self.keys[index] = self._tokens_value(k)
        self.values[index] = self._tokens_value(v)
        if self.blocks is None:
            for name, mapping in self._mappings.items():
                release_positions(getattr(self, name), mapping, row, start + k.shape[0])

    def write_rows(self, rows: Rows, positions: Positions, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store one token's keys/values `k`, `v` [B, kv_heads, D] for each of B rows: batch row b
        at cache row `rows[b]` (a slice or [B] tensor), position `positions` (one int for all, or a
        [B] tensor)."""
        index = self._rows_index(rows, positions, k.shape[0], k.device)
        self.keys[index] = self._rows_value(k, positions)
        self.values[index] = self._rows_value(v, positions)

    def copy_positions(self, source: int, row: int, count: int) -> None:
        """Copy the keys and values of positions 0 .. count - 1 of row `source` into row `row`
        (a paged cache's table holds `row`'s blocks for them already)."""
        self._copy_positions((self.keys, self.values), source, row, count)

    def read(self, rows: Rows, length: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of positions 0 .. length - 1 of `rows` (views; copies from blocks):
        [kv_heads, length, D] for one row, else [B, kv_heads, length, D]."""
        return self._select(self.keys, rows, length), self._select(self.values, rows, length)

    def visible(self, row: int, end: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of `row` [kv_heads, >= end, D] for a prefill chunk ending at position
        end - 1, in the activation dtype (the whole row as a view; from blocks, a copy of 0 .. end - 1)."""
        if self.blocks is None:
            return self.keys[row], self.values[row]
        return self.read(row, end)

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
        if self.blocks is None:
            return kernels.prefill_attention(q, self.keys[row], self.values[row], start)
        return kernels.prefill_attention(q, self.keys, self.values, start, block_table=self._table(row))

    def decode_attention(
        self, q: torch.Tensor, lengths: torch.Tensor, rows: Union[slice, torch.Tensor]
    ) -> torch.Tensor:
        """The decode-attention kernel (`kernels.decode_attention`) over the cache in place: batch
        row b of `q` [B, heads, D] attends to the first `lengths[b]` positions of its cache row
        (rows[b] of a [B] tensor, or the b-th row of a slice). Check `decode_kernel_applies`."""
        rows = self._kernel_rows(rows, q.shape[0], q.device)
        if isinstance(rows, slice):
            return kernels.decode_attention(q, self.keys[rows], self.values[rows], lengths)
        return kernels.decode_attention(q, self.keys, self.values, lengths, rows, block_table=self._table())


class Int8KVCache(_Addressing):
    """Keys and values as int8 codes [rows, kv_heads, max_seq_len, head_dim] with one fp32 scale
    per (row, kv head, position) (see the module docstring), or blocks of them addressed through
    `blocks`; reads give the activation dtype."""

    kv_cache_dtype: Optional[str] = "int8"

    def __init__(
        self,
        rows: int,
        kv_heads: int,
        max_seq_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        blocks: Optional[BlockTable] = None,
    ):
        self.blocks = blocks
        shape = self._shape(rows, kv_heads, max_seq_len, head_dim)
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
        index = self._tokens_index(row, start, k.shape[0], k.device)
        self._store(index, self._tokens_value(k), self._tokens_value(v))
        if self.blocks is None:
            for name, mapping in self._mappings.items():
                release_positions(getattr(self, name), mapping, row, start + k.shape[0])

    def write_rows(self, rows: Rows, positions: Positions, k: torch.Tensor, v: torch.Tensor) -> None:
        """Quantize and store one token's `k`, `v` [B, kv_heads, D] for each of B rows (see
        `DenseKVCache.write_rows`)."""
        index = self._rows_index(rows, positions, k.shape[0], k.device)
        self._store(index, self._rows_value(k, positions), self._rows_value(v, positions))

    def copy_positions(self, source: int, row: int, count: int) -> None:
        """Copy the codes and scales of positions 0 .. count - 1 of row `source` into row `row`
        (see `DenseKVCache.copy_positions`)."""
        tensors = (self.keys, self.values, self.key_scales, self.value_scales)
        self._copy_positions(tensors, source, row, count)

    def read(self, rows: Rows, length: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Positions 0 .. length - 1 of `rows`, dequantized into new tensors in the activation
        dtype: [kv_heads, length, D] for one row, else [B, kv_heads, length, D]."""
        return (
            dequantize_int8(
                self._select(self.keys, rows, length), self._select(self.key_scales, rows, length), self.dtype
            ),
            dequantize_int8(
                self._select(self.values, rows, length),
                self._select(self.value_scales, rows, length),
                self.dtype,
            ),
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
        if self.blocks is None:
            return kernels.prefill_attention_int8(
                q, self.keys[row], self.values[row], self.key_scales[row], self.value_scales[row], start
            )
        return kernels.prefill_attention_int8(
            q, self.keys, self.values, self.key_scales, self.value_scales, start, block_table=self._table(row)
        )

    def decode_attention(
        self, q: torch.Tensor, lengths: torch.Tensor, rows: Union[slice, torch.Tensor]
    ) -> torch.Tensor:
        """The int8 decode-attention kernel (`kernels.decode_attention_int8`) over the codes and
        scales in place (see `DenseKVCache.decode_attention`)."""
        rows = self._kernel_rows(rows, q.shape[0], q.device)
        if isinstance(rows, slice):
            return kernels.decode_attention_int8(
                q, self.keys[rows], self.values[rows], self.key_scales[rows], self.value_scales[rows], lengths
            )
        return kernels.decode_attention_int8(
            q,
            self.keys,
            self.values,
            self.key_scales,
            self.value_scales,
            lengths,
            rows,
            block_table=self._table(),
        )


KVCache = Union[DenseKVCache, Int8KVCache]


def allocate(
    kv_cache_dtype: Optional[str],
    shape: Sequence[int],
    dtype: torch.dtype,
    device: torch.device,
    blocks: Optional[BlockTable] = None,
) -> KVCache:
    """A zeroed cache of `shape` (rows, kv_heads, max_seq_len, head_dim) whose reads are in `dtype`
    (the activation dtype), stored as `kv_cache_dtype` (None: in `dtype`; "int8"), in the blocks
    of `blocks` when given (paged; its rows and positions match `shape`'s).

    Raises:
        ValueError: for an unknown `kv_cache_dtype`.
    """
    if check_kv_cache_dtype(kv_cache_dtype) == "int8":
        return Int8KVCache(*shape, dtype, device, blocks)
    return DenseKVCache(*shape, dtype, device, blocks)


def _row_position_index(rows: Rows, positions: Positions, batch: int, device: torch.device) -> tuple:
    """The cache index of one token for each of `batch` rows (see `write_rows`)."""
    if isinstance(positions, int):  # a slice, not an index: compiles once for all positions
        return (rows, slice(None), slice(positions, positions + 1))
    return (_row_indices(rows, batch, device), slice(None), positions)  # one position per row


def _row_indices(rows: Union[slice, torch.Tensor], count: int, device: torch.device) -> torch.Tensor:
    """`rows` as a [count] index tensor (a slice names `count` consecutive rows from its start)."""
    if isinstance(rows, slice):
        return torch.arange(rows.start or 0, (rows.start or 0) + count, device=device)
    return rows


def _at_position(x: torch.Tensor, positions: Positions) -> torch.Tensor:
    """One token per row [B, kv_heads, D], shaped for `_row_position_index`'s index."""
    return x[:, :, None] if isinstance(positions, int) else x
