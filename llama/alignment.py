"""Weights placed in memory as the operations that read them need: contiguous, starting at a
64-byte boundary.

Checkpoint files put tensors at any 8-byte offset (safetensors, torch's zip files), and a
memory-mapped tensor starts wherever its file offset falls. Some of torch's weight-only kernels
assume more: `aten._weight_int8pack_mm` crashes on AVX-512 CPUs when its int8 weight does not
start at a 16-byte boundary. 64 bytes covers every vector width up to AVX-512 and a cache line.
`aligned` is applied once, when a quantized weight is built at load, never per call.
"""

import torch

ALIGNMENT = 64  # bytes


def is_aligned(tensor: torch.Tensor, alignment: int = ALIGNMENT) -> bool:
    """Whether `tensor` is contiguous and its first element starts at a multiple of `alignment`
    bytes (an empty tensor always is)."""
    return tensor.is_contiguous() and (tensor.numel() == 0 or tensor.data_ptr() % alignment == 0)


def aligned(tensor: torch.Tensor, alignment: int = ALIGNMENT) -> torch.Tensor:
    """`tensor` itself when `is_aligned`, else a contiguous copy starting at a multiple of
    `alignment` bytes (same values, dtype, shape and device).

    Raises:
        ValueError: if `alignment` is not a positive power of two.
    """
    if alignment < 1 or alignment & (alignment - 1):
        raise ValueError(f"alignment must be a positive power of two, got {alignment}")
    if is_aligned(tensor, alignment):
        return tensor
    out = torch.empty(tensor.shape, dtype=tensor.dtype, device=tensor.device)
    if out.data_ptr() % alignment:  # an allocator with a smaller guarantee: place it by hand
        nbytes = tensor.numel() * tensor.element_size()
        raw = torch.empty(nbytes + alignment, dtype=torch.uint8, device=tensor.device)
        start = -raw.data_ptr() % alignment
        out = raw[start : start + nbytes].view(tensor.dtype).view(tensor.shape)
    return out.copy_(tensor)
