"""Every tensor of a Llama checkpoint in one table: its Meta name, its Hugging Face name, its shape,
the dim fairscale splits across model-parallel ranks, and whether it is a linear layer's weight
(the tensors weight-only quantization rewrites).

Sharding, the Hugging Face names, the expected shapes and the quantized storage all read this
table; the model's layer classes (`llama.model`) are the one other place that knows the shapes.
"""

from dataclasses import dataclass
from typing import Dict, Optional, Tuple


@dataclass(frozen=True)
class TensorLayout:
    """One checkpoint tensor. Per-layer tensors are named `layers.{i}.{meta_name}`."""

    meta_name: str
    hf_name: str  # after `model.layers.{i}.` for per-layer tensors
    shape: Tuple[str, ...]  # sizes by name: vocab, dim, q (heads x head_dim), kv, hidden
    split_dim: Optional[int]  # None: replicated on every rank
    per_layer: bool
    linear: bool  # a linear layer's [out, in] weight


# ParallelEmbedding splits the embedding dim; ColumnParallelLinear its output rows;
# RowParallelLinear its input columns. The RMSNorm weights are replicated.
TENSORS: Tuple[TensorLayout, ...] = (
    TensorLayout("tok_embeddings.weight", "model.embed_tokens.weight", ("vocab", "dim"), 1, False, False),
    TensorLayout("attention.wq.weight", "self_attn.q_proj.weight", ("q", "dim"), 0, True, True),
    TensorLayout("attention.wk.weight", "self_attn.k_proj.weight", ("kv", "dim"), 0, True, True),
    TensorLayout("attention.wv.weight", "self_attn.v_proj.weight", ("kv", "dim"), 0, True, True),
    TensorLayout("attention.wo.weight", "self_attn.o_proj.weight", ("dim", "q"), 1, True, True),
    TensorLayout("feed_forward.w1.weight", "mlp.gate_proj.weight", ("hidden", "dim"), 0, True, True),
    TensorLayout("feed_forward.w2.weight", "mlp.down_proj.weight", ("dim", "hidden"), 1, True, True),
    TensorLayout("feed_forward.w3.weight", "mlp.up_proj.weight", ("hidden", "dim"), 0, True, True),
    TensorLayout("attention_norm.weight", "input_layernorm.weight", ("dim",), None, True, False),
    TensorLayout("ffn_norm.weight", "post_attention_layernorm.weight", ("dim",), None, True, False),
    TensorLayout("norm.weight", "model.norm.weight", ("dim",), None, False, False),
    TensorLayout("output.weight", "lm_head.weight", ("vocab", "dim"), 0, False, True),
)

BY_META_NAME: Dict[str, TensorLayout] = {t.meta_name: t for t in TENSORS}

# Suffixes of the tensors a quantized linear weight `X.weight` is stored as, besides `X.weight`
# itself (the integer codes): one scale per output row (int8) or per group of inputs (int4), and
# for int4 one zero per group. They are split like the codes along the same dim when they have it.
QUANTIZED_PARTS = ("scales", "zeros")


def layout_of(key: str) -> Optional[TensorLayout]:
    """The table entry of a Meta checkpoint key (`layers.3.attention.wq.weight`, `norm.weight`),
    None for keys outside the table. A quantized part (`layers.3.attention.wq.scales`) maps to
    its weight's entry."""
    base, _, last = key.rpartition(".")
    if last in QUANTIZED_PARTS:
        key = base + ".weight"
    if key in BY_META_NAME and not BY_META_NAME[key].per_layer:
        return BY_META_NAME[key]
    parts = key.split(".", 2)
    if len(parts) == 3 and parts[0] == "layers" and parts[1].isdigit():
        entry = BY_META_NAME.get(parts[2])
        if entry is not None and entry.per_layer:
            return entry
    return None


def split_dim(key: str) -> Optional[int]:
    """The dim along which `key` is split across model-parallel ranks, None if replicated."""
    entry = layout_of(key)
    return None if entry is None else entry.split_dim


def is_linear_weight(key: str) -> bool:
    """True for a linear layer's weight (`...wq.weight`, `output.weight`), not its quantized parts."""
    entry = layout_of(key)
    return entry is not None and entry.linear and key.endswith(".weight")


def full_shapes(sizes: Dict[str, int], n_layers: int) -> Dict[str, Tuple[int, ...]]:
    """Shape of every whole (unsharded) tensor, in checkpoint order, given the named sizes
    (vocab, dim, q, kv, hidden) and the number of layers."""
    shapes = {}
    for entry in TENSORS:
        shape = tuple(sizes[name] for name in entry.shape)
        if entry.per_layer:
            shapes.update({f"layers.{i}.{entry.meta_name}": shape for i in range(n_layers)})
        else:
            shapes[entry.meta_name] = shape
    return shapes
