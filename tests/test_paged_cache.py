"""The paged KV cache (`kv_cache_tokens`): the attention kernels over blocks against the same
kernels over a dense cache holding the same positions (bit for bit), the block table's bookkeeping,
every cache read and write against a dense cache, the model's logits against a dense cache, and the
engine: requests wait for blocks instead of failing, give the tokens of a dense cache whatever the
batch, reuse prefixes kept in blocks, and a request that can never fit is refused."""

from typing import List, Optional, Tuple

import pytest
import torch
from sentencepiece import SentencePieceProcessor

from llama import Llama, distributed, kernels, kv_cache, memory_plan
from llama.commands.entry import main as codellama_main
from llama.model import ModelArgs, Transformer, pack_segments
from llama.server.__main__ import parse_args as server_args
from tests.test_kernels import variant  # noqa: F401  (the fixture: each kernel variant this CPU runs)
from tests.test_kv_cache import linux_only, resident_bytes
from tests.tiny import make_checkpoint, random_state_dict, tiny_params

CPU = torch.device("cpu")


def scatter_into_blocks(
    dense: torch.Tensor, lengths: List[int], block_len: int, gen: torch.Generator
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The positions 0 .. lengths[r] - 1 of each row of `dense` [R, kv_heads, S, ...] copied into a
    pool of blocks in shuffled order (with spare blocks of noise): (pool [blocks, kv_heads,
    block_len, ...], table [R, ceil(S / block_len)], -1 where a row holds no block)."""
    rows, per_row = dense.shape[0], -(-dense.shape[2] // block_len)
    needed = [-(-n // block_len) for n in lengths]
    blocks = sum(needed) + 3
    order = torch.randperm(blocks, generator=gen).tolist()
    pool = torch.randn(blocks, dense.shape[1], block_len, *dense.shape[3:], generator=gen).to(dense.dtype)
    if dense.dtype == torch.int8:
        pool = torch.randint(-127, 128, pool.shape, generator=gen, dtype=torch.int8)
    table = torch.full((rows, per_row), -1, dtype=torch.int64)
    for row in range(rows):
        for i in range(needed[row]):
            block = order.pop()
            table[row, i] = block
            span = dense[row, :, i * block_len : (i + 1) * block_len]
            pool[block, :, : span.shape[1]] = span
    return pool, table


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("block_len", [64, 128])
def test_paged_decode_attention_equals_the_dense_kernel(dtype, block_len, variant):  # noqa: F811
    g = torch.Generator().manual_seed(block_len)
    heads, kv_heads, head_dim, max_len = 8, 2, 64, 700
    lengths = [1, 300, 64, 700]  # a block's first key, a part block, exactly one block, the last block
    rows = torch.tensor([2, 0, 3, 1])  # batch row b reads cache row rows[b]
    dense_k = torch.randn(4, kv_heads, max_len, head_dim, generator=g).to(dtype)
    dense_v = torch.randn(4, kv_heads, max_len, head_dim, generator=g).to(dtype)
    by_row = [lengths[rows.tolist().index(r)] for r in range(4)]
    pool_k, table = scatter_into_blocks(dense_k, by_row, block_len, torch.Generator().manual_seed(1))
    pool_v, _ = scatter_into_blocks(dense_v, by_row, block_len, torch.Generator().manual_seed(1))
    q = torch.randn(4, heads, head_dim, generator=g).to(dtype)
    lengths_t = torch.tensor(lengths)
    want = kernels.decode_attention(q, dense_k, dense_v, lengths_t, rows)
    got = kernels.decode_attention(q, pool_k, pool_v, lengths_t, rows, block_table=table)
    assert torch.equal(got, want)


def test_paged_int8_decode_and_prefill_equal_the_dense_kernels(variant):  # noqa: F811
    g = torch.Generator().manual_seed(3)
    heads, kv_heads, head_dim, max_len, block_len = 8, 2, 64, 320, 64
    dense = kv_cache.allocate("int8", (2, kv_heads, max_len, head_dim), torch.bfloat16, CPU)
    for row, n in enumerate((320, 130)):
        keys, values = torch.randn(2, n, kv_heads, head_dim, generator=g).bfloat16().unbind(0)
        dense.write_tokens(row, 0, keys, values)
    lengths = [320, 130]
    parts = {}
    for name in ("keys", "values", "key_scales", "value_scales"):
        parts[name], table = scatter_into_blocks(
            getattr(dense, name), lengths, block_len, torch.Generator().manual_seed(5)
        )
    q = torch.randn(2, heads, head_dim, generator=g).bfloat16()
    dense_parts = (dense.keys, dense.values, dense.key_scales, dense.value_scales)
    paged_parts = tuple(parts[n] for n in ("keys", "values", "key_scales", "value_scales"))
    lengths_t = torch.tensor(lengths)
    want = kernels.decode_attention_int8(q, *dense_parts, lengths_t, torch.tensor([0, 1]))
    got = kernels.decode_attention_int8(q, *paged_parts, lengths_t, torch.tensor([0, 1]), block_table=table)
    assert torch.equal(got, want)
    chunk = torch.randn(50, heads, head_dim, generator=g).bfloat16()  # positions 80 .. 129 of row 1
    want = kernels.prefill_attention_int8(chunk, *(t[1] for t in dense_parts), 80)
    got = kernels.prefill_attention_int8(chunk, *paged_parts, 80, block_table=table[1, :3])
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_paged_prefill_attention_equals_the_dense_kernel(dtype, variant):  # noqa: F811
    g = torch.Generator().manual_seed(7)
    heads, kv_heads, head_dim, block_len = 6, 2, 32, 64
    start, length = 100, 157  # a chunk over parts of three blocks, after a reused prefix
    dense_k = torch.randn(1, kv_heads, 320, head_dim, generator=g).to(dtype)
    dense_v = torch.randn(1, kv_heads, 320, head_dim, generator=g).to(dtype)
    pool_k, table = scatter_into_blocks(
        dense_k, [start + length], block_len, torch.Generator().manual_seed(2)
    )
    pool_v, _ = scatter_into_blocks(dense_v, [start + length], block_len, torch.Generator().manual_seed(2))
    q = torch.randn(length, heads, head_dim, generator=g).to(dtype)
    want = kernels.prefill_attention(q, dense_k[0], dense_v[0], start)
    got = kernels.prefill_attention(q, pool_k, pool_v, start, block_table=table[0, :5])
    assert torch.equal(got, want)


def test_paged_kernels_refuse_table_entries_outside_the_blocks(variant):  # noqa: F811
    pool = torch.zeros(4, 1, 64, 64, dtype=torch.bfloat16)
    q = torch.zeros(1, 2, 64, dtype=torch.bfloat16)
    lengths = torch.tensor([100])
    for bad in (4, -1):  # past the pool, and an unassigned entry, for a position the call reads
        table = torch.tensor([[0, bad, 0]])
        with pytest.raises(ValueError, match="do not fit"):
            kernels.decode_attention(q, pool, pool, lengths, torch.tensor([0]), block_table=table)
        with pytest.raises(ValueError, match="do not fit"):
            kernels.prefill_attention(q, pool, pool, 99, block_table=table[0])
    # Entries of positions the call does not read are not looked at.
    table = torch.tensor([[1, 2, -1]])
    kernels.decode_attention(q, pool, pool, lengths, torch.tensor([0]), block_table=table)
    with pytest.raises(ValueError, match="multiple of 64"):
        kernels.decode_attention(q, pool[:, :, :48], pool[:, :, :48], lengths, block_table=table)
    with pytest.raises(ValueError, match="do not fit"):  # the table's -1: position 191 is in no block
        kernels.prefill_attention(q, pool, pool, 191, block_table=table[0])
    with pytest.raises(ValueError, match="do not fit a cache row of 192"):
        kernels.prefill_attention(q, pool, pool, 192, block_table=table[0])


# ---------------------------------------------------------------------------------------------
# The block table and the cache storages
# ---------------------------------------------------------------------------------------------


def test_block_table_fits_rows_and_gives_blocks_back():
    table = kv_cache.BlockTable(rows=3, max_seq_len=1000, tokens=5 * 256, device=CPU)
    assert (table.blocks, table.blocks_per_row, table.free_blocks) == (5, 4, 5)
    table.fit(0, 300)  # two blocks
    table.fit(1, 1)  # one
    assert (table.held(0), table.held(1), table.free_blocks) == (2, 1, 2)
    assert table.table[0, :2].tolist() == [0, 1] and table.table[0, 2:].tolist() == [-1, -1]
    table.fit(0, 100, shrink=False)  # decode never gives blocks back
    assert table.held(0) == 2
    with pytest.raises(kv_cache.CacheFull, match="needs 3 more blocks.*2 of 5 are free"):
        table.fit(2, 700)
    assert table.held(2) == 0 and table.free_blocks == 2  # a refused fit changes nothing
    table.fit(0, 10)  # a new sequence in row 0: its second block comes back
    assert table.held(0) == 1 and table.free_blocks == 3
    table.fit(2, 700)
    assert set(table.table[2, :3].tolist()) | {0, 2} == {0, 1, 2, 3, 4}  # every block once
    table.release(2)
    assert table.free_blocks == 3 and table.table[2].tolist() == [-1] * 4
    with pytest.raises(ValueError, match="past the cache rows"):
        table.fit(1, 1025)
    with pytest.raises(ValueError, match="at least 1"):
        kv_cache.BlockTable(2, 100, 0, CPU)
    with pytest.raises(ValueError, match="multiple of 64"):
        kv_cache.BlockTable(2, 100, 100, CPU, block_len=100)


@pytest.mark.parametrize("kv_cache_dtype", [None, "int8"])
def test_paged_storage_reads_what_a_dense_cache_reads(kv_cache_dtype):
    """Every write form and read of a paged cache (blocks of 64) against a dense cache."""
    g = torch.Generator().manual_seed(11)
    shape = (3, 2, 256, 32)
    dense = kv_cache.allocate(kv_cache_dtype, shape, torch.float32, CPU)
    table = kv_cache.BlockTable(3, 256, 9 * 64, CPU, block_len=64)
    paged = kv_cache.allocate(kv_cache_dtype, shape, torch.float32, CPU, table)
    assert paged.keys.shape[:3] == (9, 2, 64)

    def both(method: str, fits: List[Tuple[int, int]], *args) -> None:
        for row, end in fits:
            table.fit(row, end, shrink=method == "write_tokens")
        k, v = torch.randn(2, *args[-1], generator=g).unbind(0)
        getattr(dense, method)(*args[:-1], k, v)
        getattr(paged, method)(*args[:-1], k, v)

    both("write_tokens", [(2, 130)], 2, 0, (130, 2, 32))  # three blocks
    both("write_tokens", [(0, 70)], 0, 5, (65, 2, 32))
    both("write_rows", [(0, 71), (1, 71), (2, 71)], slice(0, 3), 70, (3, 2, 32))
    both("write_rows", [(1, 101), (2, 131)], torch.tensor([1, 2]), torch.tensor([100, 130]), (2, 2, 32))
    for rows, length in ((2, 131), (slice(0, 3), 71), (torch.tensor([2, 0]), 71)):
        for got, want in zip(paged.read(rows, length), dense.read(rows, length)):
            assert torch.equal(got, want)
    for got, want in zip(paged.visible(2, 131), dense.visible(2, 131)):
        assert torch.equal(got, want[:, :131])


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


def tiny_model(kv_cache_tokens: Optional[int], kv_cache_dtype: Optional[str] = None) -> Transformer:
    """Two layers, head size 64 (the kernels' domain), 3 cache rows of 512 positions, bf16."""
    distributed.init_model_parallel()
    params = tiny_params(vocab_size=256, dim=128, n_heads=2, n_kv_heads=1, n_layers=2)
    args = ModelArgs(max_seq_len=512, max_batch_size=3, **params)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = Transformer(args)
    model.load_state_dict(random_state_dict(args, 4))
    model = model.to(torch.bfloat16).eval()
    model.allocate_cache(torch.bfloat16, CPU, kv_cache_dtype, kv_cache_tokens)
    return model


@pytest.mark.parametrize("kv_cache_dtype", [None, "int8"])
@pytest.mark.parametrize("use_kernels", [True, False])
def test_paged_model_logits_equal_the_dense_cache(kv_cache_dtype, use_kernels):
    """Prefill in chunks, decode several rows at uneven positions, then a new sequence reusing
    part of a row: a paged cache (4 blocks of 256 for 3 rows of 512) gives the dense cache's
    logits exactly, with the kernels and with torch's attention."""
    kernels.set_enabled(use_kernels)
    try:
        dense, paged = tiny_model(None, kv_cache_dtype), tiny_model(4 * 256, kv_cache_dtype)
        g = torch.Generator().manual_seed(0)
        prompt = torch.randint(1, 255, (300,), generator=g)
        outputs = []
        for model in (dense, paged):
            with torch.inference_mode():
                segments = [(0, 0, 200), (2, 0, 40)]
                first = model.forward_segments(
                    torch.cat([prompt[:200], prompt[:40]]), pack_segments(segments)
                )
                second = model.forward_segments(prompt[200:300], pack_segments([(0, 200, 100)]))
                steps = [
                    model.forward_decode(torch.tensor([5, 9]), torch.tensor([0, 2]), torch.tensor([300, 40])),
                    model.forward_decode(torch.tensor([7]), torch.tensor([2]), torch.tensor([41])),
                ]
                reused = model.forward_segments(
                    prompt[20:30], pack_segments([(0, 20, 10)])
                )  # row 0 restarts at 20
                step = model.forward_decode(torch.tensor([3]), torch.tensor([0]), torch.tensor([30]))
            outputs.append([first, second, *steps, reused, step])
        for got, want in zip(outputs[1], outputs[0]):
            assert torch.equal(got, want)
        assert paged.kv_blocks.held(0) == 1 and paged.kv_blocks.held(2) == 1  # row 0 gave one back
    finally:
        kernels.set_enabled(True)


# ---------------------------------------------------------------------------------------------
# The engine, the build and the options
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kernel_checkpoint(tmp_path_factory, tokenizer_path):
    """A tiny checkpoint with head size 32 (the kernels' domain)."""
    vocab = SentencePieceProcessor(model_file=str(tokenizer_path)).vocab_size()
    return make_checkpoint(tmp_path_factory.mktemp("paged") / "ckpt", vocab, dim=128, n_heads=4, n_kv_heads=2)


def build(ckpt, tokenizer_path, kv_cache_tokens: Optional[int], **kwargs) -> Llama:
    return Llama.build(
        str(ckpt), str(tokenizer_path), 512, 3, dtype="bfloat16", kv_cache_tokens=kv_cache_tokens, **kwargs
    )


def run_all(llama: Llama, prompts: List[List[int]], max_tokens: int) -> List[List[int]]:
    requests = [llama.engine.submit(p, max_tokens=max_tokens, default_stop=None) for p in prompts]
    return [r.result().token_ids for r in requests]


def held_as_scheduled(llama: Llama) -> None:
    """The model's block table holds what the scheduler counts for the free slots' prefixes."""
    scheduler, table = llama.engine.scheduler, llama.model.kv_blocks
    for slot in scheduler.slots:
        assert slot.sequence is None
        assert table.held(slot.index) == scheduler.budget.blocks_for(len(slot.tokens))
    assert table.free_blocks == scheduler.free_blocks()


def test_paged_engine_waits_for_blocks_and_gives_the_dense_tokens(kernel_checkpoint, tokenizer_path):
    """A pool of 2 blocks for 3 rows: 5 requests of up to 1 block each run 2 at a time (the third
    slot waits for blocks), and every request gets the tokens it gets from a dense cache."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 250, (n,), generator=g).tolist() for n in (20, 150, 90, 200, 7)]
    dense = run_all(build(kernel_checkpoint, tokenizer_path, None), prompts, 40)
    paged = build(kernel_checkpoint, tokenizer_path, 2 * kv_cache.KV_BLOCK_LEN)
    requests = [paged.engine.submit(p, max_tokens=40, default_stop=None) for p in prompts]
    paged.engine.step()
    stats = paged.engine.stats()
    assert (stats["running"], stats["waiting"], stats["free_slots"]) == (2, 3, 1)
    assert (stats["kv_cache_blocks"], stats["kv_cache_blocks_free"]) == (2, 0)
    assert [r.result().token_ids for r in requests] == dense
    held_as_scheduled(paged)


def test_paged_engine_reuses_prefixes_in_blocks_and_forgets_them_for_room(kernel_checkpoint, tokenizer_path):
    g = torch.Generator().manual_seed(1)
    long = torch.randint(3, 250, (300,), generator=g).tolist()  # 2 blocks with its tokens
    other = torch.randint(3, 250, (50,), generator=g).tolist()
    dense = build(kernel_checkpoint, tokenizer_path, None)
    paged = build(kernel_checkpoint, tokenizer_path, 3 * kv_cache.KV_BLOCK_LEN)
    for llama in (dense, paged):
        llama.engine.forget_prefixes()
    want = [run_all(dense, [p], 12)[0] for p in (long, long + [5, 6], other, long)]
    got = []
    first = paged.engine.submit(long, max_tokens=12, default_stop=None)
    got.append(first.result().token_ids)
    reuse = paged.engine.submit(long + [5, 6], max_tokens=12, default_stop=None)
    got.append(reuse.result().token_ids)
    assert reuse.usage().cached_tokens == 300  # the whole first prompt came from its blocks
    held_as_scheduled(paged)  # the row kept the blocks of its 300 + 2 + 12 ids
    # 2 of 3 blocks hold that prefix; a request reserving 2 more blocks makes room by forgetting it.
    got.append(paged.engine.submit(other, max_tokens=400, default_stop=None).result().token_ids[:12])
    held_as_scheduled(paged)
    cold = paged.engine.submit(long, max_tokens=12, default_stop=None)
    got.append(cold.result().token_ids)
    assert cold.usage().cached_tokens == 0  # forgotten to make room
    assert got == want
    held_as_scheduled(paged)


def test_a_request_the_pool_can_never_hold_is_refused_and_the_others_run(kernel_checkpoint, tokenizer_path):
    paged = build(kernel_checkpoint, tokenizer_path, kv_cache.KV_BLOCK_LEN)  # one block for 3 rows
    fine = paged.engine.submit([1, 5, 9], max_tokens=8, default_stop=None)
    with pytest.raises(ValueError, match=r"needs 300 cache positions.*holds \(256, kv_cache_tokens\)"):
        paged.engine.submit([1] * 100, max_tokens=200)
    assert len(fine.result().token_ids) == 8


def test_build_options_of_the_paged_cache(kernel_checkpoint, tokenizer_path):
    with pytest.raises(ValueError, match="positive integer"):
        build(kernel_checkpoint, tokenizer_path, 0)
    llama = build(kernel_checkpoint, tokenizer_path, 1000)  # rounded up to 4 blocks
    assert llama.model.kv_blocks.blocks == 4
    assert llama.model.layers[0].attention.cache_k.shape[:3] == (4, 2, kv_cache.KV_BLOCK_LEN)


def test_plan_counts_the_pool_and_the_flags_take_it(capsys):
    args = ModelArgs(**tiny_params(vocab_size=32016, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32))
    dense = memory_plan.Settings(args, max_seq_len=100_000, max_batch_size=8)
    paged = memory_plan.Settings(args, max_seq_len=100_000, max_batch_size=8, kv_cache_tokens=131_000)
    per_token = memory_plan.kv_cache_bytes_per_token(dense)
    assert per_token == 32 * 2 * 4096 * 2  # 7B: 512 KiB per token in bf16
    assert memory_plan.kv_cache_bytes(dense) == per_token * 800_000
    assert memory_plan.kv_cache_bytes(paged) == per_token * 131_072  # whole blocks
    assert "--kv_cache_tokens 131000" in paged.describe()
    assert codellama_main(["plan", "--model", "7b", "--max_seq_len", "100000", "--max_batch_size", "8",
                           "--kv_cache_tokens", "131072", "--gpu_memory", "80GiB"]) == 0  # fmt: skip
    assert "fits" in capsys.readouterr().out
    assert codellama_main(["plan", "--model", "7b", "--max_seq_len", "100000", "--max_batch_size", "8",
                           "--gpu_memory", "80GiB"]) == 1  # fmt: skip
    # What does fit, keeping the 8 rows of 100k: a pool of 533 blocks (weights 12.6 GiB + 66.6 GiB).
    assert (
        "largest paged KV cache: " in (out := capsys.readouterr().out) and "--kv_cache_tokens 136448" in out
    )
    capsys.readouterr()
    assert codellama_main(["plan", "--model", "7b", "--kv_cache_tokens", "0"]) == 2
    assert "--kv_cache_tokens must be a positive integer" in capsys.readouterr().err
    assert server_args(["--ckpt_dir", "x", "--kv_cache_tokens", "4096"]).kv_cache_tokens == 4096


@linux_only
def test_a_paged_100k_context_build_holds_about_the_weights(kernel_checkpoint, tokenizer_path):
    """8 rows of 100,000 positions over a pool of 131,072: right after loading the process holds
    the weights, not the pool; generating takes memory for the blocks used."""
    before = resident_bytes()
    llama = Llama.build(
        str(kernel_checkpoint), str(tokenizer_path), max_seq_len=100_000, max_batch_size=8,
        dtype="bfloat16", kv_cache_tokens=131_072,
    )  # fmt: skip
    pool_bytes = sum(layer.attention.kv_cache.keys.numel() * 2 * 2 for layer in llama.model.layers)
    assert pool_bytes == 131_072 * 2 * 2 * 32 * 2 * 2  # layers x (keys, values) x kv heads x head_dim x bf16
    assert resident_bytes() - before < 0.1 * pool_bytes
    out = llama.text_completion(["def f(x):"], max_gen_len=8, temperature=0.0)
    assert out[0]["generation"]
    assert resident_bytes() - before < 0.1 * pool_bytes


def test_generation_defaults_stay_within_a_pool_smaller_than_max_seq_len(kernel_checkpoint, tokenizer_path):
    """With a pool of 256 positions and max_seq_len 512, the reference API's default generation
    length (up to max_seq_len) is capped to the pool instead of being refused."""
    paged = build(kernel_checkpoint, tokenizer_path, kv_cache.KV_BLOCK_LEN)
    assert paged.engine.max_request_positions == kv_cache.KV_BLOCK_LEN
    tokens, _ = paged.generate([[1, 5, 9, 11]], max_gen_len=1000, temperature=0.0)
    assert len(tokens[0]) <= kv_cache.KV_BLOCK_LEN - 4


def test_compiled_decode_over_a_paged_cache_gives_the_eager_dense_tokens(kernel_checkpoint, tokenizer_path):
    """compile=True with a pool of 2 blocks for 3 rows: the engine takes each step's blocks before
    the compiled decode pass, which reads them in place; uneven prompts, some waiting for blocks."""
    prompts = [[1, 5, 9, 12, 40, 7, 3], [1, 22, 8], [1, 30, 31, 32, 33]]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as tests/test_compile.py: one thread's sums in both runs
    try:
        want, _ = build(kernel_checkpoint, tokenizer_path, None).generate(
            prompts, max_gen_len=6, temperature=0.0
        )
        compiled = build(kernel_checkpoint, tokenizer_path, 2 * kv_cache.KV_BLOCK_LEN, compile=True)
        got, _ = compiled.generate(prompts, max_gen_len=6, temperature=0.0)
        assert compiled._compiled_model is not None and got == want
        held_as_scheduled(compiled)
    finally:
        torch.set_num_threads(threads)
        torch._dynamo.reset()


def test_server_over_a_paged_cache(kernel_checkpoint, tokenizer_path):
    """The server: a request the pool can never hold gets a 400 context error naming the pool, one
    without a limit is capped to the pool, and /health and /metrics count the blocks."""
    from starlette.testclient import TestClient

    from llama.server.app import create_app
    from llama.server.state import ServerState
    from llama.tokenizer import Tokenizer
    from tests.servers import assert_error

    llama = build(kernel_checkpoint, tokenizer_path, kv_cache.KV_BLOCK_LEN)  # 256 positions, max_seq_len 512
    llama.engine.start()
    state = ServerState("tiny", max_queue=4)
    state.set_ready(llama.engine, Tokenizer(str(tokenizer_path)))
    try:
        with TestClient(create_app(state), raise_server_exceptions=False) as client:
            too_long = client.post(
                "/v1/completions", json={"model": "tiny", "prompt": "def f(x):", "max_tokens": 400}
            )
            error = assert_error(too_long, 400, param="max_tokens", code="context_length_exceeded")
            assert "kv_cache_tokens" in error["message"]
            until_full = client.post(
                "/completion", json={"prompt": "def f(x):", "n_predict": -1, "temperature": 0}
            )
            assert until_full.status_code == 200, until_full.text
            assert until_full.json()["tokens_predicted"] <= kv_cache.KV_BLOCK_LEN
            health = client.get("/health").json()
            assert health["kv_cache_blocks"] == 1 and health["kv_cache_blocks_free"] in (0, 1)
            assert "codellama_kv_cache_blocks_free" in client.get("/metrics").text
    finally:
        llama.engine.shutdown()


def test_random_requests_and_cancellations_on_a_small_pool(kernel_checkpoint, tokenizer_path):
    """12 requests of random lengths (some sharing a prefix, some cancelled after their first
    token) on a pool of 3 blocks for 3 rows: each finished one gets the tokens it gets alone on a
    dense cache, and afterwards the table holds exactly what the scheduler counts."""
    g = torch.Generator().manual_seed(5)
    shared = torch.randint(3, 250, (200,), generator=g).tolist()
    jobs = []
    for i in range(12):
        length = int(torch.randint(1, 300, (1,), generator=g))
        prompt = (
            (shared + [i + 3])[: max(length, 1)]
            if i % 3 == 0
            else torch.randint(3, 250, (length,), generator=g).tolist()
        )
        jobs.append((prompt, int(torch.randint(1, 40, (1,), generator=g)), i % 4 == 1))
    dense = build(kernel_checkpoint, tokenizer_path, None)
    want = [run_all(dense, [prompt], max_tokens)[0] for prompt, max_tokens, _ in jobs]
    paged = build(kernel_checkpoint, tokenizer_path, 3 * kv_cache.KV_BLOCK_LEN)
    requests = [paged.engine.submit(p, max_tokens=m, default_stop=None) for p, m, _ in jobs]
    for request, (_, _, cancel) in zip(requests, jobs):
        if cancel:
            next(iter(request))
            request.cancel()
    for request, expected, (_, _, cancel) in zip(requests, want, jobs):
        got = request.result().token_ids
        assert got == expected[: len(got)] if cancel else got == expected
    paged.engine.step()  # retire the last cancellations
    held_as_scheduled(paged)


def test_a_waiting_request_forgets_no_prefix_it_cannot_use():
    """The scheduler forgets free slots' prefixes for a request only when that makes room: while the
    running requests hold the pool, the prefixes stay for reuse."""
    from llama.engine.scheduler import BlockBudget, Scheduler, Sequence

    scheduler = Scheduler(3, 512, budget=BlockBudget(blocks=4, block_len=64))
    kept = Sequence(list(range(100)), max_tokens=10)  # 2 blocks
    scheduler.add(kept)
    scheduler.schedule()
    scheduler.prefilled(kept, kept.prompt_tokens)
    scheduler.release(kept)  # slot 0 keeps 100 ids: 2 blocks
    running = Sequence(list(range(200, 260)), max_tokens=60)  # 2 blocks, admitted beside the prefix
    scheduler.add(running)
    scheduler.schedule()
    assert running.slot is not None and scheduler.free_blocks() == 0
    big = Sequence(list(range(300, 400)), max_tokens=100)  # 4 blocks: only once `running` is done
    scheduler.add(big)
    step = scheduler.schedule()
    assert big.slot is None and len(scheduler.slots[0].tokens) == 100  # waiting, the prefix kept
    assert step.plan.trim == []  # nothing forgotten (the release trimmed slot 0 in the step before)
    scheduler.release(running)
    step = scheduler.schedule()
    assert big.slot is not None and (0, 0) in step.plan.trim  # now forgotten for room


@pytest.mark.parametrize("kv_cache_dtype", [None, "int8"])
@pytest.mark.parametrize("paged", [False, True])
def test_a_shared_prompt_is_copied_between_rows_of_either_cache(
    kernel_checkpoint, tokenizer_path, paged, kv_cache_dtype
):
    """Three requests with one 300-token prompt at once: one prefill, two copies of its rows
    (dense rows, or blocks of a paged cache; bf16 or int8 codes and scales), the solo tokens."""
    prompt = torch.randint(3, 250, (300,), generator=torch.Generator().manual_seed(8)).tolist()
    llama = Llama.build(
        str(kernel_checkpoint), str(tokenizer_path), 512, 3, dtype="bfloat16",
        kv_cache_dtype=kv_cache_dtype, kv_cache_tokens=6 * kv_cache.KV_BLOCK_LEN if paged else None,
    )  # fmt: skip
    llama.engine.prefix_reuse = False
    expected = run_all(llama, [prompt], 8)[0]
    llama.engine.prefix_reuse = True
    llama.engine.forget_prefixes()
    requests = [llama.engine.submit(prompt, max_tokens=8, default_stop=None) for _ in range(3)]
    assert [r.result().token_ids for r in requests] == [expected] * 3
    assert [r.usage().cached_tokens for r in requests] == [0, 299, 299]
    if paged:
        held_as_scheduled(llama)
