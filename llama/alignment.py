"""Weights placed in memory as the operations that read them need: contiguous, starting at a
64-byte boundary.

Checkpoint files put tensors at any 8-byte offset (safetensors, torch's zip files), and a
memory-mapped tensor starts wherever its file offset falls. Some of torch's weight-only kernels
assume more: `aten._weight_int8pack_mm` crashes on AVX-512 CPUs when its int8 weight does not
start at a 16-byte boundary. 64 bytes covers every vector width up to AVX-512 and a cache line.
`aligned` is applied once, when a quantized weight is built at load, never per call.

Weights that every decode step streams (the linear layers' matrices) are placed once more at load
(`place_weight`): on Linux CPUs with transparent huge pages, each in its own anonymous mapping
advised for 2 MiB pages. A decode step reads every weight once, start to end; on 4 KiB pages
that is a TLB miss every 4 KiB (one row of a 2048-wide bf16 matrix), on 2 MiB pages one every
2 MiB. Measured on the TinyLlama geometry, batch 1, 2 threads (`benchmarks/decode_step.py
--placement`): decode steps 2-11% faster for bf16, int8 and int4 weights, depending on the
machine's phase. The copy is made tensor by tensor, and the loader drops the source's file pages
as each is copied, so the weights are held once.
"""

import mmap
import os
import sys
from pathlib import Path
from typing import Optional

import torch

ALIGNMENT = 64  # bytes
HUGE_PAGE = 2 * 1024 * 1024  # bytes: the transparent huge page size of x86-64 and arm64 (4 KiB base)
# Where Linux says whether transparent huge pages are on: "always", "madvise" or "never" (in brackets).
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")
HUGE_PAGES_SWITCH = "CODELLAMA_HUGE_PAGES"  # "0": leave the weights where loading finds them


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


def thp_setting() -> Optional[str]:
    """The system's transparent huge page setting as `THP_SETTING` reads (e.g. "always [madvise]
    never"), or None where there is none."""
    try:
        return THP_SETTING.read_text().strip()
    except OSError:
        return None


def huge_pages_refusal() -> Optional[str]:
    """None when weights are placed on transparent huge pages here (Linux, the setting `always`
    or `madvise` in `THP_SETTING`, Python's `mmap.MADV_HUGEPAGE`, and not turned off with
    `CODELLAMA_HUGE_PAGES=0`, which saves the copy at load); otherwise why not, in a few words."""
    if os.environ.get(HUGE_PAGES_SWITCH, "1") == "0":
        return f"{HUGE_PAGES_SWITCH}=0"
    setting = thp_setting()
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE") or setting is None:
        return "no transparent huge pages on this system"
    if "[always]" in setting or "[madvise]" in setting:
        return None
    return "transparent huge pages are turned off (never)"


def huge_pages_available() -> bool:
    """Whether weights are placed on transparent huge pages here (see `huge_pages_refusal`)."""
    return huge_pages_refusal() is None


def on_huge_pages(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of the CPU tensor `tensor` in its own anonymous memory mapping, starting
    at a `HUGE_PAGE` boundary, with every whole huge page of it advised `MADV_HUGEPAGE` (the
    kernel backs them with 2 MiB pages when it can). The tail past the last whole huge page
    stays on base pages, so the copy takes no more memory than the tensor. The mapping lives as
    long as the returned tensor (or a view of it).

    Raises:
        ValueError: if `tensor` is not on the CPU.
        OSError: if the mapping cannot be made or advised.
    """
    if tensor.device.type != "cpu":
        raise ValueError(f"on_huge_pages places CPU tensors; this one is on {tensor.device}")
    nbytes = tensor.numel() * tensor.element_size()
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE)
    start = -torch.frombuffer(region, dtype=torch.uint8, count=1).data_ptr() % HUGE_PAGE
    whole = nbytes // HUGE_PAGE * HUGE_PAGE
    if whole:
        region.madvise(mmap.MADV_HUGEPAGE, start, whole)
    # A storage of exactly the tensor's bytes; the memoryview holds `region` alive.
    raw = torch.frombuffer(memoryview(region)[start : start + nbytes], dtype=torch.uint8)
    return raw.view(tensor.dtype).view(tensor.shape).copy_(tensor)


def place_weight(tensor: torch.Tensor) -> torch.Tensor:
    """Where a weight read by every decode step should live (see the module docstring): for a CPU
    tensor of at least one `HUGE_PAGE` where `huge_pages_available()`, a copy `on_huge_pages`;
    otherwise `aligned(tensor)` (the tensor itself when already contiguous and aligned).

    Returns:
        a contiguous tensor with `tensor`'s values, dtype, shape and device, starting at a
        multiple of `ALIGNMENT` bytes.
    """
    big = tensor.numel() * tensor.element_size() >= HUGE_PAGE
    if tensor.device.type == "cpu" and big and huge_pages_available():
        return on_huge_pages(tensor)
    return aligned(tensor)
