"""The int8 KV cache (`kv_cache_dtype="int8"`): quantization against fp64, the int8 decode-attention
kernel against an fp64 recomputation from the dequantized cache, the model's logits and the demo
model's perplexity against the 16-bit cache, the engine's batch invariance and prefix reuse, and
the option through Llama.build, the plan, the commands and the server."""

import math
import os
import sysconfig
from pathlib import Path
from typing import List

import pytest
import torch
from sentencepiece import SentencePieceProcessor

from llama import Llama, distributed, kernels, kv_cache, memory_plan
from llama.commands.entry import main as codellama_main
from llama.model import ModelArgs, Transformer
from llama.server.__main__ import parse_args as server_args
from scripts.demo_data import HELD_OUT_MODULES
from tests.test_kernels import variant  # noqa: F401  (the fixture: each kernel variant this CPU runs)
from tests.tiny import make_checkpoint, random_state_dict, tiny_params

REPO = Path(__file__).resolve().parents[1]
DEMO_DIR = REPO / "models" / "demo"
CPU = torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# Quantization
# ---------------------------------------------------------------------------------------------


def test_int8_round_trip_is_within_half_a_scale_of_fp64():
    g = torch.Generator().manual_seed(0)
    # Vectors of very different magnitudes, an outlier, and an all-zero vector.
    values = torch.randn(5, 3, 7, 64, generator=g) * torch.logspace(-3, 3, 7)[None, None, :, None]
    values[0, 0, 0, 5] = 300.0
    values[1, 1, 1] = 0.0
    values = values.to(torch.bfloat16)
    codes, scales = kv_cache.quantize_int8(values)
    assert codes.dtype == torch.int8 and scales.dtype == torch.float32 and scales.shape == values.shape[:-1]
    exact = values.double()
    absmax = exact.abs().amax(-1)
    torch.testing.assert_close(scales.double(), absmax / 127, rtol=2**-23, atol=0)
    assert int(codes.abs().max()) == 127 and (scales[1, 1, 1] == 0).item() and (codes[1, 1, 1] == 0).all()
    restored = codes.double() * scales.double()[..., None]  # the fp64 oracle of the dequantized value
    # Half a quantization step, plus the fp32 rounding of value / scale (a relative 2^-23 of 127).
    bound = scales.double()[..., None] * (0.5 + 127 * 2**-22)
    assert ((restored - exact).abs() <= bound).all()
    # The torch dequantization is that value rounded once to the asked dtype.
    fp32 = kv_cache.dequantize_int8(codes, scales, torch.float32)
    torch.testing.assert_close(fp32.double(), restored, rtol=2**-24, atol=0)


def test_int8_cache_writes_land_where_a_dense_cache_puts_them():
    """Every write form (a chunk of one row, one token per row of a range at one or per-row
    positions, one token for any rows) stores what a dense fp32 cache stores, within half a step."""
    g = torch.Generator().manual_seed(1)
    shape = (4, 2, 16, 32)
    dense = kv_cache.allocate(None, shape, torch.float32, CPU)
    int8 = kv_cache.allocate("int8", shape, torch.float32, CPU)
    assert isinstance(int8, kv_cache.Int8KVCache) and int8.keys.dtype == torch.int8

    def both(method: str, *args) -> None:
        k, v = torch.randn(2, *args[-1], generator=g).unbind(0)
        getattr(dense, method)(*args[:-1], k, v)
        getattr(int8, method)(*args[:-1], k, v)

    both("write_tokens", 2, 3, (5, 2, 32))
    both("write_rows", slice(0, 3), 9, (3, 2, 32))
    both("write_rows", slice(1, 4), torch.tensor([10, 0, 15]), (3, 2, 32))
    both("write_rows", torch.tensor([3, 0]), torch.tensor([12, 1]), (2, 2, 32))
    for rows in (slice(0, 4), torch.tensor([3, 1, 1])):
        for got, want, scales in zip(
            int8.read(rows, 16), dense.read(rows, 16), (int8.key_scales[rows], int8.value_scales[rows])
        ):
            assert ((got - want).abs() <= scales[..., None] * 0.5001).all()
    # Row 2 holds positions 0 (per-row write), 3..7 (its chunk) and 9 (range write) only.
    written = (int8.key_scales[2] > 0).any(0).nonzero().flatten().tolist()
    assert written == [0, 3, 4, 5, 6, 7, 9]


def test_unknown_kv_cache_dtype_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="unknown kv_cache_dtype 'fp8'.*'int8'"):
        kv_cache.check_kv_cache_dtype("fp8")
    with pytest.raises(ValueError, match="unknown kv_cache_dtype"):
        kv_cache.allocate(torch.int8, (1, 1, 4, 32), torch.float32, CPU)


# ---------------------------------------------------------------------------------------------
# The int8 decode-attention kernel
# ---------------------------------------------------------------------------------------------


def random_int8_cache(
    rows: int, kv_heads: int, max_len: int, head_dim: int, seed: int
) -> kv_cache.Int8KVCache:
    g = torch.Generator().manual_seed(seed)
    cache = kv_cache.Int8KVCache(rows, kv_heads, max_len, head_dim, torch.bfloat16, CPU)
    keys = torch.randn(rows, max_len, kv_heads, head_dim, generator=g) * 3
    values = torch.randn(rows, max_len, kv_heads, head_dim, generator=g)
    for row in range(rows):
        cache.write_tokens(row, 0, keys[row].to(torch.bfloat16), values[row].to(torch.bfloat16))
    return cache


def fp64_int8_attention(q: torch.Tensor, cache: kv_cache.Int8KVCache, rows: List[int], lengths: List[int]):
    """softmax(q k^T / sqrt(d)) v in float64 over the dequantized keys and values of each batch
    row's cache row (codes times scales, in fp64), query head h reading kv head h // rep."""
    batch, heads, head_dim = q.shape
    rep = heads // cache.keys.shape[1]
    out = torch.empty(batch, heads, head_dim, dtype=torch.float64)
    for b, (row, length) in enumerate(zip(rows, lengths)):
        for h in range(heads):
            g = h // rep
            keys = cache.keys[row, g, :length].double() * cache.key_scales[row, g, :length, None].double()
            values = (
                cache.values[row, g, :length].double() * cache.value_scales[row, g, :length, None].double()
            )
            weights = torch.softmax(keys @ q[b, h].double() / head_dim**0.5, dim=0)
            out[b, h] = weights @ values
    return out


@pytest.mark.parametrize(
    "heads,kv_heads,head_dim,rows,lengths",
    [
        (6, 2, 32, [3, 0, 3, 1], [17, 1, 40, 33]),  # the demo model's heads; a row read twice
        (8, 2, 64, [2, 1], [5, 64]),  # rows out of order
        (4, 4, 128, [0, 0, 2], [33, 2, 40]),  # Code Llama's head size, no grouping
        (8, 1, 64, [1], [1]),
    ],
)
def test_int8_decode_attention_matches_fp64(heads, kv_heads, head_dim, rows, lengths, variant):  # noqa: F811
    cache = random_int8_cache(4, kv_heads, 40 if head_dim != 64 else 64, head_dim, seed=heads + head_dim)
    g = torch.Generator().manual_seed(len(rows))
    q = torch.randn(len(rows), heads, head_dim, generator=g).to(torch.bfloat16)
    assert cache.decode_kernel_applies(q)
    rows_t, lengths_t = torch.tensor(rows), torch.tensor(lengths)
    out = cache.decode_attention(q, lengths_t, rows_t)
    expected = fp64_int8_attention(q, cache, rows, lengths)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    # fp32 arithmetic, then one rounding to bf16 (2**-8 relative).
    assert ((out.double() - expected).abs() <= expected.abs() * 2**-8 + 1e-4).all()
    # Each batch row alone gives the same bits (no dependence on the batch).
    for b in range(len(rows)):
        alone = cache.decode_attention(q[b : b + 1], lengths_t[b : b + 1], rows_t[b : b + 1])
        assert torch.equal(alone, out[b : b + 1])
    # Positions past a row's own length are never read.
    shortest = {row: min(n for r, n in zip(rows, lengths) if r == row) for row in rows}
    for row, length in shortest.items():
        cache.keys[row, :, length:] = 127
        cache.key_scales[row, :, length:] = 1e4
        cache.value_scales[row, :, length:] = -1e4
    fresh = cache.decode_attention(q, lengths_t, rows_t)
    for b, (row, length) in enumerate(zip(rows, lengths)):
        if length == shortest[row]:
            assert torch.equal(fresh[b], out[b])


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(6, 2, 32), (8, 2, 64), (4, 4, 128)])
def test_int8_prefill_attention_matches_fp64_and_the_decode_kernel(
    heads, kv_heads, head_dim, variant  # noqa: F811
):
    """The int8 prefill kernel reads one cache row in place: each token against fp64 over the
    dequantized cache, the same bits in any chunking, and the same bits as decoding that token."""
    length = 150
    cache = random_int8_cache(2, kv_heads, length, head_dim, seed=heads * head_dim)
    g = torch.Generator().manual_seed(head_dim)
    q = torch.randn(length, heads, head_dim, generator=g).to(torch.bfloat16)
    assert cache.prefill_kernel_applies(q)
    out = cache.prefill_attention(q, 1, 0)
    expected = torch.cat([fp64_int8_attention(q[i : i + 1], cache, [1], [i + 1]) for i in range(length)])
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    assert ((out.double() - expected).abs() <= expected.abs() * 2**-8 + 1e-4).all()
    chunks = [cache.prefill_attention(q[a:b], 1, a) for a, b in ((0, 70), (70, 71), (71, length))]
    assert torch.equal(torch.cat(chunks), out)
    positions = [0, 64, 149]
    decoded = cache.decode_attention(q[positions], torch.tensor(positions) + 1, torch.tensor([1, 1, 1]))
    assert torch.equal(decoded, out[positions])


def test_int8_decode_attention_of_a_range_of_rows_reads_them_in_place(variant):  # noqa: F811
    cache = random_int8_cache(4, 2, 24, 64, seed=3)
    q = torch.randn(2, 4, 64, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    lengths = torch.tensor([24, 9])
    by_range = cache.decode_attention(q, lengths, slice(2, 4))
    by_index = cache.decode_attention(q, lengths, torch.tensor([2, 3]))
    assert torch.equal(by_range, by_index)


def test_int8_decode_attention_refuses_lengths_outside_the_cache(variant):  # noqa: F811
    cache = random_int8_cache(2, 1, 8, 32, seed=5)
    q = torch.zeros(1, 2, 32, dtype=torch.bfloat16)
    for lengths, rows in (([9], [0]), ([0], [0]), ([3], [2])):
        with pytest.raises(ValueError, match="do not fit"):
            cache.decode_attention(q, torch.tensor(lengths), torch.tensor(rows))


@pytest.mark.parametrize("case", ["float32", "head_dim_16", "disabled"])
def test_int8_decode_attention_not_used_outside_its_domain(case):
    head_dim = 16 if case == "head_dim_16" else 32
    q = torch.zeros(1, 2, head_dim, dtype=torch.float32 if case == "float32" else torch.bfloat16)
    cache = kv_cache.Int8KVCache(1, 1, 8, head_dim, q.dtype, CPU)
    previous = kernels.enabled()
    kernels.set_enabled(case != "disabled")
    try:
        assert not cache.decode_kernel_applies(q)
    finally:
        kernels.set_enabled(previous)


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


def bf16_model(head_dim: int) -> Transformer:
    distributed.init_model_parallel()
    params = tiny_params(vocab_size=300, dim=2 * head_dim, n_heads=2, n_kv_heads=1, n_layers=2)
    args = ModelArgs(max_seq_len=48, max_batch_size=4, **params)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = Transformer(args)
    model.load_state_dict(random_state_dict(args, 0))
    return model.to(torch.bfloat16).eval()


@torch.inference_mode()
def run_prefill_and_decode(model: Transformer, kv_cache_dtype) -> torch.Tensor:
    """Logits of a packed prefill of three prompts, then decode steps at per-row positions."""
    g = torch.Generator().manual_seed(7)
    model.allocate_cache(torch.bfloat16, "cpu", kv_cache_dtype)
    prompts = [torch.randint(3, 300, (n,), generator=g) for n in (20, 7, 13)]
    outs = [model.forward_packed(prompts, last_only=True)]
    positions = torch.tensor([20, 7, 13])
    rows = torch.tensor([0, 1, 2])
    for _ in range(6):
        tokens = torch.randint(3, 300, (3,), generator=g)
        outs.append(model.forward_decode(tokens, rows, positions))
        positions = positions + 1
    one_per_row = model(torch.randint(3, 300, (3, 1), generator=g), positions.tolist(), last_only=True)
    return torch.cat(outs + [one_per_row[:, 0]])


@pytest.mark.parametrize("head_dim", [32, 64])
def test_int8_cache_logits_are_close_to_the_bf16_cache_logits(head_dim):
    """head_dim 64: bf16 prefill kernel over the dequantized rows, int8 decode kernel; 32: torch's
    prefill attention, int8 decode kernel (the bf16 cache runs torch's attention throughout)."""
    model = bf16_model(head_dim)
    bf16, int8 = run_prefill_and_decode(model, None), run_prefill_and_decode(model, "int8")
    assert model.layers[0].attention.cache_k.dtype == torch.int8
    scale = bf16.abs().max()
    assert (int8 - bf16).abs().max() <= 0.05 * scale
    assert (int8.argmax(-1) == bf16.argmax(-1)).float().mean() >= 0.9


def test_int8_cache_torch_fallback_matches_the_kernel():
    model = bf16_model(64)
    with_kernel = run_prefill_and_decode(model, "int8")
    previous = kernels.enabled()
    kernels.set_enabled(False)
    try:
        torch_only = run_prefill_and_decode(model, "int8")
    finally:
        kernels.set_enabled(previous)
    assert (with_kernel - torch_only).abs().max() <= 0.05 * torch_only.abs().max()


# ---------------------------------------------------------------------------------------------
# The demo model: perplexity through the int8 cache
# ---------------------------------------------------------------------------------------------

HELD_OUT_TOKENS = 448  # well past the demo model's 320 training positions
HELD_OUT_FILES = HELD_OUT_MODULES[:4]


@pytest.fixture(scope="module")
def demo_builds():
    torch.set_num_threads(2)
    return {
        dtype: Llama.build(
            str(DEMO_DIR), str(DEMO_DIR / "tokenizer.model"), 512, len(HELD_OUT_FILES),
            dtype="bfloat16", kv_cache_dtype=dtype,
        )  # fmt: skip
        for dtype in (None, "int8")
    }


def held_out_tokens(tokenizer) -> torch.Tensor:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    rows = []
    for name in HELD_OUT_FILES:
        ids = [tokenizer.bos_id] + tokenizer.encode((stdlib / name).read_text(encoding="utf-8"), False, False)
        assert len(ids) >= HELD_OUT_TOKENS, name
        rows.append(ids[:HELD_OUT_TOKENS])
    return torch.tensor(rows)


@torch.inference_mode()
def teacher_forced_perplexity(llama: Llama, tokens: torch.Tensor) -> float:
    """exp(mean next-token negative log-likelihood), every token fed through `forward_decode`
    (one cache write and one attention read per token and row)."""
    model = llama.model
    model.allocate_cache(torch.bfloat16, "cpu", model.layers[0].attention.kv_cache.kv_cache_dtype)
    batch, length = tokens.shape
    rows = torch.arange(batch)
    nll = torch.zeros((), dtype=torch.float64)
    for position in range(length - 1):
        logits = model.forward_decode(tokens[:, position], rows, torch.full((batch,), position))
        logprobs = torch.log_softmax(logits.double(), dim=-1)
        nll -= logprobs[rows, tokens[:, position + 1]].sum()
    return math.exp(nll.item() / (batch * (length - 1)))


def test_demo_model_perplexity_with_the_int8_cache_is_within_half_a_percent(demo_builds):
    tokens = held_out_tokens(demo_builds[None].tokenizer)
    int8_cache = demo_builds["int8"].model.layers[0].attention.kv_cache
    assert isinstance(int8_cache, kv_cache.Int8KVCache)
    assert int8_cache.decode_kernel_applies(torch.zeros(1, 3, 32, dtype=torch.bfloat16)) == (
        kernels.variant() is not None
    )
    bf16 = teacher_forced_perplexity(demo_builds[None], tokens)
    int8 = teacher_forced_perplexity(demo_builds["int8"], tokens)
    assert 1 < bf16 < 100  # the model predicts held-out code (its vocabulary is 3000)
    assert abs(int8 / bf16 - 1) <= 0.005, (bf16, int8)


# ---------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------

PROMPTS = [
    "def fib(n):",
    "import os\nimport sys\n\n\nclass Config:\n    def __init__(self):",
    "# sort a list\ndef sort(items):",
    "class Node:\n    def __init__(self, value):",
]


def test_int8_cache_tokens_do_not_depend_on_the_batch(demo_builds):
    llama = demo_builds["int8"]
    prompts = [llama.tokenizer.encode(p, bos=True, eos=False) for p in PROMPTS]
    solo = [llama.generate([p], 24, temperature=0, stop_token=-1)[0][0] for p in prompts]
    batch, _ = llama.generate(prompts, 24, temperature=0, stop_token=-1)
    assert batch == solo


def test_int8_cache_batch_invariance_with_the_bf16_prefill_kernel(tmp_path, tokenizer_path):
    """64-wide heads: prompts prefill with the bf16 kernel over the dequantized rows."""
    import sentencepiece as spm

    vocab = spm.SentencePieceProcessor(model_file=str(tokenizer_path)).vocab_size()
    ckpt = make_checkpoint(tmp_path, vocab, dim=128, n_heads=2, n_kv_heads=1)
    llama = Llama.build(str(ckpt), str(tokenizer_path), 64, 4, dtype="bfloat16", kv_cache_dtype="int8")
    prompts = [llama.tokenizer.encode(p, bos=True, eos=False) for p in PROMPTS]
    solo = [llama.generate([p], 10, temperature=0, stop_token=-1)[0][0] for p in prompts]
    for size in (2, 4):
        for first in range(0, 4, size):
            batch, _ = llama.generate(prompts[first : first + size], 10, temperature=0, stop_token=-1)
            assert batch == solo[first : first + size], f"batch of {size}"


def test_int8_cache_prefix_reuse_gives_the_tokens_of_a_cold_run(demo_builds):
    llama = demo_builds["int8"]
    engine = llama.engine
    source = "import os\n\n\ndef read(path):\n    with open(path) as f:\n        return f.read()\n"
    edits = [source[:50], source[:52], source[:55]]
    prompts = [llama.tokenizer.encode(e, bos=True, eos=False) for e in edits]
    engine.prefix_reuse = False
    cold = []
    for p in prompts:
        cold.append(engine.submit(p, max_tokens=12, default_stop=None).result().token_ids)
        engine.forget_prefixes()
    engine.prefix_reuse = True
    try:
        warm = [engine.submit(p, max_tokens=12, default_stop=None).result() for p in prompts]
    finally:
        engine.forget_prefixes()
    assert all(done.usage.cached_tokens > 0 for done in warm[1:])
    assert [done.token_ids for done in warm] == cold


# ---------------------------------------------------------------------------------------------
# The option: Llama.build, the plan, the commands, the server
# ---------------------------------------------------------------------------------------------


def test_build_refuses_an_unknown_kv_cache_dtype(checkpoint_dir, tokenizer_path):
    with pytest.raises(ValueError, match="unknown kv_cache_dtype 'bfloat16'.*'int8'"):
        Llama.build(str(checkpoint_dir), str(tokenizer_path), 32, 1, kv_cache_dtype="bfloat16")


@pytest.mark.parametrize("size", ["7b", "13b", "34b", "70b"])
def test_plan_counts_int8_codes_and_fp32_scales(size):
    args = memory_plan.MODEL_SIZES[size]
    settings = memory_plan.Settings(args, max_seq_len=4096, max_batch_size=2)
    int8 = memory_plan.Settings(args, max_seq_len=4096, max_batch_size=2, kv_cache_dtype="int8")
    positions = 2 * 4096 * 2 * args.n_layers * args.kv_heads  # keys and values, every layer and head
    assert memory_plan.kv_cache_bytes(settings) == positions * args.head_dim * 2
    assert memory_plan.kv_cache_bytes(int8) == positions * (args.head_dim + 4)
    assert memory_plan.rank_bytes(int8).kv_cache < 0.52 * memory_plan.rank_bytes(settings).kv_cache


def test_int8_cache_takes_the_planned_bytes():
    model = bf16_model(32)
    model.allocate_cache(torch.bfloat16, "cpu", "int8")
    cache = model.layers[0].attention.kv_cache
    allocated = sum(
        t.numel() * t.element_size()
        for layer in model.layers
        for t in (layer.attention.kv_cache.keys, layer.attention.kv_cache.values)
        + (layer.attention.kv_cache.key_scales, layer.attention.kv_cache.value_scales)
    )
    settings = memory_plan.Settings(model.params, max_seq_len=48, max_batch_size=4, kv_cache_dtype="int8")
    assert allocated == memory_plan.kv_cache_bytes(settings)
    assert cache.keys.shape == (4, 1, 48, 32)


def test_plan_command_takes_the_flag_and_refuses_a_bad_value(capsys):
    assert (
        codellama_main(["plan", "--model", "7b", "--kv-cache-dtype", "int8", "--gpu_memory", "100GiB"]) == 0
    )
    out = capsys.readouterr().out
    assert "--kv_cache_dtype int8" in out and "KV cache per token: 264.0 KiB" in out
    assert codellama_main(["plan", "--model", "7b", "--gpu_memory", "100GiB"]) == 0
    assert "KV cache per token: 512.0 KiB per rank (bfloat16)" in capsys.readouterr().out
    status = codellama_main(["plan", "--model", "7b", "--kv_cache_dtype", "fp8"])
    assert status != 0
    assert "invalid choice: 'fp8'" in capsys.readouterr().err


def test_complete_command_loads_the_int8_cache(monkeypatch, capsys):
    built = {}

    def fake_build(*args, **kwargs):
        built.update(kwargs)
        raise SystemExit(0)

    monkeypatch.setattr(Llama, "build", fake_build)
    with pytest.raises(SystemExit):
        codellama_main(["complete", "def f():", "--kv-cache-dtype", "int8"])
    assert built["kv_cache_dtype"] == "int8"


def test_server_flag_is_accepted_and_a_bad_value_refused(capsys):
    assert server_args(["--kv-cache-dtype", "int8"]).kv_cache_dtype == "int8"
    assert server_args([]).kv_cache_dtype is None
    with pytest.raises(SystemExit):
        server_args(["--kv_cache_dtype", "fp16"])
    assert "invalid choice: 'fp16'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Memory on demand
# ---------------------------------------------------------------------------------------------


def resident_bytes() -> int:
    """This process's resident memory (Linux: /proc/self/statm)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


linux_only = pytest.mark.skipif(
    not Path("/proc/self/statm").exists(), reason="reads /proc/self/statm (Linux)"
)


@linux_only
@pytest.mark.parametrize("kv_cache_dtype", [None, "int8"])
def test_cache_memory_follows_the_positions_written(kv_cache_dtype):
    """8 rows of 100,000 positions take memory only for what is written; a new, shorter sequence
    in a row gives back what the row's previous one held, and what it does not overwrite reads 0."""
    shape = (8, 2, 100_000, 64)
    before = resident_bytes()
    cache = kv_cache.allocate(kv_cache_dtype, shape, torch.bfloat16, CPU)
    per_position = 2 * shape[1] * kv_cache.bytes_per_position(kv_cache_dtype, torch.bfloat16, shape[3])
    full = shape[0] * shape[2] * per_position
    assert resident_bytes() - before < full / 50  # 0.2 GB (bf16) allocated, almost none of it resident
    g = torch.Generator().manual_seed(0)
    long = torch.randn(40_000, shape[1], shape[3], generator=g).to(torch.bfloat16)
    cache.write_tokens(3, 0, long, long)
    written = resident_bytes()
    assert written - before > 0.9 * 40_000 * per_position
    keys_before, _ = cache.read(3, 100)
    short = long[:100]
    cache.write_tokens(3, 0, short, short)  # the row's next sequence
    assert written - resident_bytes() > 0.9 * 39_900 * per_position
    keys, values = cache.read(3, 40_000)
    assert torch.equal(keys[:, :100], keys_before) and not keys[:, :100].eq(0).all()
    assert keys[:, 200:].eq(0).all() and values[:, 200:].eq(0).all()


@linux_only
def test_build_with_a_100k_context_holds_about_the_weights(tmp_path, tokenizer_path):
    """Llama.build with room for 8 sequences of 100,000 tokens: right after loading, the process
    holds the weights, not the 0.8 GB cache; generating takes memory for the tokens used."""
    vocab = SentencePieceProcessor(model_file=str(tokenizer_path)).vocab_size()
    ckpt = make_checkpoint(tmp_path / "ckpt", vocab, dim=256, n_heads=4, n_kv_heads=2)  # head_dim 64
    before = resident_bytes()
    llama = Llama.build(
        str(ckpt), str(tokenizer_path), max_seq_len=100_000, max_batch_size=8, dtype="bfloat16"
    )
    cache_bytes = sum(
        layer.attention.kv_cache.keys.numel() * 2 * 2 for layer in llama.model.layers
    )  # keys and values, bf16
    assert cache_bytes > 0.8e9
    assert resident_bytes() - before < 0.05 * cache_bytes
    out = llama.text_completion(["def f(x):"], max_gen_len=8, temperature=0.0)
    assert out[0]["generation"]  # it runs, and still holds far less than the cache
    assert resident_bytes() - before < 0.05 * cache_bytes
