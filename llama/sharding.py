"""How fairscale model parallelism splits each checkpoint tensor, and how to cut one rank's part
out of a checkpoint saved with any other number of shards.

Everything here works on tensors that may be memory-mapped: `narrow` only makes views, so a
rank touches (and copies) nothing but the rows or columns it keeps.
"""

from typing import Dict, Optional, Sequence, Tuple

import torch

from llama import layout

# Tensors fairscale splits across model-parallel ranks, and along which dim (from the layout table).
SPLIT_DIMS: Dict[str, int] = {t.meta_name: t.split_dim for t in layout.TENSORS if t.split_dim is not None}


def split_dim(key: str) -> Optional[int]:
    """The dim along which `key` (a Meta checkpoint key) is split across ranks, None if replicated."""
    return layout.split_dim(key)


def full_shape(key: str, piece_shapes: Sequence[Tuple[int, ...]]) -> Tuple[int, ...]:
    """Shape of the whole tensor `key` given the shapes of its N saved shards.

    Raises:
        ValueError: if the shards disagree in a way fairscale never produces (naming the tensor).
    """
    first = tuple(piece_shapes[0])
    if any(tuple(shape) != first for shape in piece_shapes[1:]):
        raise ValueError(
            f"tensor {key} has shards of shapes {[tuple(s) for s in piece_shapes]}: the checkpoint "
            "shards do not come from one model-parallel split"
        )
    dim = split_dim(key)
    if dim is None:
        return first
    if dim >= len(first):
        raise ValueError(f"tensor {key} has shape {first} but is split along dim {dim}")
    return first[:dim] + (first[dim] * len(piece_shapes),) + first[dim + 1 :]


def rank_range(key: str, shape: Sequence[int], rank: int, world_size: int) -> Optional[Tuple[int, int, int]]:
    """(dim, start, length) of the part of the whole tensor `key` that model-parallel `rank` of
    `world_size` holds, or None if the tensor is replicated on every rank.

    Raises:
        ValueError: naming the tensor, its shape and the world size if the split dim does not
            divide evenly.
    """
    dim = split_dim(key)
    if dim is None or dim >= len(shape):  # replicated (or a per-row scale of a row-parallel layer)
        return None
    size = shape[dim]
    if size % world_size != 0:
        raise ValueError(
            f"cannot split tensor {key} of shape {tuple(shape)} into {world_size} model-parallel parts: "
            f"its dim {dim} has size {size}, which is not divisible by {world_size}. Use a "
            f"model-parallel size that divides {size}"
        )
    length = size // world_size
    return dim, rank * length, length


def gather_range(pieces: Sequence[torch.Tensor], dim: int, start: int, length: int) -> torch.Tensor:
    """Elements `start .. start + length` along `dim` of the concatenation of `pieces`
    (equal-sized shards along `dim`), without building the concatenation.

    Each shard contributes a `narrow` view of only the part that overlaps the range; the views
    are concatenated only when the range spans several shards. A range inside one shard is
    returned as a view (no copy).
    """
    piece_size = pieces[0].shape[dim]
    parts = []
    end = start + length
    for index, piece in enumerate(pieces):
        lo, hi = index * piece_size, (index + 1) * piece_size
        overlap_lo, overlap_hi = max(lo, start), min(hi, end)
        if overlap_lo < overlap_hi:
            parts.append(piece.narrow(dim, overlap_lo - lo, overlap_hi - overlap_lo))
    if len(parts) == 1:
        return parts[0]
    return torch.cat(parts, dim=dim)


def rank_part(key: str, pieces: Sequence[torch.Tensor], rank: int, world_size: int) -> torch.Tensor:
    """Rank `rank` of `world_size`'s part of tensor `key`, saved as the N shards `pieces`.

    Replicated tensors come from the first shard. The result is contiguous; it shares memory
    with the (memory-mapped) shard whenever the part is a contiguous region of one shard.

    Raises:
        ValueError: if the tensor cannot be split into `world_size` parts (see `rank_range`).
    """
    span = rank_range(key, full_shape(key, [p.shape for p in pieces]), rank, world_size)
    if span is None:
        return pieces[0]
    return gather_range(pieces, *span).contiguous()
