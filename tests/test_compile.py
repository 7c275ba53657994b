"""`Llama.build(compile=True)`: the compiled decode step gives the eager results."""

import pytest
import torch

from llama import Llama, kernels

PROMPTS = [[1, 5, 9, 12, 40, 7, 3], [1, 22, 8], [1, 30, 31, 32, 33]]


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    kernels.set_enabled(True)
    yield
    torch.set_num_threads(previous)
    torch._dynamo.reset()


def test_compiled_generation_equals_eager_fp32(checkpoint_dir, tokenizer_path):
    eager = Llama.build(str(checkpoint_dir), str(tokenizer_path), 32, 4, dtype="float32")
    compiled = Llama.build(str(checkpoint_dir), str(tokenizer_path), 32, 4, dtype="float32", compile=True)
    assert compiled._compiled_model is None  # set up by the first generation, not by loading
    # Uneven prompts: decode steps with per-row positions, more than one compiled shape.
    want_tokens, want_lp = eager.generate(PROMPTS, max_gen_len=6, temperature=0.0, logprobs=True)
    got_tokens, got_lp = compiled.generate(PROMPTS, max_gen_len=6, temperature=0.0, logprobs=True)
    assert compiled._compiled_model is not None  # the decode steps ran compiled
    assert got_tokens == want_tokens
    assert [len(t) for t in got_tokens] == [6, 6, 6]
    torch.testing.assert_close(torch.tensor(got_lp), torch.tensor(want_lp), rtol=0, atol=1e-4)
    # A batch of one with a single position per step compiles and agrees too.
    assert compiled.generate(PROMPTS[:1], 4, temperature=0.0)[0] == eager.generate(PROMPTS[:1], 4, 0.0)[0]


@torch.inference_mode()
def test_compiled_bf16_decode_step_matches_eager(checkpoint_dir, tokenizer_path):
    """bf16 (the benchmark's dtype, with the AVX512-BF16 kernel where the CPU has it); the decode
    pass compiles as one graph (fullgraph=True), so on CUDA it can run as a CUDA graph."""
    llama = Llama.build(str(checkpoint_dir), str(tokenizer_path), 32, 4, dtype="bfloat16", compile=True)
    model = llama.model
    model.forward_packed([torch.tensor(PROMPTS[0]), torch.tensor(PROMPTS[2])], row_offset=1)
    llama.set_up_compile()
    rows, tokens = torch.tensor([1, 2]), torch.tensor([11, 12])
    for step in range(3):
        positions = torch.tensor([7 + step, 5 + step])
        # Same tokens at the same positions: both write the same cache slots, then read them.
        eager = model.forward_decode(tokens, rows, positions)
        compiled = llama._compiled_model(tokens, rows, positions)
        assert (compiled - eager).abs().max() <= 0.02 * eager.abs().max()


def test_compiled_bf16_generation_with_the_attention_kernel(tmp_path, tokenizer_path):
    """64-wide heads in bf16: the compiled decode step runs both hand-written kernels (where the
    CPU has AVX512-BF16) and generates what the eager model generates, uneven prompts included."""
    import sentencepiece as spm

    from tests.tiny import make_checkpoint

    vocab = spm.SentencePieceProcessor(model_file=str(tokenizer_path)).vocab_size()
    ckpt = make_checkpoint(tmp_path, vocab_size=vocab, dim=128, n_heads=2, n_kv_heads=1, seed=4)
    eager = Llama.build(str(ckpt), str(tokenizer_path), 32, 3, dtype="bfloat16")
    compiled = Llama.build(str(ckpt), str(tokenizer_path), 32, 3, dtype="bfloat16", compile=True)
    assert eager.model.params.head_dim == 64
    want, _ = eager.generate(PROMPTS, max_gen_len=5, temperature=0.0)
    got, _ = compiled.generate(PROMPTS, max_gen_len=5, temperature=0.0)
    assert got == want
    assert [len(t) for t in got] == [5, 5, 5]


@torch.inference_mode()
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_compiled_decode_step_allocates_nothing_sized_by_max_seq_len(tmp_path, tokenizer_path, dtype):
    """The compiled decode step attends the cache rows in place: none of the buffers the generated
    code allocates has the cache's length as a dimension (a gathered copy of the running rows'
    keys and values would: [rows, kv_heads, max_seq_len, head_dim] per layer and step)."""
    import sentencepiece as spm
    from torch._inductor.utils import run_and_get_code

    from tests.tiny import make_checkpoint

    if kernels.variant() is None:
        pytest.skip("no kernel variant runs on this CPU: decode attention is torch's SDPA here")
    vocab = spm.SentencePieceProcessor(model_file=str(tokenizer_path)).vocab_size()
    ckpt = make_checkpoint(tmp_path, vocab_size=vocab, dim=128, n_heads=2, n_kv_heads=1, n_layers=1, seed=4)
    max_seq_len = 3001  # a length no other dimension of this model has
    llama = Llama.build(str(ckpt), str(tokenizer_path), max_seq_len, 3, dtype=dtype, compile=True)
    llama.model.forward_packed([torch.tensor([1, 5, 9]), torch.tensor([1, 7])], row_offset=1)
    llama.set_up_compile()
    rows, tokens, positions = torch.tensor([1, 2]), torch.tensor([11, 12]), torch.tensor([3, 2])
    logits, sources = run_and_get_code(llama._compiled_model, tokens, rows, positions)
    allocations = [
        line.strip() for source in sources for line in source.splitlines() if "empty_strided" in line
    ]
    assert allocations, "expected the generated code to allocate its outputs"
    assert [line for line in allocations if str(max_seq_len) in line] == []
    eager = llama.model.forward_decode(tokens, rows, positions)
    assert (logits - eager).abs().max() <= 0.02 * eager.abs().max()
