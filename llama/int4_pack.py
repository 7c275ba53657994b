"""torch's packed int4 weights: packing the stored int4 codes with torch's own converters, proving
on the running CPU that torch's int4 kernel multiplies by what its converter packed, and reading
the packed bytes back.

torch's CPU converter (`aten._convert_weight_to_int4pack_for_cpu`) packs differently depending on
the instruction set torch picked at run time: blocks of 64 rows on AVX-512, 32 rows on AVX2 and
other CPUs. Nothing here assumes one of them. The codes are always packed by torch's converter
from the plain layout the checkpoints store (`llama.quantization`), so the packing matches the
kernel of this CPU whatever it is, and `cpu_round_trip` checks, once per process, that the pair
(converter, `aten._weight_int4pack_mm_for_cpu`) gives the dequantized weight back. Reading the
packed bytes back (`cpu_layout`) uses whichever of the known layouts reproduces torch's packing
of a probe; when none does, the caller keeps the plain codes too.

On CUDA, `aten._convert_weight_to_int4pack` packs for `aten._weight_int4pack_mm` (tiles of 8 rows
by `inner_k_tiles` x 16 inputs; the even input in the high nibble).
"""

import functools
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch

INT4_MID = 8  # code of a group's zero: w = (code - 8) * scale + zero
# Rows are padded to a multiple of this before packing: whole blocks in both CPU packings (32 and
# 64 rows) and whole 8-row CUDA tiles.
PAD_ROWS = 64
# Rows packed at a time on the CPU: torch's blocks are independent, and the int32 copy its
# converter needs is 8 times the packed size.
_PACK_ROWS = 1024
# Inner k tiles of the CUDA packing, the widest first (inputs must be a multiple of tiles x 16).
CUDA_INNER_K_TILES = (8, 4, 2)


def padded_rows(rows: int) -> int:
    """`rows` rounded up to a multiple of `PAD_ROWS`: the rows of a packed int4 weight."""
    return -(-rows // PAD_ROWS) * PAD_ROWS


def unpack_plain(codes: torch.Tensor) -> torch.Tensor:
    """Stored int4 codes [N, K/2] (two per byte, input 2j in the low nibble) -> uint8 [N, K]."""
    return torch.stack((codes & 0x0F, codes >> 4), dim=-1).flatten(-2)


def pack_plain(values: torch.Tensor) -> torch.Tensor:
    """uint8 values [N, K] in 0..15 -> stored int4 codes [N, K/2] (input 2j in the low nibble)."""
    return values[:, 0::2] | (values[:, 1::2] << 4)


def cpu_pack(values: torch.Tensor) -> torch.Tensor:
    """torch's CPU int4 packing of values [N, K] (0..15; N a multiple of `PAD_ROWS`), done
    `_PACK_ROWS` rows at a time."""
    chunks = [
        torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            values[start : start + _PACK_ROWS].to(torch.int32).contiguous(), 1
        )
        for start in range(0, values.shape[0], _PACK_ROWS)
    ]
    if len(chunks) == 1:
        return chunks[0]
    return torch.cat([c.reshape(-1) for c in chunks]).view(values.shape[0], -1)


@dataclass(frozen=True)
class PackedLayout:
    """One way torch's CPU converter lays out int4 values: blocks of `block_rows` rows, each input
    k of a block as block_rows / 2 bytes; byte j holds rows j and j + block_rows / 2 (`halves`) or
    rows 2j and 2j + 1 (`pairs`), the first in the low nibble."""

    name: str
    block_rows: int
    pairs: bool = False

    def unpack(self, packed: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """Values [rows, cols] (uint8 0..15) of `packed` (rows a multiple of `block_rows`)."""
        blocks = packed.reshape(rows // self.block_rows, cols, self.block_rows // 2)
        low, high = blocks & 0x0F, blocks >> 4
        if self.pairs:
            values = torch.stack((low, high), dim=3).flatten(2)
        else:
            values = torch.cat((low, high), dim=2)  # [blocks, K, block_rows]
        return values.permute(0, 2, 1).reshape(rows, cols)


# The layouts torch's CPU converter is known to use: AVX-512, AVX2, and builds without either.
CPU_LAYOUTS = (
    PackedLayout("64-row blocks (AVX-512)", 64),
    PackedLayout("32-row blocks (AVX2)", 32),
    PackedLayout("32-row blocks of row pairs (no vector unit)", 32, pairs=True),
)


def _probe(rows: int = 2 * PAD_ROWS, cols: int = 128, group: int = 32):
    """A small int4 weight with distinct codes, its groups' scales and zeros, and its exact
    dequantization in fp32: (values [rows, cols], scales [rows, cols/group], zeros, weight)."""
    gen = torch.Generator().manual_seed(0)
    values = torch.randint(0, 16, (rows, cols), generator=gen, dtype=torch.uint8)
    # Scales near 1 and zeros in [0, 1): every wrong code moves a weight by at least ~1.
    scales = (1 + torch.randint(0, 8, (rows, cols // group), generator=gen) / 8).to(torch.bfloat16)
    zeros = (torch.randint(0, 8, (rows, cols // group), generator=gen) / 8).to(torch.bfloat16)
    weight = (values.float() - INT4_MID) * scales.float().repeat_interleave(group, 1)
    weight += zeros.float().repeat_interleave(group, 1)
    return values, scales, zeros, weight


def scales_and_zeros(scales: torch.Tensor, zeros: torch.Tensor, rows: int) -> torch.Tensor:
    """torch's int4 kernels' scales and zeros [K/group, rows, 2] (bf16) from the stored [N, K/group]
    ones, rows padded with zeros up to `rows`."""
    pairs = torch.stack((scales, zeros), dim=-1)  # [N, groups, 2]
    pairs = torch.nn.functional.pad(pairs, (0, 0, 0, 0, 0, rows - scales.shape[0]))
    return pairs.transpose(0, 1).contiguous()


def _check_round_trip(
    pack: Callable[[torch.Tensor], torch.Tensor],
    multiply: Callable[[torch.Tensor, torch.Tensor, int, torch.Tensor], torch.Tensor],
) -> Tuple[bool, str]:
    """Pack the probe with `pack`, multiply the identity by it with `multiply`, and compare with
    the probe's dequantized weight: (passed, what was found)."""
    group = 32
    values, scales, zeros, weight = _probe(group=group)
    try:
        packed = pack(values)
        eye = torch.eye(values.shape[1], dtype=torch.bfloat16)
        out = multiply(eye, packed, group, scales_and_zeros(scales, zeros, values.shape[0]))
    except (RuntimeError, AttributeError, NotImplementedError) as err:  # no such op in this build
        return False, f"torch's int4 operations failed: {str(err).splitlines()[0][:200]}"
    expected = weight.T  # row k of the product: input k of every output row
    if out.shape != expected.shape:
        return False, f"the int4 product has shape {tuple(out.shape)}, expected {tuple(expected.shape)}"
    error = (out.float() - expected).abs()
    allowed = expected.abs() * 2**-7 + 1e-3  # one bf16 rounding of each output
    if not (error <= allowed).all():
        wrong = int((error > allowed).sum())
        return (
            False,
            f"torch's int4 product differs from the weight it packed at {wrong} of {error.numel()} values",
        )
    return True, "torch's converter and int4 product give the packed weight back"


@functools.lru_cache(maxsize=None)
def cpu_round_trip() -> Tuple[bool, str]:
    """Whether torch's CPU int4 kernel multiplies by exactly what torch's CPU converter packed, on
    this CPU (checked once per process on a 128 x 128 probe): (usable, what was found)."""
    return _check_round_trip(cpu_pack, torch.ops.aten._weight_int4pack_mm_for_cpu)


@functools.lru_cache(maxsize=None)
def cpu_layout() -> Optional[PackedLayout]:
    """The entry of `CPU_LAYOUTS` that reads back torch's CPU packing on this CPU (checked once per
    process on a probe), None if none does (or the converter is missing)."""
    values = _probe()[0]
    try:
        packed = cpu_pack(values)
    except (RuntimeError, AttributeError, NotImplementedError):
        return None
    for layout in CPU_LAYOUTS:
        if packed.numel() * 2 == values.numel() and torch.equal(layout.unpack(packed, *values.shape), values):
            return layout
    return None


def cuda_inner_k_tiles(in_features: int) -> Optional[int]:
    """The widest inner k tiling of the CUDA int4 packing whose tile (tiles x 16 inputs) divides
    `in_features`, None if none does."""
    return next((t for t in CUDA_INNER_K_TILES if in_features % (t * 16) == 0), None)


def cuda_codes(codes: torch.Tensor) -> torch.Tensor:
    """Stored int4 codes [N, K/2] (input 2j in the low nibble) as CUDA's converter takes them:
    uint8 [N, K/2] with input 2j in the high nibble."""
    return ((codes & 0x0F) << 4) | (codes >> 4)


def cuda_pack(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """CUDA's int4 packing (`aten._convert_weight_to_int4pack`) of values [N, K] (0..15, N a
    multiple of 8), on `device`.

    Raises:
        ValueError: if K is not a multiple of 32 (the narrowest tile).
    """
    tiles = cuda_inner_k_tiles(values.shape[1])
    if tiles is None:
        raise ValueError(f"CUDA's int4 packing needs a multiple of 32 inputs, got {values.shape[1]}")
    codes = cuda_codes(pack_plain(values)).to(device)
    return torch.ops.aten._convert_weight_to_int4pack(codes.contiguous(), tiles)


# The hand-written CPU kernels' own packing (`llama.kernels.int4_gemv`, llama/csrc/common.h):
# each output row streams its codes, scales and zeros in one sequential read. A row is cut into
# blocks of `KERNEL_BLOCK_GROUPS` groups (the last may hold fewer, L); a block holds group_size / 8
# chunks of 4 L bytes, then the L bf16 scales, then the L bf16 zeros. In chunk c, word 2 l + e
# (16 bits, little-endian) holds in its nibble j the code of input 2 (4 c + j) + e of the block's
# group l: the kernels turn a whole chunk into weights with a few shifts and masks, one group per
# lane, and scale each group in its lane.
KERNEL_BLOCK_GROUPS = 16


def kernel_row_bytes(in_features: int, group_size: int) -> int:
    """Bytes of one row in the kernels' packing: 4 bits a weight, 4 bytes a group."""
    return in_features // 2 + 4 * (in_features // group_size)


def _kernel_blocks(groups: int):
    """(first group, groups L) of each block of a row."""
    return [
        (first, min(KERNEL_BLOCK_GROUPS, groups - first)) for first in range(0, groups, KERNEL_BLOCK_GROUPS)
    ]


def _nibbles_by_input_parity(units: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """int32 units of 4 stored bytes (byte j: inputs 2j and 2j + 1 of the unit in its low and
    high nibble) -> the kernels' word pair (nibble j of the low word: input 2j; of the high word:
    input 2j + 1), or back with `inverse`."""
    out = torch.zeros_like(units)
    for j in range(4):
        for e in range(2):
            stored, kernel = 8 * j + 4 * e, 16 * e + 4 * j
            source, target = (kernel, stored) if inverse else (stored, kernel)
            out |= ((units >> source) & 0xF) << target
    return out


def kernel_pack(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int
) -> torch.Tensor:
    """The kernels' packing of stored int4 codes [N, K/2] (two per byte, input 2j in the low
    nibble) with their groups' bf16 scales and zeros [N, K / group_size]: uint8
    [padded_rows(N), kernel_row_bytes(K, group_size)], the rows past N zero (padded like torch's
    packing, so one size holds for every int4 backend).

    Raises:
        ValueError: if group_size is not a multiple of 8 dividing K.
    """
    rows, cols = codes.shape[0], codes.shape[1] * 2
    if group_size % 8 != 0 or cols % group_size != 0:
        raise ValueError(
            f"the int4 kernels need groups of a multiple of 8 inputs dividing {cols}, not {group_size}"
        )
    groups, units_per_group = cols // group_size, group_size // 8
    out = torch.zeros(padded_rows(rows), kernel_row_bytes(cols, group_size), dtype=torch.uint8)
    for start in range(0, rows, _PACK_ROWS):
        end = min(start + _PACK_ROWS, rows)
        units = _nibbles_by_input_parity(codes[start:end].contiguous().view(torch.int32))
        units = units.view(end - start, groups, units_per_group)
        pieces = []
        for first, count in _kernel_blocks(groups):
            # chunk c of a block: unit c of each of its groups
            pieces.append(
                units[:, first : first + count].transpose(1, 2).reshape(end - start, -1).view(torch.uint8)
            )
            for part in (scales, zeros):
                pieces.append(
                    part[start:end, first : first + count].to(torch.bfloat16).contiguous().view(torch.uint8)
                )
        out[start:end] = torch.cat(pieces, dim=1)
    return out


def kernel_unpack(
    packed: torch.Tensor, rows: int, in_features: int, group_size: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first `rows` rows of a `kernel_pack` packing read back: (stored codes [rows, K/2]
    uint8, scales [rows, K / group_size] bf16, zeros likewise)."""
    codes, scales, zeros = [], [], []
    offset = 0
    packed = packed[:rows]
    units_per_group = group_size // 8
    for _first, count in _kernel_blocks(in_features // group_size):
        size = count * group_size // 2
        units = (
            packed[:, offset : offset + size]
            .contiguous()
            .view(torch.int32)
            .view(rows, units_per_group, count)
        )
        codes.append(_nibbles_by_input_parity(units.transpose(1, 2), inverse=True).reshape(rows, -1))
        offset += size
        for out in (scales, zeros):
            out.append(packed[:, offset : offset + 2 * count].contiguous().view(torch.bfloat16))
            offset += 2 * count
    return torch.cat(codes, dim=1).view(torch.uint8), torch.cat(scales, dim=1), torch.cat(zeros, dim=1)
