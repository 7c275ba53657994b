"""The decode step of a bf16 model on the CPU in one kernel call per layer.

A decode step runs every layer's RMSNorm, projections, rotary embedding, cache write, attention
and residual adds as one call of `kernels.decode_layer` (llama/csrc/decode_layer.h) instead of a
dozen Python calls: the same kernels in the same order on the same values, so the logits are bit
for bit those of the layer-by-layer step, without its Python and dispatch cost (5-9 ms a step
on two cores: a sixth of a bf16 step of a 1.1B model, a third of an int4 one). Only
silu(gate) * up stays with torch, between one layer's call and the next.

It takes a step only where the layer-by-layer step would call exactly those kernels: one model
rank, bf16 activations, a bf16 or int8 cache (dense or paged), weights the matrix-vector kernels
read (bf16, or int8/int4 on the hand-written kernel), the RMSNorm, rotary and decode-attention
kernels on, and at most `kernels.MAX_ROWS` rows. Otherwise `DecodeLayers.applies` says no and the model runs
its layers one by one.
"""

from __future__ import annotations

import ctypes
import struct
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from llama import distributed, kernels, quantization

if TYPE_CHECKING:  # the model imports this module
    from llama.model import Transformer

_PROJECTION_KINDS = {"bf16": 0, "int8": 1, "int4": 2}
_CACHE_KINDS = {"bf16": 0, "int8": 1}
# Buffers of a step are laid out in one allocation, each starting at a multiple of this many elements.
_ALIGN = 64


def _float_bits(value: float) -> int:
    """The fp32 bits of `value` (rounded to fp32 as ctypes passes a float)."""
    return struct.unpack("<I", struct.pack("<f", value))[0]


def _projection_kind(weights: Sequence[object], x: torch.Tensor) -> Optional[Tuple[str, int]]:
    """(kind, int4 group size) when the model multiplies `x` by each of `weights` with the
    matrix-vector kernels in one call or one each (the same results), all of one kind; else None."""
    if all(isinstance(w, torch.Tensor) for w in weights):
        ok = all(w.dtype == torch.bfloat16 and kernels.kernel_applies(x, w) for w in weights)
        return ("bf16", 0) if ok else None
    if not all(isinstance(w, quantization.QuantizedWeight) for w in weights):
        return None
    first = weights[0]
    for w in weights:
        if w.path(x) != "kernel" or w.scheme != first.scheme or w.in_features != first.in_features:
            return None
        if w.scheme.mode == "int4" and not w.kernel_packed:
            return None
    return first.scheme.mode, first.scheme.group_size if first.scheme.mode == "int4" else 0


def _projection_table(weights: Sequence[object], kind: str) -> ctypes.Array:
    """The fused table of `weights` for the kernels of `kind`."""
    if kind == "bf16":
        return kernels.fused_table(weights, [w.shape[0] for w in weights])
    if kind == "int8":
        return kernels.fused_table(
            [w.codes for w in weights], [w.out_features for w in weights], [w.scales for w in weights]
        )
    return kernels.fused_table([w.codes for w in weights], [w.out_features for w in weights])


class DecodeLayers:
    """The tables of a model's layers for `kernels.decode_layer`, built by the first `applies` that
    finds a step may use them; `run` takes a decode step's hidden states through every layer.

    The tables hold the addresses of the weights and caches (and keep those tensors alive): the
    model drops them when it reallocates its cache (`Transformer.allocate_cache`) or moves or
    converts its tensors (`Module.to` and the like).
    """

    def __init__(self, model: "Transformer"):
        params = model.params
        self.model = model
        self.dim, self.heads, self.kv_heads = params.dim, params.n_heads, params.kv_heads
        self.head_dim, self.hidden = params.head_dim, params.ffn_hidden_dim
        self._applies: Dict[tuple, bool] = {}
        self._built_kinds: List[Tuple[str, int]] = []  # each projection's (kind, group size) in the tables
        self._step_fields = 0
        self.tables: List[ctypes.Array] = []
        # Every tensor and fused table whose address a layer table holds: kept alive while the
        # tables are, so a table never points at freed memory, even if the model's tensors were
        # replaced.
        self._held: List[object] = []

    @staticmethod
    def _groups(layer) -> List[Tuple[Sequence[object], int]]:
        """Each projection's weights and input size, in the tables' order: qkv, wo, w1|w3, w2."""
        attention, ffn = layer.attention, layer.feed_forward
        qkv = (attention.wq.weight, attention.wk.weight, attention.wv.weight)
        return [
            (qkv, 0),
            ((attention.wo.weight,), 1),
            ((ffn.w1.weight, ffn.w3.weight), 0),
            ((ffn.w2.weight,), 2),
        ]

    def applies(self, rows: int) -> bool:
        """Whether a decode step of `rows` rows may run through `run`: bit for bit the layer-by-layer
        step (see the module docstring). Checked once per rows count and kernel setting."""
        key = (rows, kernels.enabled(), kernels.variant(), torch.is_grad_enabled())
        if key not in self._applies:
            self._applies[key] = self._check(rows)
        return self._applies[key]

    def _check(self, rows: int) -> bool:
        model = self.model
        if (
            not 1 <= rows <= kernels.MAX_ROWS
            or torch.compiler.is_compiling()
            or distributed.model_parallel_world_size() != 1
            or model.tok_embeddings.weight.dtype != torch.bfloat16
            or not kernels.kernel_available()
        ):
            return False
        inputs = {
            0: torch.empty(rows, 1, self.dim, dtype=torch.bfloat16),
            1: torch.empty(rows, 1, self.heads * self.head_dim, dtype=torch.bfloat16),
            2: torch.empty(rows, 1, self.hidden, dtype=torch.bfloat16),
        }
        queries = torch.empty(rows, 1, self.heads, self.head_dim, dtype=torch.bfloat16)
        angles = torch.empty(rows, 1, 1, self.head_dim // 2)
        kinds = []
        for layer in model.layers:
            cache = layer.attention.kv_cache
            if cache is None or cache.dtype != torch.bfloat16 or cache.kv_cache_dtype not in (None, "int8"):
                return False
            if not cache.decode_kernel_applies(queries[:, 0]) or not kernels.rotary_applies(queries, angles):
                return False
            if not (layer.attention_norm.uses_kernel(inputs[0]) and layer.ffn_norm.uses_kernel(inputs[0])):
                return False
            for weights, source in self._groups(layer):
                kind = _projection_kind(weights, inputs[source])
                if kind is None:
                    return False
                kinds.append(kind)
        if not self.tables:
            self._build(kinds)
            self._step_fields = kernels.decode_table_fields()[1]
            if self._step_fields != 6 + 8:  # what `run` fills: see DecodeStepField
                raise RuntimeError(
                    "llama/csrc/decode_layer.h and llama.fused_decode disagree on the step table"
                )
        return kinds == self._built_kinds

    def _build(self, kinds: List[Tuple[str, int]]) -> None:
        """The layer tables, from the kinds `_check` found for each projection."""
        self._built_kinds = kinds
        kinds_left = iter(kinds)
        for layer in self.model.layers:
            cache = layer.attention.kv_cache
            keys, values = cache.keys, cache.values
            table = cache.blocks.table if cache.blocks is not None else None
            fields = [self.dim, self.heads, self.kv_heads, self.head_dim, self.hidden]
            fields += [layer.attention_norm.weight.data_ptr(), _float_bits(layer.attention_norm.eps)]
            fields += [layer.ffn_norm.weight.data_ptr(), _float_bits(layer.ffn_norm.eps)]
            fields += [_float_bits(self.head_dim**-0.5)]
            self._held += [layer.attention_norm.weight, layer.ffn_norm.weight, keys, values, table]
            for weights, _ in self._groups(layer):
                self._held += list(weights)
                kind, group = next(kinds_left)
                projection = _projection_table(weights, kind)
                self._held.append(projection)
                fields += [_PROJECTION_KINDS[kind], group, ctypes.addressof(projection), len(weights)]
            fields += [
                keys.data_ptr(),
                values.data_ptr(),
                min(kernels.storage_elements(keys), kernels.storage_elements(values)),
            ]
            fields += [keys.shape[0], keys.shape[2], keys.stride(0), keys.stride(1)]
            if table is None:
                fields += [0, 0, 0]
            else:
                fields += [table.data_ptr(), table.numel(), table.shape[1]]
            if cache.kv_cache_dtype == "int8":
                key_scales, value_scales = cache.key_scales, cache.value_scales
                self._held += [key_scales, value_scales]
                fields += [_CACHE_KINDS["int8"], key_scales.data_ptr(), value_scales.data_ptr()]
                fields += [min(kernels.storage_elements(key_scales), kernels.storage_elements(value_scales))]
                fields += [key_scales.stride(0), key_scales.stride(1)]
            else:
                fields += [_CACHE_KINDS["bf16"], 0, 0, 0, 0, 0]
            if len(fields) != kernels.decode_table_fields()[0]:
                raise RuntimeError(
                    "llama/csrc/decode_layer.h and llama.fused_decode disagree on the layer table"
                )
            self.tables.append((ctypes.c_int64 * len(fields))(*fields))

    def run(
        self, h: torch.Tensor, rows: torch.Tensor, lengths: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        """The hidden states `h` [B, dim] (bf16, contiguous; updated in place and returned) after
        every layer, for the new tokens of cache rows `rows` [B] (int64) with `lengths` [B]
        (int64) positions each (the new one last), rotated by `cos`/`sin` [B, head_dim / 2]
        (fp32). Check `applies(B)` first; the model has fitted a paged cache's blocks.

        Raises:
            ValueError: if a row or position is outside the cache, or the tensors are not of the
                dtypes and shapes above.
        """
        M = h.shape[0]
        expected = {
            "h": (h, torch.bfloat16, (M, self.dim)),
            "rows": (rows, torch.int64, (M,)),
            "lengths": (lengths, torch.int64, (M,)),
            "cos": (cos, torch.float32, (M, self.head_dim // 2)),
            "sin": (sin, torch.float32, (M, self.head_dim // 2)),
        }
        for name, (tensor, dtype, shape) in expected.items():
            if tensor.dtype != dtype or tuple(tensor.shape) != shape or not tensor.is_cpu:
                raise ValueError(
                    f"{name} must be a {dtype} CPU tensor of shape {shape}, "
                    f"not {tensor.dtype} {tuple(tensor.shape)} on {tensor.device}"
                )
        if not h.is_contiguous():
            raise ValueError("h must be contiguous (it is updated in place)")
        sizes = [
            M * self.dim,  # normed
            M * (self.heads + 2 * self.kv_heads) * self.head_dim,  # qkv
            M * self.heads * self.head_dim,  # rotated queries
            M * self.kv_heads * self.head_dim,  # rotated new keys
            M * self.heads * self.head_dim,  # attended
            M * self.dim,  # projected
            M * 2 * self.hidden,  # gate and up
            M * self.hidden,  # silu(gate) * up
        ]
        starts = []
        total = 0
        for size in sizes:
            starts.append(total)
            total += -(-size // _ALIGN) * _ALIGN
        scratch = torch.empty(total, dtype=torch.bfloat16)
        base = scratch.data_ptr()
        addresses = [base + 2 * start for start in starts]
        rows, lengths = rows.contiguous(), lengths.contiguous()
        cos, sin = cos.contiguous(), sin.contiguous()
        values = [
            M,
            h.data_ptr(),
            rows.data_ptr(),
            lengths.data_ptr(),
            cos.data_ptr(),
            sin.data_ptr(),
            *addresses,
        ]
        step = (ctypes.c_int64 * self._step_fields)(*values)
        gate_up = scratch[starts[6] : starts[6] + sizes[6]].view(M, 2 * self.hidden)
        gate, up = gate_up[:, : self.hidden], gate_up[:, self.hidden :]
        activated = scratch[starts[7] : starts[7] + sizes[7]].view(M, self.hidden)
        finish = None
        for table in self.tables:
            kernels.decode_layer(finish, table, step)
            torch.mul(F.silu(gate), up, out=activated)
            finish = table
        kernels.decode_layer(finish, None, step)
        return h
