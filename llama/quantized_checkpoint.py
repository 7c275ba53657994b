"""Quantized checkpoints on disk, quantizing a 16-bit checkpoint while loading it, and loading
either into a model one tensor at a time.

A quantized checkpoint folder holds `params.json`, `tokenizer.model` (when the source had one),
`checklist.chk` and `quantized.safetensors`: every linear weight `X.weight` as its integer codes
under that name plus `X.scales` (and `X.zeros` for int4) in the layout `llama.quantization`
describes; every other tensor (embeddings, norms) as it was. The file's metadata records the
format, scheme, group size and layout. Tensors are whole (model-parallel size 1); any number
of ranks read their slices straight out of the file.
"""

import json
import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from llama import checkpoint, hf_format, layout, quantization, sharding
from llama.model import ModelArgs, Transformer
from llama.output_dir import PathLike, copy_if_present, owns_storage, staged_output_dir, write_checklist
from llama.quantization import QuantizedWeight, Scheme

QUANTIZED_FILE = "quantized.safetensors"
FORMAT = "codellama-weight-only-quantized"
FORMAT_VERSION = "1"
TOKENIZER_FILE = "tokenizer.model"
LAYOUT = (
    "per linear weight X: X.weight codes, X.scales and (int4) X.zeros, whole tensors (not sharded). "
    "int8: codes int8 [N,K] in -127..127, scales bf16 [N], w = code * scale. "
    "int4: codes uint8 [N,K/2], input 2j in the low nibble of byte j and 2j+1 in the high nibble, "
    "values 0..15; scales and zeros bf16 [N,K/group_size]; w = (code - 8) * scale + zero"
)
_CODE_DTYPES = {"int8": torch.int8, "int4": torch.uint8}


def is_quantized_dir(path: PathLike) -> bool:
    """True if `path` holds a quantized checkpoint (written by `write_quantized_checkpoint`)."""
    return os.path.isfile(os.path.join(path, QUANTIZED_FILE))


def _slice(handle, name: str, span: Optional[Tuple[int, int, int]]) -> torch.Tensor:
    """Tensor `name` of an open safetensors file, or only its elements `span` = (dim, start, length)."""
    if span is None:
        return handle.get_tensor(name)
    dim, start, length = span
    index = (slice(None),) * dim + (slice(start, start + length),)
    return handle.get_slice(name)[index].contiguous()


class QuantizedCheckpoint:
    """A quantized checkpoint folder: plain tensors by `read`, linear weights by `read_parts`, for
    any model-parallel rank. `shape(key)` of a linear weight is its logical [N, K] shape."""

    def __init__(self, ckpt_dir: PathLike):
        self.source = str(ckpt_dir)
        path = Path(ckpt_dir) / QUANTIZED_FILE
        fix = "quantize the 16-bit checkpoint again with `python -m llama.quantize`"
        try:
            self._file = safe_open(str(path), framework="pt", device="cpu")
            metadata = self._file.metadata() or {}
            names = list(self._file.keys())
            self._shapes = {name: tuple(self._file.get_slice(name).get_shape()) for name in names}
            self._dtypes = {name: self._file.get_slice(name).get_dtype() for name in names}
        except Exception as err:  # safetensors raises its own error types for a damaged header
            raise ValueError(
                f"cannot read the quantized checkpoint {path} ({err}): it is truncated or corrupt: {fix}"
            ) from err
        if metadata.get("format") != FORMAT:
            raise ValueError(
                f"{path} is not a quantized checkpoint of this format (metadata {metadata}): {fix}"
            )
        try:
            group_size = int(metadata["group_size"]) if metadata.get("group_size") not in (None, "") else None
            self.scheme = quantization.make_scheme(metadata.get("scheme", ""), group_size)
        except ValueError as err:
            raise ValueError(f"{path} records an unusable quantization scheme ({err}): {fix}") from err
        parts = {f".{part}" for part in layout.QUANTIZED_PARTS}
        self._keys = [name for name in names if not name.endswith(tuple(parts))]
        for key in self._keys:
            if layout.is_linear_weight(key):
                self._check_parts(key, path, fix)

    def _check_parts(self, key: str, path: Path, fix: str) -> None:
        """Raise ValueError unless `key`'s codes, scales and zeros have the scheme's dtypes and
        mutually consistent shapes."""
        base = key.removesuffix(".weight")
        code_shape = self._shapes[key]
        expected = {key: ("I8" if self.scheme.mode == "int8" else "U8", None)}
        if len(code_shape) != 2:
            raise ValueError(f"{path}: {key} has shape {code_shape}, not a 2-D weight: {fix}")
        rows = code_shape[0]
        if self.scheme.mode == "int8":
            expected[f"{base}.scales"] = ("BF16", (rows,))
        else:
            groups = code_shape[1] * 2 // self.scheme.group_size
            expected[f"{base}.scales"] = ("BF16", (rows, groups))
            expected[f"{base}.zeros"] = ("BF16", (rows, groups))
        for name, (dtype, shape) in expected.items():
            if name not in self._shapes:
                raise ValueError(f"{path} lacks {name}, a part of the quantized {key}: {fix}")
            if self._dtypes[name] != dtype or (shape is not None and self._shapes[name] != shape):
                raise ValueError(
                    f"{path}: {name} is {self._dtypes[name]} {self._shapes[name]}, expected {dtype} "
                    f"{shape or ''} for {self.scheme}: {fix}"
                )

    def keys(self) -> List[str]:
        return list(self._keys)

    def shape(self, key: str) -> Tuple[int, ...]:
        shape = self._shapes[key]
        if self.scheme.mode == "int4" and layout.is_linear_weight(key):
            return (shape[0], shape[1] * 2)
        return shape

    def dtype(self, key: str) -> torch.dtype:
        return hf_format.SAFETENSORS_DTYPES[self._dtypes[key]]

    def read(self, key: str, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        """Rank `rank` of `world_size`'s part of the plain (not quantized) tensor `key`."""
        return _slice(self._file, key, sharding.rank_range(key, self._shapes[key], rank, world_size))

    def read_parts(self, key: str, rank: int = 0, world_size: int = 1) -> Dict[str, torch.Tensor]:
        """Rank `rank` of `world_size`'s part of the quantized linear weight `key`: its codes,
        scales and (int4) zeros, each cut along the weight's split dim where it has that dim."""
        check_groups(self, key, world_size)
        base = key.removesuffix(".weight")
        parts = {}
        for part in ("weight",) + layout.QUANTIZED_PARTS:
            name = f"{base}.{part}"
            if name in self._shapes:
                span = sharding.rank_range(name, self._shapes[name], rank, world_size)
                parts[part] = _slice(self._file, name, span)
        return parts


class QuantizingReader:
    """A 16-bit checkpoint (Meta or Hugging Face) whose linear weights are quantized as they are
    read: `read_parts` gives exactly what `QuantizedCheckpoint.read_parts` gives for the
    checkpoint `python -m llama.quantize` writes from it, for any rank and number of ranks."""

    def __init__(self, ckpt: checkpoint.Checkpoint, scheme: Scheme):
        self.ckpt, self.scheme, self.source = ckpt, scheme, ckpt.source

    def keys(self) -> List[str]:
        return self.ckpt.keys()

    def shape(self, key: str) -> Tuple[int, ...]:
        return self.ckpt.shape(key)

    def dtype(self, key: str) -> torch.dtype:
        return self.ckpt.dtype(key)

    def read(self, key: str, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        return self.ckpt.read(key, rank, world_size)

    def read_parts(self, key: str, rank: int = 0, world_size: int = 1) -> Dict[str, torch.Tensor]:
        """Rank `rank` of `world_size`'s part of linear weight `key`, quantized. Only that part is
        read, except for int8 row-parallel weights split over several ranks: their scales
        belong to whole rows, so the whole tensor is read (one row block at a time) for them."""
        check_groups(self, key, world_size)
        row_scales = None
        if self.scheme.mode == "int8" and layout.split_dim(key) == 1 and world_size > 1:
            row_scales = quantization.int8_scales(self.ckpt.read(key))
        parts = quantization.quantize(self.ckpt.read(key, rank, world_size), self.scheme, row_scales)
        self.ckpt.release(key)  # memory stays near the quantized size, not the 16-bit one
        return parts


Source = Union[QuantizedCheckpoint, QuantizingReader]


def check_groups(source: Source, key: str, world_size: int) -> None:
    """Check that the int4 groups of linear weight `key` tile each rank's inputs.

    Raises:
        ValueError: naming the tensor, the group size and the share it does not divide.
    """
    split_inputs = layout.split_dim(key) == 1
    quantization.check_groups(key, source.shape(key)[1], source.scheme, world_size, split_inputs)


def open_source(ckpt_dir: str, mode: Optional[str], group_size: Optional[int] = None) -> Source:
    """The quantized weights of `ckpt_dir`: the quantized checkpoint it holds, or its 16-bit
    checkpoint quantized on the fly with `mode` / `group_size`.

    Raises:
        ValueError: for an unknown mode or group size, a quantized checkpoint asked to load
            under another scheme, or an unreadable checkpoint.
        FileNotFoundError: for missing checkpoint files.
    """
    if mode is None and group_size is not None:
        raise ValueError(
            f"a group size ({group_size}) was given without a quantization mode: add quantize='int4'"
        )
    if is_quantized_dir(ckpt_dir):
        stored = QuantizedCheckpoint(ckpt_dir)
        if mode is not None:
            asked = quantization.make_scheme(mode, group_size)
            if asked != stored.scheme:
                raise ValueError(
                    f"{ckpt_dir} is already quantized as {stored.scheme}; it cannot be quantized again as "
                    f"{asked}: load it without quantize=, or quantize the original 16-bit checkpoint"
                )
        return stored
    if mode is None:
        raise ValueError(f"{ckpt_dir} is not a quantized checkpoint: pass quantize='int8' or 'int4'")
    scheme = quantization.make_scheme(mode, group_size)
    return QuantizingReader(checkpoint.open_checkpoint(ckpt_dir), scheme)


def load_model(
    source: Source,
    params: Dict,
    args: ModelArgs,
    rank: int,
    world_size: int,
    dtype: torch.dtype,
    device: torch.device,
    torch_ops: bool = True,
) -> Transformer:
    """A model (without KV cache) holding model-parallel `rank`'s part of `source`: linear
    weights as `QuantizedWeight`s, the other tensors in `dtype`, all on `device`. Tensors are
    read and quantized one at a time, so memory grows by one quantized tensor per step.

    Raises:
        ValueError: if the tensors do not match `params`, or a tensor, head count or int4 group
            does not split into `world_size` parts (naming it).
    """
    checkpoint.check_full_shapes(source, params)
    checkpoint.check_splittable(source, params, world_size)
    for key in source.keys():
        if layout.is_linear_weight(key):
            check_groups(source, key, world_size)
    model = checkpoint.empty_model(args)
    for key in source.keys():
        module_name, _, name = key.rpartition(".")
        module = model.get_submodule(module_name)
        if layout.is_linear_weight(key):
            parts = source.read_parts(key, rank, world_size)
            in_features = source.shape(key)[1] // (world_size if layout.split_dim(key) == 1 else 1)
            weight = QuantizedWeight(parts, source.scheme, in_features, device, torch_ops)
            kept = {buffer.untyped_storage().data_ptr() for buffer in weight.buffers()}
            for tensor in parts.values():  # repacked or realigned: the parts as read are not used
                if tensor.untyped_storage().data_ptr() not in kept:
                    checkpoint.release_pages(tensor)
            delattr(module, name)
            setattr(module, name, weight)
        else:
            stored = source.read(key, rank, world_size)
            tensor = stored.to(device=device, dtype=dtype)
            if tensor.data_ptr() != stored.data_ptr():  # converted: the tensor as read is not used
                checkpoint.release_pages(stored)
                if isinstance(source, QuantizingReader):
                    source.ckpt.release(key)  # the shards it was gathered from
            setattr(module, name, nn.Parameter(tensor, requires_grad=False))
        checkpoint.return_free_memory()  # the freed temporaries of this tensor
    unset = [name for name, param in model.named_parameters() if param.is_meta]
    if unset:
        raise ValueError(f"checkpoint {source.source} lacks the tensors {unset[:5]}")
    return model


def parameter_count(model: nn.Module) -> int:
    """Parameters of `model` on this rank, counting each quantized weight's logical size."""
    quantized = sum(m.numel() for m in model.modules() if isinstance(m, QuantizedWeight))
    return quantized + sum(p.numel() for p in model.parameters())


def write_quantized_checkpoint(
    ckpt_dir: str,
    out_dir: PathLike,
    mode: str,
    group_size: Optional[int] = None,
    *,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Quantize the 16-bit checkpoint in `ckpt_dir` (Meta, any shard count, or Hugging Face) into
    a quantized checkpoint folder `out_dir`, all or nothing (see `output_dir.staged_output_dir`).
    Holds the quantized tensors (not the 16-bit ones) in memory until the file is written.

    Returns:
        `out_dir`.

    Raises:
        ValueError: for an unknown mode or group size, a group size that does not divide a
            layer's inputs, an input that is already quantized, tensors that do not match
            params.json, or a non-empty `out_dir` without `force`.
        FileNotFoundError: for missing input files.
    """
    if is_quantized_dir(ckpt_dir):
        stored = QuantizedCheckpoint(ckpt_dir)
        raise ValueError(
            f"{ckpt_dir} is already quantized ({stored.scheme}): quantize the original 16-bit "
            "checkpoint instead"
        )
    scheme = quantization.make_scheme(mode, group_size)
    params = checkpoint.read_params(ckpt_dir)
    source = QuantizingReader(checkpoint.open_checkpoint(ckpt_dir), scheme)
    checkpoint.check_full_shapes(source, params)
    for key in source.keys():
        if layout.is_linear_weight(key):
            check_groups(source, key, 1)
    with staged_output_dir(out_dir, force=force, source_dir=ckpt_dir) as staging:
        tensors: Dict[str, torch.Tensor] = {}
        for key in tqdm(source.keys(), unit="tensor", desc=f"quantizing to {scheme}", disable=not progress):
            if layout.is_linear_weight(key):
                base = key.removesuffix(".weight")
                for part, tensor in source.read_parts(key).items():
                    tensors[f"{base}.{part}"] = tensor
            else:
                tensor = source.read(key).contiguous()
                tensors[key] = tensor if owns_storage(tensor) else tensor.clone()
        metadata = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "scheme": scheme.mode,
            "group_size": "" if scheme.group_size is None else str(scheme.group_size),
            "layout": LAYOUT,
        }
        save_file(tensors, str(staging / QUANTIZED_FILE), metadata=metadata)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging / QUANTIZED_FILE, 0o666 & ~umask)  # safetensors creates it private
        del tensors
        if not copy_if_present(ckpt_dir, checkpoint.PARAMS_FILE, staging):
            (staging / checkpoint.PARAMS_FILE).write_text(json.dumps(params, indent=2) + "\n")
        copy_if_present(ckpt_dir, TOKENIZER_FILE, staging)
        write_checklist(staging)
    return Path(out_dir)
