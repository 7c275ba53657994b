"""The decode step in one kernel call per layer (`llama.fused_decode`) against the same model's
layer-by-layer step: the same logits and cache bit for bit, for every weight kind, dense and paged
caches, one row and several at uneven positions, each kernel variant this CPU runs."""

from typing import List, Optional

import pytest
import torch

from llama import distributed, fused_decode, kernels
from llama.model import ModelArgs, Transformer, pack_segments
from llama.quantization import make_scheme
from tests.test_kernels import variant  # noqa: F401  (the fixture: each kernel variant this CPU runs)
from tests.test_quantized_kernels import quantize_model
from tests.tiny import random_state_dict, tiny_params

CPU = torch.device("cpu")


def model_of(weights: str, kv_cache_tokens: Optional[int], fused: bool, kv_cache_dtype: Optional[str] = None):
    """Two layers, head size 64, 3 cache rows of 512 positions, bf16 activations; `weights` bf16,
    int8 or int4 (groups of 64); the one-call decode step on or off."""
    distributed.init_model_parallel()
    params = tiny_params(vocab_size=256, dim=128, n_heads=2, n_kv_heads=1, n_layers=2, multiple_of=64)
    args = ModelArgs(max_seq_len=512, max_batch_size=3, **params)
    with torch.device("cpu"):
        model = Transformer(args)
    model.load_state_dict(random_state_dict(args, 5))
    model = model.to(torch.bfloat16).eval()
    if weights != "bf16":
        quantize_model(model, make_scheme(weights, 64 if weights == "int4" else None))
    model.allocate_cache(torch.bfloat16, CPU, kv_cache_dtype, kv_cache_tokens)
    model.fuse_decode_layers = fused
    return model


def count_layer_calls(monkeypatch) -> List[int]:
    calls = [0]
    original = kernels.decode_layer

    def counted(*args):
        calls[0] += 1
        return original(*args)

    monkeypatch.setattr(kernels, "decode_layer", counted)
    return calls


@torch.inference_mode()
def decode_run(model: Transformer) -> List[torch.Tensor]:
    """Prefill rows 0 and 2, then decode one row and then three rows (rows out of order, uneven
    positions, one of them past a block boundary of 256): every step's logits, then the caches as
    stored."""
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(1, 255, (300,), generator=g)
    model.forward_segments(torch.cat([prompt[:255], prompt[:40]]), pack_segments([(0, 0, 255), (2, 0, 40)]))
    model.forward_segments(prompt[:7], pack_segments([(1, 0, 7)]))
    steps = [model.forward_decode(torch.tensor([5]), torch.tensor([2]), torch.tensor([40]))]
    tokens = torch.tensor([9, 4, 7])
    for step in range(3):  # row 0 crosses from position 255 into its second block
        positions = torch.tensor([255 + step, 41 + step, 7 + step])
        steps.append(model.forward_decode(tokens + step, torch.tensor([0, 2, 1]), positions))
    stored = []  # the caches as stored (int8: codes and scales), blocks included
    for layer in model.layers:
        cache = layer.attention.kv_cache
        stored += [cache.keys, cache.values]
        if cache.kv_cache_dtype == "int8":
            stored += [cache.key_scales, cache.value_scales]
    return steps + stored


@pytest.mark.parametrize("kv_cache_dtype", [None, "int8"], ids=["bf16 cache", "int8 cache"])
@pytest.mark.parametrize("kv_cache_tokens", [None, 4 * 256], ids=["dense", "paged"])
@pytest.mark.parametrize("weights", ["bf16", "int8", "int4"])
def test_one_call_per_layer_gives_the_layer_by_layer_logits_and_cache(
    weights, kv_cache_tokens, kv_cache_dtype, monkeypatch, variant  # noqa: F811
):
    calls = count_layer_calls(monkeypatch)
    layer_by_layer = decode_run(
        model_of(weights, kv_cache_tokens, fused=False, kv_cache_dtype=kv_cache_dtype)
    )
    assert calls[0] == 0
    model = model_of(weights, kv_cache_tokens, fused=True, kv_cache_dtype=kv_cache_dtype)
    one_call = decode_run(model)
    # The fast path is taken (a failure here means a decode step fell back to the slow one): per
    # step one call per layer and one to finish the last.
    assert calls[0] == 4 * (len(model.layers) + 1)
    for got, want in zip(one_call, layer_by_layer):
        assert torch.equal(got, want)


def test_steps_it_cannot_take_fall_back_to_the_layers(monkeypatch):
    """fp32 activations, the kernels off, more rows than the kernels take, or autograd on: the
    layers run one by one (and give their usual results)."""
    calls = count_layer_calls(monkeypatch)
    args = (torch.tensor([3]), torch.tensor([0]), torch.tensor([0]))
    with torch.inference_mode():
        fp32 = model_of("bf16", None, fused=True).to(torch.float32)
        fp32.allocate_cache(torch.float32, CPU)
        fp32.forward_decode(*args)
        assert calls[0] == 0
        model = model_of("bf16", None, fused=True)
        assert model._fused_decode_layers(kernels.MAX_ROWS + 1) is None
        kernels.set_enabled(False)
        try:
            assert model._fused_decode_layers(1) is None
            model.forward_decode(*args)
        finally:
            kernels.set_enabled(True)
        assert calls[0] == 0
        model.forward_decode(*args)
        assert calls[0] == len(model.layers) + 1
    trainable = model_of("bf16", None, fused=True)
    with torch.enable_grad():
        assert any(p.requires_grad for p in trainable.parameters())
        assert trainable._fused_decode_layers(1) is None
    with torch.no_grad():
        assert trainable._fused_decode_layers(1) is not None


def test_a_new_cache_gets_new_tables(monkeypatch):
    """Reallocating the cache drops the tables that point at the old one: the step after it writes
    and reads the new cache."""
    model, reference = model_of("bf16", None, fused=True), model_of("bf16", None, fused=False)
    args = (torch.tensor([3, 4]), torch.tensor([0, 1]), torch.tensor([0, 0]))
    with torch.inference_mode():
        model.forward_decode(*args)
        model.allocate_cache(torch.bfloat16, CPU, None, 2 * 256)  # now paged
        reference.allocate_cache(torch.bfloat16, CPU, None, 2 * 256)
        for step in range(2):
            positions = torch.tensor([step, step])
            model._fit_blocks(0, step + 1, shrink=False)
            got = model.forward_decode(args[0], args[1], positions)
            want = reference.forward_decode(args[0], args[1], positions)
            assert torch.equal(got, want)
        # The steps wrote the new cache (tables left on the old one would leave it zero).
        for layer, same in zip(model.layers, reference.layers):
            assert same.attention.kv_cache.keys.any()
            assert torch.equal(layer.attention.kv_cache.keys, same.attention.kv_cache.keys)


@torch.inference_mode()
def test_the_kernel_refuses_a_position_outside_the_cache():
    """A step table naming a position past a row's end is refused before anything is written."""
    model = model_of("bf16", None, fused=True)
    layers = fused_decode.DecodeLayers(model)
    assert layers.applies(1)
    keys = model.layers[0].attention.kv_cache.keys.clone()
    h = model.tok_embeddings(torch.tensor([3])).contiguous()
    angles = torch.zeros(1, 32)
    with pytest.raises(ValueError, match="do not fit"):
        layers.run(h, torch.tensor([0]), torch.tensor([513]), angles, angles)
    with pytest.raises(ValueError, match="do not fit"):
        layers.run(h, torch.tensor([3]), torch.tensor([1]), angles, angles)  # a row past the cache's 3
    with pytest.raises(ValueError, match="lengths must be a torch.int64"):
        layers.run(h, torch.tensor([0]), torch.tensor([1], dtype=torch.int32), angles, angles)
    assert torch.equal(model.layers[0].attention.kv_cache.keys, keys)


def test_the_kernel_report_names_the_path_a_decode_step_takes(variant):  # noqa: F811
    """`python -m llama.kernels` says a bf16 decode step runs one call per layer exactly when a bf16
    model's step does, and layer by layer with the kernels off."""
    from llama import kernel_report

    def reported() -> str:
        rows = kernel_report.operation_paths()
        return next(path for op, dtype, path in rows if op.startswith("decode step") and dtype == "bf16")

    model = model_of("bf16", None, fused=True)
    with torch.inference_mode():
        assert model._fused_decode_layers(1) is not None
    assert reported().startswith(f"one codellama decode-layer call per layer ({variant})")
    kernels.set_enabled(False)
    try:
        with torch.inference_mode():
            assert model._fused_decode_layers(1) is None
        assert reported().startswith("layer by layer")
    finally:
        kernels.set_enabled(True)


def test_converting_the_model_drops_the_tables():
    """`Module.to` replaces every tensor the tables point at: the step after it builds new tables
    and gives the logits of a model converted the same way, decoded layer by layer (changed
    after the conversion, so tables left on the old tensors would give other logits)."""
    model, reference = model_of("bf16", None, fused=True), model_of("bf16", None, fused=False)
    args = (torch.tensor([3]), torch.tensor([0]), torch.tensor([0]))
    with torch.inference_mode():
        model.forward_decode(*args)
        old_tables = model._decode_layers
    for m in (model, reference):
        m.to(torch.float32).to(torch.bfloat16)
        with torch.no_grad():
            m.layers[0].feed_forward.w2.weight.mul_(2)
            m.layers[1].attention.wq.weight.mul_(-1)
    with torch.inference_mode():
        assert model._decode_layers is None
        assert torch.equal(model.forward_decode(*args), reference.forward_decode(*args))
        assert model._decode_layers is not None and model._decode_layers is not old_tables
