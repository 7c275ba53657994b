"""How many bytes one model-parallel rank needs, and whether that fits a device.

One arithmetic for `codellama plan` and for the refusal in `Llama.build` before anything is loaded:

- **weights**: each tensor's share on one rank (fairscale splits embeddings, the attention and FFN
  projections and the output layer; the norms are replicated on every rank). With weight-only
  quantization the seven linear layers of each block and the output layer hold int8 values with
  one scale per output channel, or int4 values (two per byte) with a scale and a zero point per
  group of `group_size` input columns, their rows padded to a multiple of 64 as every int4 backend
  keeps them (torch's kernels and the hand-written ones, `llama.int4_pack`); scales and zero points
  take 2 bytes (bf16). Embeddings
  and norms stay in the model dtype.
- **KV cache**: keys and values of every layer for `max_batch_size` rows of `max_seq_len` positions
  (the rank's share of the kv heads), or for the `kv_cache_tokens` positions of a paged cache, in
  the model dtype, or with `kv_cache_dtype="int8"` as int8 codes plus one fp32 scale per position
  and kv head (`llama.kv_cache.bytes_per_position`).
- **activations**: the largest buffers alive during one prefill step, whose tokens number at most
  the engine's `prefill_chunk` (and `max_seq_len`): the residual stream and layer output
  (2 x tokens x dim) plus the larger of the feed-forward intermediates (w1 x, w3 x and their product:
  3 x tokens x hidden / MP) and the attention's queries, keys, values (tokens x (heads + 2 kv heads)
  x head_dim / MP) with the fp32 scores of one block of `QUERY_BLOCK` queries against up to
  `max_seq_len` keys.
- **logits**: fp32 logits over the whole vocabulary for every row of a step and their softmax.
"""

from dataclasses import asdict, dataclass, replace
from typing import Dict, List, Optional, Tuple

import torch

from llama import int4_pack, kv_cache
from llama.model import Attention, ModelArgs

# The published Code Llama shapes (SPEC: model family table).
_CODE_LLAMA = dict(vocab_size=32016, norm_eps=1e-5, rope_theta=1e6)
MODEL_SIZES: Dict[str, ModelArgs] = {
    "7b": ModelArgs(dim=4096, n_layers=32, n_heads=32, multiple_of=256, **_CODE_LLAMA),
    "13b": ModelArgs(dim=5120, n_layers=40, n_heads=40, multiple_of=256, **_CODE_LLAMA),
    "34b": ModelArgs(
        dim=8192,
        n_layers=48,
        n_heads=64,
        n_kv_heads=8,
        multiple_of=256,
        ffn_dim_multiplier=1.0,
        **_CODE_LLAMA,
    ),
    "70b": ModelArgs(
        dim=8192,
        n_layers=80,
        n_heads=64,
        n_kv_heads=8,
        multiple_of=4096,
        ffn_dim_multiplier=1.3,
        **_CODE_LLAMA,
    ),
}
# Shards of the released checkpoints.
RELEASED_MP = {"7b": 1, "13b": 2, "34b": 4, "70b": 8}

QUANTIZATIONS = ("int8", "int4")
DEFAULT_GROUP_SIZE = 64
SCALE_BYTES = 2  # bf16 scales and zero points
QUERY_BLOCK = Attention.query_block
PREFILL_CHUNK = 512  # the engine's default prefill_chunk: most prompt tokens in one step
GIB = 2**30


@dataclass(frozen=True)
class Settings:
    """What decides the memory of one rank: the model, how it is split, stored and sized."""

    args: ModelArgs
    mp_size: int = 1
    dtype: torch.dtype = torch.bfloat16
    quantization: Optional[str] = None  # None, "int8" or "int4"
    group_size: int = DEFAULT_GROUP_SIZE
    max_seq_len: int = 2048
    max_batch_size: int = 1
    prefill_chunk: int = PREFILL_CHUNK
    kv_cache_dtype: Optional[str] = None  # None: the model dtype; "int8"
    kv_cache_tokens: Optional[int] = None  # a paged cache's pool (None: every row holds max_seq_len)

    def describe(self) -> str:
        """The settings as the command-line flags that select them."""
        flags = [f"--model_parallel_size {self.mp_size}", f"--dtype {dtype_name(self.dtype)}"]
        if self.quantization is not None:
            flags.append(f"--quantize {self.quantization}")
            if self.quantization == "int4":
                flags.append(f"--group_size {self.group_size}")
        if self.kv_cache_dtype is not None:
            flags.append(f"--kv_cache_dtype {self.kv_cache_dtype}")
        flags += [f"--max_seq_len {self.max_seq_len}", f"--max_batch_size {self.max_batch_size}"]
        if self.kv_cache_tokens is not None:
            flags.append(f"--kv_cache_tokens {self.kv_cache_tokens}")
        return " ".join(flags)


@dataclass(frozen=True)
class RankBytes:
    """Bytes one rank needs, by kind."""

    weights: int
    kv_cache: int
    activations: int
    logits: int

    @property
    def total(self) -> int:
        """All four kinds together."""
        return self.weights + self.kv_cache + self.activations + self.logits

    def as_dict(self) -> Dict[str, int]:
        """The bytes by kind, and the total, by name."""
        return {**asdict(self), "total": self.total}


def dtype_name(dtype: torch.dtype) -> str:
    """ "bfloat16" for torch.bfloat16, and so on."""
    return str(dtype).removeprefix("torch.")


def itemsize(dtype: torch.dtype) -> int:
    """Bytes per value of `dtype`."""
    return torch.empty(0, dtype=dtype).element_size()


def check_split(settings: Settings) -> None:
    """Raise ValueError naming the size that `settings.mp_size` (or the int4 group size) does not
    divide: heads, kv heads, dim, FFN hidden size or vocabulary."""
    args, mp = settings.args, settings.mp_size
    if not isinstance(mp, int) or mp < 1:
        raise ValueError(f"model_parallel_size must be a positive integer, got {mp!r}")
    sizes = {
        "n_heads": args.n_heads,
        "n_kv_heads": args.kv_heads,
        "dim": args.dim,
        "FFN hidden size": args.ffn_hidden_dim,
        "vocab_size": args.vocab_size,
    }
    for name, size in sizes.items():
        if size % mp != 0:
            raise ValueError(
                f"{name}={size} is not divisible by the model-parallel size {mp}: pick a size that divides it"
            )
    if settings.quantization is not None and settings.quantization not in QUANTIZATIONS:
        raise ValueError(
            f"unknown quantization {settings.quantization!r}: use one of {', '.join(QUANTIZATIONS)}"
        )
    if settings.quantization == "int4":
        group = settings.group_size
        # Row-parallel layers (wo, w2) split their input columns: each rank's share must hold whole groups.
        for name, columns in (("dim", args.dim), ("FFN hidden size", args.ffn_hidden_dim)):
            if group < 1 or (columns // mp) % group != 0:
                raise ValueError(
                    f"int4 group size {group} does not divide a rank's share of the {name} "
                    f"({columns} / MP {mp} = {columns // mp}): use a group size that divides it"
                )


def _linear_bytes(out_features: int, in_features: int, settings: Settings) -> int:
    """Bytes of one rank's part of a linear layer already split to [out_features, in_features]."""
    values = out_features * in_features
    if settings.quantization is None:
        return values * itemsize(settings.dtype)
    if settings.quantization == "int8":
        return values + out_features * SCALE_BYTES
    rows = int4_pack.padded_rows(out_features)
    groups = rows * (in_features // settings.group_size)
    return rows * in_features // 2 + groups * 2 * SCALE_BYTES  # int4 values, a scale and zero per group


def weight_bytes(settings: Settings) -> int:
    """Bytes of one rank's weights (see the module docstring for what is quantized)."""
    args, mp = settings.args, settings.mp_size
    size = itemsize(settings.dtype)
    hd, hidden = args.head_dim, args.ffn_hidden_dim
    q_out, kv_out = args.n_heads * hd // mp, args.kv_heads * hd // mp
    per_layer = (
        _linear_bytes(q_out, args.dim, settings)  # wq: column-parallel
        + 2 * _linear_bytes(kv_out, args.dim, settings)  # wk, wv
        + _linear_bytes(args.dim, args.n_heads * hd // mp, settings)  # wo: row-parallel
        + 2 * _linear_bytes(hidden // mp, args.dim, settings)  # w1, w3
        + _linear_bytes(args.dim, hidden // mp, settings)  # w2
        + 2 * args.dim * size  # attention_norm, ffn_norm (replicated)
    )
    embeddings = args.vocab_size * (args.dim // mp) * size
    output = _linear_bytes(args.vocab_size // mp, args.dim, settings)  # column-parallel, quantized too
    return args.n_layers * per_layer + embeddings + output + args.dim * size


def kv_cache_positions(settings: Settings) -> int:
    """Positions one rank's KV cache holds: max_batch_size x max_seq_len, or a paged cache's pool
    (`kv_cache_tokens` rounded up to whole blocks)."""
    if settings.kv_cache_tokens is None:
        return settings.max_batch_size * settings.max_seq_len
    return -(-settings.kv_cache_tokens // kv_cache.KV_BLOCK_LEN) * kv_cache.KV_BLOCK_LEN


def kv_cache_bytes(settings: Settings) -> int:
    """Bytes of one rank's KV cache (keys and values of every layer; int8 codes and their scales
    with `kv_cache_dtype="int8"`), for `kv_cache_positions` positions.

    Raises:
        ValueError: for an unknown `kv_cache_dtype`.
    """
    return kv_cache_bytes_per_token(settings) * kv_cache_positions(settings)


def kv_cache_bytes_per_token(settings: Settings) -> int:
    """Bytes of one rank's KV cache for one token of one sequence (every layer, keys and values).

    Raises:
        ValueError: for an unknown `kv_cache_dtype`.
    """
    args = settings.args
    per_head = kv_cache.bytes_per_position(settings.kv_cache_dtype, settings.dtype, args.head_dim)
    return 2 * args.n_layers * (args.kv_heads // settings.mp_size) * per_head


def activation_bytes(settings: Settings) -> int:
    """Bytes of the largest activation buffers of one prefill step (see the module docstring)."""
    args, mp, context = settings.args, settings.mp_size, settings.max_seq_len
    tokens = min(settings.prefill_chunk, context)
    size = itemsize(settings.dtype)
    residual = 2 * tokens * args.dim * size
    feed_forward = 3 * tokens * (args.ffn_hidden_dim // mp) * size
    heads, kv_heads = args.n_heads // mp, args.kv_heads // mp
    attention = tokens * (heads + 2 * kv_heads) * args.head_dim * size
    attention += heads * min(QUERY_BLOCK, tokens) * context * 4
    return residual + max(feed_forward, attention)


def logit_bytes(settings: Settings) -> int:
    """Bytes of one step's fp32 logits over the vocabulary, and their softmax, for every row."""
    return 2 * settings.max_batch_size * settings.args.vocab_size * 4


def rank_bytes(settings: Settings, check: bool = True) -> RankBytes:
    """What one rank needs for `settings`.

    Raises:
        ValueError: if the model cannot be split into `mp_size` parts or quantized as asked
            (unless `check` is off: then shares are rounded down, for a caller that reports
            splitting errors itself).
    """
    if check:
        check_split(settings)
    return RankBytes(
        weights=weight_bytes(settings),
        kv_cache=kv_cache_bytes(settings),
        activations=activation_bytes(settings),
        logits=logit_bytes(settings),
    )


@dataclass(frozen=True)
class Devices:
    """Where the ranks run: `count` devices of `bytes_each` (GPUs), or one host whose memory all
    ranks share (`shared=True`, CPU)."""

    bytes_each: int
    count: Optional[int] = None  # None: as many as the ranks need
    shared: bool = False
    label: str = ""

    def fits(self, need: RankBytes, mp_size: int) -> bool:
        """Whether `mp_size` ranks needing `need` each fit."""
        if self.shared:
            return need.total * mp_size <= self.bytes_each
        if self.count is not None and mp_size > self.count:
            return False
        return need.total <= self.bytes_each


def fits(settings: Settings, devices: Devices) -> bool:
    """Whether `settings` fit `devices` (False if the model cannot be split as asked)."""
    try:
        need = rank_bytes(settings)
    except ValueError:
        return False
    return devices.fits(need, settings.mp_size)


def _valid_mp_sizes(args: ModelArgs, limit: int) -> List[int]:
    sizes = []
    for mp in range(1, limit + 1):
        try:
            check_split(Settings(args, mp_size=mp))
        except ValueError:
            continue
        sizes.append(mp)
    return sizes


def _largest(low: int, high: int, ok) -> Optional[int]:
    """The largest n in [low, high] with ok(n), for ok monotone (true then false); None if none."""
    if not ok(low):
        return None
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if ok(middle) else (low, middle - 1)
    return low


def smallest_fitting(settings: Settings, devices: Devices, max_mp: int = 64) -> List[Tuple[str, Settings]]:
    """Settings close to `settings` that fit `devices`, each changing one thing, with why.

    In order: the fewest model-parallel ranks at the asked precision; the lightest quantization at
    the asked model-parallel size (int8, then int4); the longest `max_seq_len` and the largest
    `max_batch_size` that fit with the rest unchanged; the largest paged cache (`kv_cache_tokens`,
    whole blocks, at least one `max_seq_len` request) that keeps `max_seq_len` and
    `max_batch_size`. Empty if none of these fits.
    """
    found: List[Tuple[str, Settings]] = []
    limit = max_mp if devices.count is None else min(max_mp, devices.count)
    for mp in _valid_mp_sizes(settings.args, limit):
        candidate = replace(settings, mp_size=mp)
        if fits(candidate, devices):
            found.append(("fewest model-parallel ranks", candidate))
            break
    if settings.quantization != "int4":
        modes = ["int8", "int4"] if settings.quantization is None else ["int4"]
        for mode in modes:
            candidate = replace(settings, quantization=mode)
            if fits(candidate, devices):
                found.append(("lightest quantization", candidate))
                break
    seq = _largest(1, settings.max_seq_len, lambda n: fits(replace(settings, max_seq_len=n), devices))
    if seq is not None and seq < settings.max_seq_len:
        found.append(("longest max_seq_len", replace(settings, max_seq_len=seq)))
    batch = _largest(1, settings.max_batch_size, lambda n: fits(replace(settings, max_batch_size=n), devices))
    if batch is not None and batch < settings.max_batch_size:
        found.append(("largest max_batch_size", replace(settings, max_batch_size=batch)))
    block = kv_cache.KV_BLOCK_LEN
    positions = kv_cache_positions(settings)
    blocks = _largest(
        -(-settings.max_seq_len // block),  # the pool holds one request of max_seq_len at least
        -(-positions // block),
        lambda n: fits(replace(settings, kv_cache_tokens=n * block), devices),
    )
    if blocks is not None and blocks * block < positions:
        found.append(("largest paged KV cache", replace(settings, kv_cache_tokens=blocks * block)))
    return found


def host_devices() -> Optional[Devices]:
    """This machine's free memory: its visible GPUs (free memory of the smallest), or its free RAM
    shared by the ranks; None if unknown."""
    from llama import distributed

    if distributed.cuda_available():
        count = torch.cuda.device_count()
        free = min(torch.cuda.mem_get_info(i)[0] for i in range(count))
        return Devices(free, count=count, label=f"{count} visible GPU(s), {free / GIB:.2f} GiB free each")
    available = distributed.available_memory_bytes(torch.device("cpu"))
    if available is None:
        return None
    return Devices(available, shared=True, label=f"this machine's free RAM, {available / GIB:.2f} GiB")


def check_fits(
    args: ModelArgs,
    mp_size: int,
    dtype: torch.dtype,
    device: torch.device,
    quantization: Optional[str] = None,
    group_size: int = DEFAULT_GROUP_SIZE,
    kv_cache_dtype: Optional[str] = None,
    kv_cache_tokens: Optional[int] = None,
) -> None:
    """Refuse, before loading, settings whose weights, KV cache and buffers do not fit `device`.

    On a CPU the ranks of this machine (`LOCAL_WORLD_SIZE`) share its free RAM; on a GPU each rank
    has its own device.

    Raises:
        ValueError: naming what is needed (by kind), what is free, and what to lower.
    """
    from llama import distributed

    available = distributed.available_memory_bytes(device)
    if available is None:
        return
    settings = Settings(
        args,
        mp_size=mp_size,
        dtype=dtype,
        quantization=quantization,
        group_size=group_size,
        max_seq_len=args.max_seq_len,
        max_batch_size=args.max_batch_size,
        kv_cache_dtype=kv_cache_dtype,
        kv_cache_tokens=kv_cache_tokens,
    )
    need = rank_bytes(settings, check=False)  # loading names a tensor that cannot be split
    ranks_here = distributed.local_world_size() if device.type == "cpu" else 1
    if need.total * ranks_here > available:
        sharing = f" shared by {ranks_here} ranks" if ranks_here > 1 else ""
        sized = (
            f"max_batch_size={args.max_batch_size} x max_seq_len={args.max_seq_len}"
            if kv_cache_tokens is None
            else f"kv_cache_tokens={kv_cache_tokens}"
        )
        raise ValueError(
            f"one rank needs {need.total / GIB:.1f} GiB on {device} (weights {need.weights / GIB:.1f}, "
            f"KV cache {need.kv_cache / GIB:.1f} GiB for {sized}, activations "
            f"{need.activations / GIB:.1f}, logits "
            f"{need.logits / GIB:.1f}) but only {available / GIB:.1f} GiB is free{sharing}: lower "
            "max_seq_len or max_batch_size, quantize, store the KV cache in int8 (kv_cache_dtype), or "
            "use more model-parallel ranks "
            "(`codellama plan` shows what fits)"
        )
