"""Checkpoint directories (Meta `params.json` + `consolidated.NN.pth` shards, or a Hugging Face
`config.json` + safetensors folder), and loading one model-parallel rank's part of them into a
model without a second copy of the weights."""

import contextlib
import ctypes
import functools
import mmap
import os
import pickle
import sys
import zipfile
from pathlib import Path
from typing import Dict, Iterator, List, Tuple, Union

import fairscale.nn.model_parallel.layers as fs_layers
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from llama import alignment, hf_format, layout, sharding
from llama.model import ModelArgs, Transformer

# Keys some released checkpoints carry that are not parameters.
IGNORED_KEYS = ("rope.freqs",)

PARAMS_FILE = "params.json"

# ModelArgs fields that size the KV cache: arguments of Llama.build, not of the checkpoint.
_RUNTIME_FIELDS = ("max_batch_size", "max_seq_len")


def read_params(ckpt_dir: str) -> Dict:
    """Read `ckpt_dir/params.json` (or, for a Hugging Face folder, the equivalent of its config.json).

    Raises:
        FileNotFoundError: if the directory or the file is missing.
        ValueError: naming the file and the field, if the file is larger than a params.json can
            be, is not a JSON object of known ModelArgs fields with the required ones (dim,
            n_layers, n_heads) present, or holds a value of the wrong type or sign.
    """
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(
            f"checkpoint directory {ckpt_dir!r} does not exist: pass --ckpt_dir pointing to a "
            "downloaded model folder (e.g. CodeLlama-7b/)"
        )
    path = os.path.join(ckpt_dir, PARAMS_FILE)
    if not os.path.isfile(path) and hf_format.is_hf_dir(ckpt_dir):
        config_path = os.path.join(ckpt_dir, hf_format.CONFIG_FILE)
        return hf_format.params_from_config(hf_format.read_config(ckpt_dir), config_path)
    if not os.path.isfile(path) and os.path.isfile(os.path.join(ckpt_dir, hf_format.CONFIG_FILE)):
        raise FileNotFoundError(
            f"{ckpt_dir} has a Hugging Face config.json but no {hf_format.SINGLE_FILE} or "
            f"{hf_format.INDEX_FILE}: only safetensors weights are read (re-save the model with "
            "save_pretrained(..., safe_serialization=True))"
        )
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: every checkpoint directory needs its params.json")
    params = hf_format.read_json_object(path)
    known = set(ModelArgs.__dataclass_fields__) - set(_RUNTIME_FIELDS)
    runtime = sorted(set(params) & set(_RUNTIME_FIELDS))
    if runtime:
        raise ValueError(
            f"{path} sets {runtime}, which size the KV cache and are arguments of Llama.build, not "
            "checkpoint fields: remove them from the file"
        )
    unknown = sorted(set(params) - known)
    if unknown:
        raise ValueError(f"{path} has unknown fields {unknown}; known fields are {sorted(known)}")
    missing = [key for key in ("dim", "n_layers", "n_heads") if key not in params]
    if missing:
        raise ValueError(f"{path} lacks the required fields {missing}")
    for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of"):
        value = params.get(key)
        if value is not None and not hf_format.is_positive_int(value):
            raise ValueError(f"{path}: {key} must be a positive integer, got {value!r}")
    vocab_size = params.get("vocab_size", -1)
    if vocab_size != -1 and not hf_format.is_positive_int(vocab_size):
        raise ValueError(
            f"{path}: vocab_size must be a positive integer, or -1 for the tokenizer's, got {vocab_size!r}"
        )
    for key in ("norm_eps", "rope_theta", "ffn_dim_multiplier"):
        value = params.get(key)
        if value is not None and not hf_format.is_positive_number(value):
            raise ValueError(f"{path}: {key} must be a positive number, got {value!r}")
    return params


def shard_paths(ckpt_dir: str) -> List[Path]:
    """The checkpoint's `*.pth` files in shard order.

    Raises:
        FileNotFoundError: if there is none.
    """
    paths = sorted(Path(ckpt_dir).glob("*.pth"))
    if not paths:
        raise FileNotFoundError(
            f"no *.pth checkpoint files in {ckpt_dir!r}: expected consolidated.00.pth ... "
            "(check the download finished)"
        )
    return paths


def load_shard(path: Path) -> Dict[str, torch.Tensor]:
    """Memory-map one shard's state dict (no pickled code is run, no tensor is copied).

    Raises:
        ValueError: naming the file if it is truncated, corrupt, not a state dict, or pickles
            anything but tensors and containers (which could run code when unpickled).
    """
    fix = "re-download it and check it with `md5sum -c checklist.chk`"
    if not zipfile.is_zipfile(path):
        # torch.save writes a zip archive; a cut-off download loses the archive's index at the end.
        raise ValueError(
            f"checkpoint shard {path} is not a complete PyTorch archive (truncated or corrupt): {fix}"
        )
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as err:  # what weights_only loading raises for anything it refuses
        raise ValueError(
            f"checkpoint shard {path} was refused unread: it pickles more than tensors "
            f"({_refusal_reason(err)}), and unpickling that could run code. Released checkpoints hold "
            f"only tensors: {fix}, from a source you trust"
        ) from err
    except Exception as err:  # torch raises many types for a damaged zip/pickle
        raise ValueError(
            f"cannot read checkpoint shard {path} ({err}): it is truncated or corrupt: {fix}"
        ) from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"checkpoint shard {path} does not hold a state dict of tensors")
    return state


def _refusal_reason(err: pickle.UnpicklingError) -> str:
    """The line of torch's weights-only refusal that says what was refused (not its advice)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for line in lines:
        if "GLOBAL" in line or "nsupported" in line:
            return line
    return lines[-1] if lines else type(err).__name__


@contextlib.contextmanager
def _without_weight_init() -> Iterator[None]:
    """Build modules with parameters on the meta device and fairscale's random init skipped.

    fairscale allocates weights with the legacy `torch.Tensor(...)` constructor, which ignores the
    meta device: each such buffer is swapped for a meta tensor as it is wrapped in a Parameter
    (the untouched CPU buffer is freed at once and never becomes resident).
    """
    original_init, original_parameter = fs_layers._initialize_affine_weight, fs_layers.Parameter

    def meta_parameter(data: torch.Tensor, requires_grad: bool = True) -> nn.Parameter:
        return nn.Parameter(torch.empty(data.shape, dtype=data.dtype, device="meta"), requires_grad)

    fs_layers._initialize_affine_weight = lambda *args, **kwargs: None
    fs_layers.Parameter = meta_parameter
    try:
        with torch.device("meta"):
            yield
    finally:
        fs_layers._initialize_affine_weight = original_init
        fs_layers.Parameter = original_parameter


def empty_model(args: ModelArgs) -> Transformer:
    """A Transformer whose parameters are on the meta device (no memory) and with no KV cache.

    Needs fairscale model parallelism initialised: the parameters have this rank's shapes.
    """
    with _without_weight_init():
        return Transformer(args)


def check_state_dict(model: nn.Module, state_dict: Dict[str, torch.Tensor], source: str) -> None:
    """Check that `state_dict` has exactly the model's keys with the model's (per-rank) shapes.

    Raises:
        ValueError: naming the first few missing, unexpected or wrongly shaped tensors.
    """
    expected = {name: tuple(p.shape) for name, p in model.named_parameters()}
    found = {k: tuple(v.shape) for k, v in state_dict.items() if k not in IGNORED_KEYS}
    problems = _shape_problems(expected, found)
    if problems:
        raise ValueError(
            f"checkpoint {source} does not match params.json and the model-parallel size: {problems}"
        )


def _shape_problems(expected: Dict[str, Tuple[int, ...]], found: Dict[str, Tuple[int, ...]]) -> str:
    """The first few missing, unexpected and wrongly shaped keys, or "" if the shapes agree."""
    problems = []
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    wrong = [
        f"{k} {found[k]} (expected {expected[k]})" for k in expected if k in found and found[k] != expected[k]
    ]
    if missing:
        problems.append(f"missing keys {_first_few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_first_few(unexpected)}")
    if wrong:
        problems.append(f"wrong shapes {_first_few(wrong)}")
    return "; ".join(problems)


def _first_few(items: List[str], n: int = 5) -> str:
    shown = ", ".join(items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")


def assign_weights(
    model: nn.Module, state_dict: Dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device
) -> None:
    """Make the model's parameters the checkpoint's tensors, converted to `dtype` on `device`,
    the linear layers' weights placed for streaming (`alignment.place_weight`).

    The state dict is consumed: it must hold the checkpoint's memory-mapped tensors (as
    `load_rank_state_dict` returns them) and not be used afterwards. A tensor that was copied
    (converted, or placed on huge pages) has its pages dropped from resident memory as soon as
    it is copied, so the weights are held once in memory during loading, not twice. A tensor
    already in the right dtype, device and place is used as it is (backed by the page cache).
    """
    quiet = dist.is_initialized() and dist.get_rank() > 0
    # A bar on stderr only when loading takes over a second (real checkpoints, not tests).
    items = tqdm(state_dict.items(), desc="loading", unit="tensor", delay=1.0, file=sys.stderr, disable=quiet)
    converted = {}
    for key, stored in items:
        if key in IGNORED_KEYS:
            continue
        tensor = stored.to(device=device, dtype=dtype)
        if layout.is_linear_weight(key):
            tensor = alignment.place_weight(tensor)
        if tensor.data_ptr() != stored.data_ptr():  # copied: the pages as read are not used again
            release_pages(stored)
        converted[key] = tensor
    model.load_state_dict(converted, strict=True, assign=True)
    for param in model.parameters():
        param.requires_grad_(False)


_MADV_DONTNEED = 4  # Linux


@functools.lru_cache(maxsize=None)
def _libc() -> "ctypes.CDLL | None":
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


def release_pages(tensor: torch.Tensor) -> None:
    """Drop the pages that lie wholly inside `tensor` from this process's resident memory
    (Linux `madvise(MADV_DONTNEED)`; a no-op elsewhere).

    Only for tensors of a memory-mapped checkpoint that were read and are not needed again:
    their pages are clean copies of the file, so touching them later reads the file again.
    """
    libc = _libc()
    if libc is None or tensor.device.type != "cpu" or tensor.numel() == 0:
        return
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    first, last = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE, end // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED)


def return_free_memory() -> None:
    """Hand memory that the C allocator holds free back to the system (glibc `malloc_trim`):
    loading frees many large temporaries, which would otherwise stay counted in RSS."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


class MetaCheckpoint:
    """The memory-mapped `consolidated.NN.pth` shards of a Meta checkpoint, read as whole tensors
    or as any model-parallel rank's part (for any number of ranks)."""

    def __init__(self, ckpt_dir: str):
        self.source = ckpt_dir
        self.paths = shard_paths(ckpt_dir)
        self.shards = [load_shard(path) for path in self.paths]
        self._keys = [k for k in self.shards[0] if k not in IGNORED_KEYS]
        for path, shard in zip(self.paths[1:], self.shards[1:]):
            keys = [k for k in shard if k not in IGNORED_KEYS]
            if sorted(keys) != sorted(self._keys):
                raise ValueError(
                    f"checkpoint shard {path} holds other tensors than {self.paths[0]}: the shards do not "
                    "belong to one checkpoint"
                )

    def close(self) -> None:
        """Drop the shards' memory maps (tensors already read keep theirs)."""
        self.shards = []

    def __enter__(self) -> "MetaCheckpoint":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def keys(self) -> List[str]:
        return list(self._keys)

    def shape(self, key: str) -> Tuple[int, ...]:
        """Shape of the whole (unsharded) tensor."""
        return sharding.full_shape(key, [shard[key].shape for shard in self.shards])

    def dtype(self, key: str) -> torch.dtype:
        return self.shards[0][key].dtype

    def read(self, key: str, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        """Rank `rank` of `world_size`'s part of `key` (the whole tensor for world_size=1)."""
        return sharding.rank_part(key, [shard[key] for shard in self.shards], rank, world_size)

    def release(self, key: str) -> None:
        """Drop `key`'s pages of every shard from resident memory, once it was read and is not
        used as it is (e.g. quantized): the file stays mapped and is read again if needed."""
        for shard in self.shards:
            release_pages(shard[key])


Checkpoint = Union[MetaCheckpoint, hf_format.HFCheckpoint]


def open_checkpoint(ckpt_dir: str) -> Checkpoint:
    """Open a Meta checkpoint, or a Hugging Face one when the folder has config.json and
    safetensors weights but no params.json. Both are context managers that close their files.

    Raises:
        FileNotFoundError, ValueError: see `shard_paths`, `load_shard` and `hf_format.HFCheckpoint`.
    """
    if not os.path.isfile(os.path.join(ckpt_dir, PARAMS_FILE)) and hf_format.is_hf_dir(ckpt_dir):
        return hf_format.HFCheckpoint(ckpt_dir)
    return MetaCheckpoint(ckpt_dir)


def check_splittable(ckpt: Checkpoint, params: Dict, world_size: int) -> None:
    """Check that every tensor of `ckpt` (and the heads of `params`) split into `world_size`
    model-parallel parts.

    Raises:
        ValueError: naming the first tensor (with its shape) or head count that does not divide.
    """
    args = ModelArgs(**params)
    for name, count in (("n_heads", args.n_heads), ("n_kv_heads", args.kv_heads)):
        if count % world_size != 0:
            raise ValueError(
                f"{name}={count} of {ckpt.source} is not divisible by the model-parallel size {world_size}: "
                f"use a model-parallel size that divides {count}"
            )
    for key in ckpt.keys():
        sharding.rank_range(key, ckpt.shape(key), 0, world_size)


def full_shapes(params: Dict, vocab_size: int) -> Dict[str, Tuple[int, ...]]:
    """Shape of every whole (unsharded) tensor of the model `params` describes."""
    args = ModelArgs(**params)
    sizes = {
        "vocab": vocab_size,
        "dim": args.dim,
        "q": args.n_heads * args.head_dim,
        "kv": args.kv_heads * args.head_dim,
        "hidden": args.ffn_hidden_dim,
    }
    return layout.full_shapes(sizes, args.n_layers)


def check_full_shapes(ckpt: Checkpoint, params: Dict) -> None:
    """Check that `ckpt` holds exactly the tensors `params` describes, with their shapes (the
    vocabulary size is taken from the embedding when params leave it unset).

    Raises:
        ValueError: naming the first few missing, unexpected or wrongly shaped tensors.
    """
    vocab_size = params.get("vocab_size") or -1
    if vocab_size <= 0 and "tok_embeddings.weight" in ckpt.keys():
        vocab_size = ckpt.shape("tok_embeddings.weight")[0]
    expected = full_shapes(params, vocab_size)
    found = {key: tuple(ckpt.shape(key)) for key in ckpt.keys()}
    problems = _shape_problems(expected, found)
    if problems:
        raise ValueError(f"checkpoint {ckpt.source} does not match its model parameters: {problems}")


def load_rank_state_dict(ckpt_dir: str, params: Dict, rank: int, world_size: int) -> Dict[str, torch.Tensor]:
    """Model-parallel rank `rank` of `world_size`'s state dict, from a checkpoint saved with any
    number of shards (or in Hugging Face layout).

    Only the slices this rank holds are read; when the checkpoint was saved for `world_size`
    ranks the tensors are the memory-mapped shard's own (no copy).

    Raises:
        FileNotFoundError: missing shards or weight files.
        ValueError: unreadable shards, or a tensor that cannot be split into `world_size` parts
            (the message names the tensor and the sizes).
    """
    with open_checkpoint(ckpt_dir) as ckpt:
        check_splittable(ckpt, params, world_size)
        return {key: ckpt.read(key, rank, world_size) for key in ckpt.keys()}
