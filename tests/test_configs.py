"""The released Code Llama configurations, built on the meta device (no memory).

Expected parameter counts and per-rank shard shapes are computed here from the released models' table
(dim, layers, heads, kv heads, FFN hidden size, vocabulary, MP) and its sharding rules, not
from the model code.
"""

import fairscale.nn.model_parallel.initialize as fs_init
import fairscale.nn.model_parallel.layers as fs_layers
import pytest
import torch

from llama import checkpoint, distributed
from llama.generation import kv_cache_bytes
from llama.model import ModelArgs

# the released models' table: model -> (MP, dim, layers, heads, kv heads, FFN hidden, vocab)
TABLE = {
    "7B": (1, 4096, 32, 32, 32, 11008, 32016),
    "13B": (2, 5120, 40, 40, 40, 13824, 32016),
    "34B": (4, 8192, 48, 64, 8, 22016, 32016),
    "70B": (8, 8192, 80, 64, 8, 28672, 32016),
}

# The params.json of each release (FFN size follows from multiple_of / ffn_dim_multiplier).
PARAMS = {
    "7B": dict(dim=4096, n_layers=32, n_heads=32, multiple_of=256),
    "13B": dict(dim=5120, n_layers=40, n_heads=40, multiple_of=256),
    "34B": dict(dim=8192, n_layers=48, n_heads=64, n_kv_heads=8, multiple_of=256, ffn_dim_multiplier=1.0),
    "70B": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096, ffn_dim_multiplier=1.3),
}

# Published sizes (billions of parameters).
PUBLISHED = {"7B": 6.74, "13B": 13.0, "34B": 33.7, "70B": 69.0}


def model_args(name: str) -> ModelArgs:
    return ModelArgs(**PARAMS[name], norm_eps=1e-5, rope_theta=1e6, vocab_size=32016)


def expected_shapes(name: str, mp: int) -> dict:
    """Per-rank tensor shapes from the released checkpoints' sharding rules."""
    _, dim, layers, heads, kv_heads, hidden, vocab = TABLE[name]
    head_dim = dim // heads
    shapes = {
        "tok_embeddings.weight": (vocab, dim // mp),
        "norm.weight": (dim,),
        "output.weight": (vocab // mp, dim),
    }
    for i in range(layers):
        p = f"layers.{i}."
        shapes[p + "attention.wq.weight"] = (heads * head_dim // mp, dim)
        shapes[p + "attention.wk.weight"] = (kv_heads * head_dim // mp, dim)
        shapes[p + "attention.wv.weight"] = (kv_heads * head_dim // mp, dim)
        shapes[p + "attention.wo.weight"] = (dim, heads * head_dim // mp)
        shapes[p + "feed_forward.w1.weight"] = (hidden // mp, dim)
        shapes[p + "feed_forward.w3.weight"] = (hidden // mp, dim)
        shapes[p + "feed_forward.w2.weight"] = (dim, hidden // mp)
        shapes[p + "attention_norm.weight"] = (dim,)
        shapes[p + "ffn_norm.weight"] = (dim,)
    return shapes


def expected_count(name: str) -> int:
    _, dim, layers, heads, kv_heads, hidden, vocab = TABLE[name]
    kv_dim = kv_heads * (dim // heads)
    per_layer = 2 * dim * dim + 2 * dim * kv_dim + 3 * dim * hidden + 2 * dim
    return 2 * vocab * dim + dim + layers * per_layer


@pytest.fixture
def fake_model_parallel(monkeypatch):
    """Make fairscale report a model-parallel world of `size` ranks (shapes only: no group)."""

    def set_size(size: int) -> None:
        for module in (fs_init, fs_layers):
            monkeypatch.setattr(module, "get_model_parallel_world_size", lambda: size)

    return set_size


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


@pytest.mark.parametrize("name", list(TABLE))
def test_ffn_hidden_size_follows_from_params(name):
    assert model_args(name).ffn_hidden_dim == TABLE[name][5]


@pytest.mark.parametrize("name", list(TABLE))
def test_full_model_parameter_count(name):
    distributed.init_model_parallel()
    before = resident_bytes()
    model = checkpoint.empty_model(model_args(name))
    grown = resident_bytes() - before
    params = list(model.parameters())
    assert all(p.device.type == "meta" for p in params)
    assert grown < 64 * 2**20, f"building {name} on the meta device took {grown / 2**20:.0f} MiB"
    assert model.layers[0].attention.cache_k is None  # no KV cache either

    count = sum(p.numel() for p in params)
    assert count == expected_count(name)
    assert count / 1e9 == pytest.approx(PUBLISHED[name], rel=0.01)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected_shapes(name, 1)


@pytest.mark.parametrize("name", list(TABLE))
def test_per_rank_shard_shapes(name, fake_model_parallel):
    mp = TABLE[name][0]
    fake_model_parallel(mp)
    model = checkpoint.empty_model(model_args(name))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == expected_shapes(name, mp)
    # Every rank holds the same shapes; together they hold the model once, norms replicated.
    _, dim, layers, *_ = TABLE[name]
    replicated = dim * (2 * layers + 1)
    per_rank = sum(v.numel() for v in model.state_dict().values())
    assert mp * (per_rank - replicated) + replicated == expected_count(name)
    attention = model.layers[0].attention
    assert attention.n_local_heads == TABLE[name][3] // mp
    assert attention.n_local_kv_heads == TABLE[name][4] // mp


def test_kv_cache_size_per_rank():
    """70B at MP=8: one kv head per rank; 80 layers x (K and V) x 128 x 4096 tokens x 2 bytes."""
    args = model_args("70B")
    args.max_batch_size, args.max_seq_len = 1, 4096
    assert kv_cache_bytes(args, 8, torch.bfloat16) == 80 * 2 * 1 * 128 * 4096 * 2
    seven = model_args("7B")
    seven.max_batch_size, seven.max_seq_len = 2, 16384
    assert kv_cache_bytes(seven, 1, torch.float32) == 32 * 2 * 32 * 128 * 16384 * 2 * 4
