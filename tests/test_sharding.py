"""Cutting one rank's part out of N saved shards, against slicing the whole tensor."""

import pytest
import torch

from llama import hf_format, sharding
from llama.model import ModelArgs


def saved_shards(full: torch.Tensor, dim: int, n: int):
    return [piece.clone() for piece in torch.chunk(full, n, dim=dim)]


@pytest.mark.parametrize("key", ["layers.3.attention.wq.weight", "layers.0.feed_forward.w2.weight"])
@pytest.mark.parametrize("saved", [1, 2, 3, 4, 6])
@pytest.mark.parametrize("ranks", [1, 2, 3, 4, 6])
def test_rank_part_is_the_ranks_slice_of_the_whole(key, saved, ranks):
    full = torch.arange(12 * 24, dtype=torch.float32).reshape(12, 24)
    dim = sharding.split_dim(key)
    pieces = saved_shards(full, dim, saved)
    for rank in range(ranks):
        expected = torch.chunk(full, ranks, dim=dim)[rank]
        part = sharding.rank_part(key, pieces, rank, ranks)
        assert torch.equal(part, expected)
        assert part.is_contiguous()


def test_split_dims_follow_the_fairscale_layers():
    assert sharding.split_dim("tok_embeddings.weight") == 1
    assert sharding.split_dim("output.weight") == 0
    for name, dim in [("wq", 0), ("wk", 0), ("wv", 0), ("wo", 1)]:
        assert sharding.split_dim(f"layers.7.attention.{name}.weight") == dim
    for name, dim in [("w1", 0), ("w3", 0), ("w2", 1)]:
        assert sharding.split_dim(f"layers.0.feed_forward.{name}.weight") == dim
    for key in ["norm.weight", "layers.0.attention_norm.weight", "layers.0.ffn_norm.weight"]:
        assert sharding.split_dim(key) is None


def test_replicated_tensor_comes_from_the_first_shard_without_copy():
    pieces = [torch.ones(8), torch.ones(8)]
    assert sharding.rank_part("norm.weight", pieces, 1, 4) is pieces[0]


def test_a_part_inside_one_shard_is_a_view_not_a_copy():
    # Splitting one saved shard into two ranks along dim 0 must not copy the source.
    source = torch.randn(16, 8)
    part = sharding.rank_part("output.weight", [source], 1, 2)
    assert part.untyped_storage().data_ptr() == source.untyped_storage().data_ptr()
    assert torch.equal(part, source[8:])
    # Same shard count as ranks: each rank gets its shard itself.
    pieces = saved_shards(torch.randn(8, 16), 1, 2)
    part = sharding.rank_part("layers.0.attention.wo.weight", pieces, 1, 2)
    assert part.data_ptr() == pieces[1].data_ptr() and torch.equal(part, pieces[1])


def test_a_size_that_does_not_divide_names_the_tensor_and_sizes():
    pieces = [torch.zeros(170, 64)]
    with pytest.raises(ValueError) as err:
        sharding.rank_part("layers.1.feed_forward.w1.weight", pieces, 0, 4)
    message = str(err.value)
    for fragment in ["layers.1.feed_forward.w1.weight", "(170, 64)", "170", "4"]:
        assert fragment in message


def test_shards_of_different_shapes_are_rejected():
    with pytest.raises(ValueError, match="output.weight"):
        sharding.full_shape("output.weight", [(8, 4), (6, 4)])


def test_hf_row_order_is_evens_then_odds_per_head():
    # Per head, Hugging Face stores rows [0, 2, 4, .., 1, 3, 5, ..].
    head_dim, heads = 6, 3
    meta = torch.arange(heads * head_dim, dtype=torch.float32)[:, None].repeat(1, 2)
    order = [0, 2, 4, 1, 3, 5]
    expected = torch.cat([meta[h * head_dim + torch.tensor(order)] for h in range(heads)])
    hf = hf_format.to_hf_rows(meta, heads)
    assert torch.equal(hf, expected)
    assert torch.equal(hf_format.from_hf_rows(hf, heads), meta)


def test_hf_names_round_trip():
    keys = ["tok_embeddings.weight", "norm.weight", "output.weight"] + [
        f"layers.2.{suffix}" for suffix in sharding.SPLIT_DIMS if suffix.startswith(("attention", "feed"))
    ]
    keys += ["layers.2.attention_norm.weight", "layers.2.ffn_norm.weight"]
    assert hf_format.hf_name("layers.2.attention.wq.weight") == "model.layers.2.self_attn.q_proj.weight"
    assert hf_format.hf_name("layers.2.feed_forward.w1.weight") == "model.layers.2.mlp.gate_proj.weight"
    assert hf_format.hf_name("layers.2.feed_forward.w2.weight") == "model.layers.2.mlp.down_proj.weight"
    assert hf_format.hf_name("output.weight") == "lm_head.weight"
    assert len({hf_format.hf_name(k) for k in keys}) == len(keys)
    for key in keys:
        assert hf_format.meta_name(hf_format.hf_name(key)) == key
    with pytest.raises(ValueError, match="lm_head.bias"):
        hf_format.meta_name("lm_head.bias")


# the released models' table (7B, 13B, 34B, 70B) and two tiny widths.
@pytest.mark.parametrize(
    "dim, hidden", [(4096, 11008), (5120, 13824), (8192, 22016), (8192, 28672), (64, 192), (64, 170)]
)
def test_ffn_rounding_reproduces_the_hidden_size(dim, hidden):
    multiple_of, multiplier = hf_format.ffn_rounding(dim, hidden)
    assert ModelArgs(dim=dim, multiple_of=multiple_of, ffn_dim_multiplier=multiplier).ffn_hidden_dim == hidden
