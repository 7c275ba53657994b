"""The Hugging Face `LlamaForCausalLM` checkpoint layout: tensor names, the wq/wk row order,
`config.json`, and reading one rank's slices straight out of `*.safetensors` files."""

import json
import math
import os
import re
import struct
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Dict, List, Optional, Tuple

import torch
from safetensors import SafetensorError, safe_open

from llama import layout, sharding
from llama.model import ModelArgs

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# params.json and config.json are a few hundred bytes, the index of a 70B model about 70 kB.
MAX_JSON_BYTES = 1 << 20

# Meta name suffix -> Hugging Face name suffix, for the tensors of one layer, and the others.
_LAYER_NAMES = {t.meta_name: t.hf_name for t in layout.TENSORS if t.per_layer}
_TOP_NAMES = {t.meta_name: t.hf_name for t in layout.TENSORS if not t.per_layer}
_LAYER_KEY = re.compile(r"layers\.(\d+)\.(.+)")
_HF_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)")
# Buffers some older Hugging Face exports saved; they are recomputed, not loaded.
_HF_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
}
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def hf_name(meta_key: str) -> str:
    """The Hugging Face tensor name of a Meta checkpoint key.

    Raises:
        ValueError: for a key that is not part of a Llama model.
    """
    if meta_key in _TOP_NAMES:
        return _TOP_NAMES[meta_key]
    match = _LAYER_KEY.fullmatch(meta_key)
    if match and match.group(2) in _LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"
    raise ValueError(f"checkpoint key {meta_key!r} is not a Llama model tensor")


def meta_name(hf_key: str) -> str:
    """The Meta checkpoint key of a Hugging Face tensor name (inverse of `hf_name`).

    Raises:
        ValueError: for a name that is not part of a LlamaForCausalLM model.
    """
    for meta, hf in _TOP_NAMES.items():
        if hf_key == hf:
            return meta
    match = _HF_LAYER_KEY.fullmatch(hf_key)
    if match:
        for meta, hf in _LAYER_NAMES.items():
            if match.group(2) == hf:
                return f"layers.{match.group(1)}.{meta}"
    raise ValueError(f"tensor {hf_key!r} is not part of a LlamaForCausalLM model")


def permuted_heads(meta_key: str, n_heads: int, n_kv_heads: int) -> Optional[int]:
    """Number of heads whose rows Hugging Face stores permuted in `meta_key` (wq: n_heads,
    wk: n_kv_heads), None for every other tensor."""
    if meta_key.endswith("attention.wq.weight"):
        return n_heads
    if meta_key.endswith("attention.wk.weight"):
        return n_kv_heads
    return None


def to_hf_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder each head's rows from Meta's interleaved rotary pairs (2i, 2i+1) to Hugging
    Face's "rotate half" layout: per head, rows [0, 2, 4, .., 1, 3, 5, ..]."""
    rows, cols = weight.shape
    return weight.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def from_hf_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo `to_hf_rows`: Hugging Face "rotate half" rows back to Meta's interleaved pairs."""
    rows, cols = weight.shape
    return weight.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def read_json_object(path: str, max_bytes: int = MAX_JSON_BYTES) -> dict:
    """The JSON object held by the file `path` (params.json, config.json, a safetensors index).

    The size is checked before anything is read, so a huge file costs no memory.

    Raises:
        ValueError: naming the file, if it is larger than `max_bytes`, not JSON, or not an object.
    """
    size = os.path.getsize(path)
    if size <= max_bytes:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)  # the file may have grown since it was measured
        size = len(data)
    if size > max_bytes:
        raise ValueError(
            f"{path} is {size} bytes, more than the {max_bytes} bytes a checkpoint's JSON file can "
            "need: it is not what its name says; re-download it"
        )
    try:
        value = json.loads(data)
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{path} is not valid JSON ({err}): re-download it") from err
    if not isinstance(value, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return value


def is_positive_int(value) -> bool:
    """True for an int (not a bool) of at least 1."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def is_positive_number(value) -> bool:
    """True for a finite int or float (not a bool) above 0."""
    return (
        isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    )


def is_hf_dir(path: str) -> bool:
    """True if `path` holds a Hugging Face checkpoint (config.json and safetensors weights)."""
    return os.path.isfile(os.path.join(path, CONFIG_FILE)) and (
        os.path.isfile(os.path.join(path, SINGLE_FILE)) or os.path.isfile(os.path.join(path, INDEX_FILE))
    )


def ffn_rounding(dim: int, hidden_dim: int) -> Tuple[int, Optional[float]]:
    """(multiple_of, ffn_dim_multiplier) for params.json that give an FFN hidden size of
    `hidden_dim` (Hugging Face's `intermediate_size`) for model width `dim`.

    Prefers the released models' rounding (multiple_of=256, no multiplier), then the largest
    power of two that reproduces the size, then rounding to the size itself.

    Raises:
        ValueError: if no choice reproduces `hidden_dim` (only for hidden_dim < 1).
    """

    def hidden(multiple_of: int, multiplier: Optional[float]) -> int:
        return ModelArgs(dim=dim, multiple_of=multiple_of, ffn_dim_multiplier=multiplier).ffn_hidden_dim

    powers = [1 << k for k in range(20, -1, -1) if hidden_dim % (1 << k) == 0]
    for multiple_of in [256] + powers:
        if hidden(multiple_of, None) == hidden_dim:
            return multiple_of, None
    if hidden_dim >= 1:
        base = int(2 * 4 * dim / 3)
        multiplier = None if base <= hidden_dim else hidden_dim / base
        if hidden(hidden_dim, multiplier) == hidden_dim:
            return hidden_dim, multiplier
    raise ValueError(f"cannot express an FFN hidden size of {hidden_dim} for dim={dim} in params.json")


def params_from_config(config: dict, source: str) -> dict:
    """Meta `params.json` fields equivalent to a Hugging Face Llama `config.json`.

    Raises:
        ValueError: naming the field, if the config is not a plain Llama model this engine runs
            (missing sizes, rope scaling, biases, another activation).
    """
    missing = [
        key
        for key in (
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "vocab_size",
        )
        if key not in config
    ]
    if missing:
        raise ValueError(f"{source} lacks the fields {missing} of a Llama config.json")
    for key in (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "vocab_size",
        "num_key_value_heads",
    ):
        value = config.get(key)
        if (value is not None or key != "num_key_value_heads") and not is_positive_int(value):
            raise ValueError(f"{source}: {key} must be a positive integer, got {value!r}")
    for key in ("rms_norm_eps", "rope_theta"):
        if key in config and not is_positive_number(config[key]):
            raise ValueError(f"{source}: {key} must be a positive number, got {config[key]!r}")
    if config.get("model_type", "llama") != "llama":
        raise ValueError(f"{source} describes a {config['model_type']!r} model, not a Llama model")
    rope = config.get("rope_parameters") or {}
    if config.get("rope_scaling") or rope.get("rope_type", "default") != "default":
        raise ValueError(f"{source} uses rope scaling, which Code Llama checkpoints do not have")
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise ValueError(f"{source} has attention or MLP biases; Llama models have none")
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source} uses hidden_act={config['hidden_act']!r}; Llama uses silu")
    dim, n_heads = config["hidden_size"], config["num_attention_heads"]
    if config.get("head_dim") not in (None, dim // n_heads):
        raise ValueError(f"{source}: head_dim={config['head_dim']} is not hidden_size / num_attention_heads")
    multiple_of, multiplier = ffn_rounding(dim, config["intermediate_size"])
    theta = config.get("rope_theta", rope.get("rope_theta", 10000.0))
    return {
        "dim": dim,
        "n_layers": config["num_hidden_layers"],
        "n_heads": n_heads,
        "n_kv_heads": config.get("num_key_value_heads") or n_heads,
        "vocab_size": config["vocab_size"],
        "multiple_of": multiple_of,
        "ffn_dim_multiplier": multiplier,
        "norm_eps": config.get("rms_norm_eps", 1e-6),
        "rope_theta": theta,
    }


def config_from_params(
    params: dict, vocab_size: int, hidden_dim: int, dtype: torch.dtype, max_position_embeddings: int
) -> dict:
    """A Hugging Face `config.json` for LlamaForCausalLM equivalent to Meta `params`.

    `vocab_size` and `hidden_dim` come from the weights (params.json may say vocab_size=-1).
    `rope_theta` is written both at the top level (transformers 4) and in `rope_parameters`
    (transformers 5).
    """
    args = ModelArgs(**params)
    dtype_name = DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "intermediate_size": hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.kv_heads,
        "head_dim": args.head_dim,
        "vocab_size": vocab_size,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": args.rope_theta},
        "rope_scaling": None,
        "max_position_embeddings": max_position_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": dtype_name,
        "dtype": dtype_name,
    }


def read_config(hf_dir: str) -> dict:
    """Read `hf_dir/config.json`.

    Raises:
        FileNotFoundError: if it is missing.
        ValueError: if it is not a JSON object.
    """
    path = os.path.join(hf_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: a Hugging Face checkpoint needs its config.json")
    return read_json_object(path)


def weight_file_names(index_path: str) -> List[str]:
    """The safetensors files a `model.safetensors.index.json` maps tensors to, sorted.

    Raises:
        ValueError: naming the index and the entry, if it has no weight_map or an entry is not a
            relative path inside the checkpoint folder (absolute, or with a `..` part).
    """
    weight_map = read_json_object(index_path).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index_path} is not a safetensors index: it has no weight_map object")
    names = set()
    for tensor, name in weight_map.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"{index_path}: the file of {tensor!r} must be a file name, got {name!r}")
        # Checked in both path flavours: "..\\x" and "C:x" leave the folder on Windows too.
        for flavour in (PurePosixPath, PureWindowsPath):
            path = flavour(name)
            if path.is_absolute() or path.drive or path.root or ".." in path.parts:
                raise ValueError(
                    f"{index_path}: the file of {tensor!r} is {name!r}, which is outside the checkpoint "
                    "folder; an index may only name files inside its own folder"
                )
        names.add(name)
    return sorted(names)


def check_safetensors_header(path: Path) -> None:
    """Check that the header length a safetensors file starts with fits in the file.

    safetensors checks the tensors' offsets against the file itself; this names the file and
    refuses before a header of the claimed length is read.

    Raises:
        ValueError: naming the file.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        start = f.read(8)
    if len(start) < 8:
        raise ValueError(f"{path} is {size} bytes, too short for a safetensors file: re-download it")
    (header_bytes,) = struct.unpack("<Q", start)
    if header_bytes > size - 8:
        raise ValueError(
            f"{path} claims a {header_bytes}-byte header but is only {size} bytes long: it is truncated "
            "or not a safetensors file; re-download it"
        )


def open_safetensors(path: Path) -> safe_open:
    """A `safe_open` handle on `path` (tensors read from a memory map); close it with `__exit__`.

    Raises:
        ValueError: naming the file, if it is not a valid safetensors file (a header longer than
            the file, or tensors said to lie beyond its end).
    """
    check_safetensors_header(path)
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except SafetensorError as err:
        raise ValueError(f"{path} is not a valid safetensors file ({err}): re-download it") from err


class HFCheckpoint:
    """A Hugging Face Llama checkpoint seen as Meta-layout tensors, read slice by slice.

    `read(key, rank, world_size)` returns rank's part of the Meta tensor `key`, reading only
    those rows or columns from the safetensors file and undoing the wq/wk head permutation on
    them (a rank's rows are whole heads, and the permutation stays inside a head).

    Use it as a context manager, or call `close()`, to release the open files.
    """

    def __init__(self, hf_dir: str):
        self.source = hf_dir
        self.config = read_config(hf_dir)
        self.params = params_from_config(self.config, os.path.join(hf_dir, CONFIG_FILE))
        args = ModelArgs(**self.params)
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.kv_heads, args.head_dim
        self._files: Dict[Path, Any] = {}
        self._location: Dict[str, Tuple[Path, str]] = {}
        try:
            for path in self._weight_files():
                self._files[path] = open_safetensors(path)
            for path, handle in self._files.items():
                for name in handle.keys():
                    if name.endswith(_HF_IGNORED_SUFFIXES):
                        continue
                    self._location[meta_name(name)] = (path, name)
        except BaseException:
            self.close()
            raise
        tied = self.config.get("tie_word_embeddings")
        if "output.weight" not in self._location and tied and "tok_embeddings.weight" in self._location:
            self._location["output.weight"] = self._location["tok_embeddings.weight"]

    def close(self) -> None:
        """Close the safetensors files (tensors already read stay valid); idempotent."""
        files, self._files = self._files, {}
        for handle in files.values():
            handle.__exit__(None, None, None)

    def __enter__(self) -> "HFCheckpoint":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _weight_files(self) -> List[Path]:
        root = Path(self.source)
        index = root / INDEX_FILE
        if index.is_file():
            paths = [root / name for name in weight_file_names(str(index))]
        else:
            paths = [root / SINGLE_FILE]
        for path in paths:
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing: the Hugging Face checkpoint is incomplete")
        return paths

    def keys(self) -> List[str]:
        return list(self._location)

    def shape(self, key: str) -> Tuple[int, ...]:
        path, name = self._location[key]
        return tuple(self._files[path].get_slice(name).get_shape())

    def dtype(self, key: str) -> torch.dtype:
        path, name = self._location[key]
        return SAFETENSORS_DTYPES[self._files[path].get_slice(name).get_dtype()]

    def release(self, key: str) -> None:
        """Nothing to drop: `read` returns copies, not views of the files."""

    def read(self, key: str, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        """Rank `rank` of `world_size`'s part of the Meta-layout tensor `key`."""
        path, name = self._location[key]
        handle = self._files[path]
        span = sharding.rank_range(key, self.shape(key), rank, world_size)
        if span is None or world_size == 1:
            tensor = handle.get_tensor(name)
        else:
            dim, start, length = span
            index = (
                (slice(start, start + length),) if dim == 0 else (slice(None), slice(start, start + length))
            )
            tensor = handle.get_slice(name)[index]
        heads = permuted_heads(key, self.n_heads, self.n_kv_heads)
        if heads is not None:
            if tensor.shape[0] % self.head_dim != 0:
                raise ValueError(
                    f"cannot split tensor {key} of shape {self.shape(key)} into {world_size} parts of whole "
                    f"heads (head size {self.head_dim})"
                )
            tensor = from_hf_rows(tensor, tensor.shape[0] // self.head_dim)
        return tensor.contiguous()
