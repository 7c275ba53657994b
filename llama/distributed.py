"""Process groups, model parallelism and every device/dtype choice of the engine, in one place."""

import atexit
import os
import sys
from datetime import timedelta
from typing import Optional, Tuple, Union

import fairscale.nn.model_parallel.initialize as fs_init
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from llama import kernels

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cuda_available() -> bool:
    return torch.cuda.is_available()


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_world_size() -> int:
    """Number of processes of this job on this machine (1 outside torchrun)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def compute_device() -> torch.device:
    """The device this process computes on: its rank-local GPU when CUDA is there, else the CPU."""
    if cuda_available():
        return torch.device("cuda", local_rank() % torch.cuda.device_count())
    return torch.device("cpu")


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 computes fast on `device`: a GPU with bf16, a CPU whose oneDNN has bf16
    instructions, or a CPU where the hand-written kernels run (the "avx2" variant: bf16 weights
    are multiplied by the kernels for decoding and widened to fp32 a chunk at a time for prefill,
    so the weights stay 16-bit in memory and prefill is as fast as with fp32 weights)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        if torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return True
    except (AttributeError, RuntimeError):
        pass
    return kernels.enabled() and kernels.variant() is not None


def resolve_dtype(dtype: Union[None, str, torch.dtype], device: torch.device) -> torch.dtype:
    """The model dtype: `dtype` if given, else bf16 where the device supports it, else fp16 on
    GPU and fp32 on CPU.

    Raises:
        ValueError: for a dtype name other than "float32", "bfloat16" or "float16".
    """
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"unsupported dtype {dtype}; use one of {', '.join(DTYPES)}")
        return dtype
    if dtype is not None:
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
        return DTYPES[dtype]
    if bf16_supported(device):
        return torch.bfloat16
    return torch.float16 if device.type == "cuda" else torch.float32


def init_model_parallel(model_parallel_size: Optional[int] = None) -> Tuple[int, int]:
    """Start the process group and fairscale model parallelism unless already started.

    Under torchrun the group comes from the environment; in a plain `python` process a
    one-rank group is created in memory (no port). The backend is nccl with CUDA, else gloo.
    `model_parallel_size` defaults to the world size.

    Returns:
        (model-parallel rank, model-parallel world size) of this process.

    Raises:
        ValueError: if `model_parallel_size` does not divide the world size, or differs from the
            size of an already initialised model-parallel group.
    """
    if cuda_available():
        # Before the process group starts: nccl binds each rank to the current device.
        torch.cuda.set_device(compute_device())
    if not dist.is_initialized():
        backend = "nccl" if cuda_available() else "gloo"
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend)
        else:
            # A plain `python script.py`: a one-rank group whose rendezvous stays in this
            # process (an in-memory store), so no port is opened and none can collide.
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        atexit.register(_leave_process_group)
    world_size = dist.get_world_size()
    if fs_init.model_parallel_is_initialized():
        current = fs_init.get_model_parallel_world_size()
        if model_parallel_size is not None and model_parallel_size != current:
            raise ValueError(
                f"model parallelism is already initialised with size {current} in this process; "
                f"cannot build with model_parallel_size={model_parallel_size}"
            )
    else:
        size = world_size if model_parallel_size is None else model_parallel_size
        if size < 1 or world_size % size != 0:
            raise ValueError(
                f"model_parallel_size={size} must be >= 1 and divide the number of processes "
                f"({world_size}); launch with torchrun --nproc_per_node {size}"
            )
        fs_init.initialize_model_parallel(size)
    return fs_init.get_model_parallel_rank(), fs_init.get_model_parallel_world_size()


def _leave_process_group() -> None:
    # A rank that exits with its gloo group still open can abort in the C++ destructors
    # ("terminate called without an active exception") while its peers are still exiting:
    # close the group we opened before the interpreter tears down. On a normal exit the ranks
    # first wait for each other (bounded: a peer that died does not hold this one), so no rank
    # tears its connections down while another is still using them.
    if not dist.is_initialized():
        return
    normal_exit = getattr(sys, "last_value", None) is None
    if normal_exit and dist.get_world_size() > 1 and dist.get_backend() == "gloo":
        try:
            dist.monitored_barrier(timeout=timedelta(seconds=30))
        except Exception:  # a peer is gone or failed: leave anyway
            pass
    dist.destroy_process_group()


def silence_non_zero_ranks() -> None:
    """Send stdout of every rank but the first to /dev/null, so output is printed once."""
    if dist.is_initialized() and dist.get_rank() > 0 and sys.stdout is sys.__stdout__:
        sys.stdout = open(os.devnull, "w")


def is_first_rank() -> bool:
    """Whether this process is rank 0 (the one that reads the terminal and prints), also before
    the process group starts."""
    if dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def available_memory_bytes(device: torch.device) -> Optional[int]:
    """Free memory on `device` (GPU free memory, or the host's MemAvailable), None if unknown."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def model_parallel_world_size() -> int:
    """Ranks in this process's model-parallel group (1 when model parallelism is not initialised)."""
    if not fs_init.model_parallel_is_initialized():
        return 1
    return fs_init.get_model_parallel_world_size()


def is_first_model_parallel_rank() -> bool:
    """Whether this process is rank 0 of its model-parallel group (the one that decides)."""
    return model_parallel_world_size() == 1 or fs_init.get_model_parallel_rank() == 0


def broadcast_from_first_rank(obj: object) -> object:
    """`obj` of model-parallel rank 0, on every rank of its group (pickled; small objects only).

    Returns `obj` unchanged without model parallelism. Blocks until rank 0 sends.
    """
    if model_parallel_world_size() == 1:
        return obj
    holder = [obj]
    device = compute_device() if cuda_available() else None
    dist.broadcast_object_list(
        holder,
        src=fs_init.get_model_parallel_src_rank(),
        group=fs_init.get_model_parallel_group(),
        device=device,
    )
    return holder[0]


def model_parallel_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """The sum of `x` over the model-parallel ranks (a new tensor; `x` is left unchanged).

    Uses the functional collectives, which `torch.compile` traces into a full graph (fairscale's
    autograd mappings cannot be traced).
    """
    if fs_init.get_model_parallel_world_size() == 1:
        return x
    return funcol.wait_tensor(funcol.all_reduce(x, "sum", fs_init.get_model_parallel_group()))


def model_parallel_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """The model-parallel ranks' `x` concatenated along the last dimension, in rank order."""
    if fs_init.get_model_parallel_world_size() == 1:
        return x
    group = fs_init.get_model_parallel_group()
    return funcol.wait_tensor(funcol.all_gather_tensor(x.contiguous(), x.dim() - 1, group))
