"""fp32 logits far into the context (around 16k and 32k, Code Llama's rope_theta of 1e6) against
transformers' LlamaForCausalLM on the same weights.

A full 32k-token forward costs minutes in both libraries on a CPU, so both run the same shorter
context instead: 64 real tokens at positions 0..63, an empty stretch of cache up to the chunk
(key and value zero in both libraries: this engine's freshly allocated cache, zeros appended to
transformers' cache), then a 64-token chunk and two decode steps at positions near 16k or 32k.
The chunk attends to the first tokens from ~16k/~32k positions away (long rotary distances), and
its angles (position x frequency, in fp32 as in the reference and transformers) magnify any
difference in how the frequencies are rounded: frequencies computed in fp64, or every position
shifted by one, move the chunk's logits by about 1e-3 while the first tokens' stay within 1e-4.
"""

import inspect

import pytest
import sentencepiece as spm
import torch

from llama import Llama
from llama.convert import to_hf
from llama.model import ModelArgs
from tests.tiny import random_state_dict, tiny_params, write_checkpoint

transformers = pytest.importorskip("transformers")

MAX_SEQ_LEN = 33_000
CHUNK = 64
STARTS = (16_384 - CHUNK // 2, 32_768 - CHUNK // 2)  # chunks that straddle 16384 and 32768
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer_path):
    """(this engine's Transformer, transformers' LlamaForCausalLM with sdpa attention), fp32."""
    root = tmp_path_factory.mktemp("long_positions")
    vocab_size = spm.SentencePieceProcessor(model_file=str(tokenizer_path)).vocab_size()
    params = tiny_params(vocab_size)  # dim 64, 2 layers, 4 heads, 2 kv heads, rope_theta 1e6
    weights = random_state_dict(ModelArgs(**params), seed=1)
    # Sharper attention than the default scale, so that the distant first tokens outweigh the
    # ~32k zero keys (each with score 0) and the far context visibly moves the logits.
    for name in weights:
        if name.endswith(("attention.wq.weight", "attention.wk.weight")):
            weights[name] = weights[name] * 2
    ckpt_dir = write_checkpoint(root / "ckpt", params, weights)
    hf_dir = to_hf(str(ckpt_dir), root / "hf", max_position_embeddings=MAX_SEQ_LEN, progress=False)
    ours = Llama.build(str(ckpt_dir), str(tokenizer_path), MAX_SEQ_LEN, 1, dtype="float32").model
    theirs = transformers.LlamaForCausalLM.from_pretrained(
        str(hf_dir), dtype=torch.float32, attn_implementation="sdpa"
    ).eval()
    assert theirs.config.rope_parameters["rope_theta"] == 1e6
    return ours, theirs


def hf_step(model, tokens: torch.Tensor, cache, first_position: int) -> torch.Tensor:
    """transformers' fp32 logits [L, vocab] for `tokens` [1, L] at `first_position`.. after `cache`."""
    assert cache.get_seq_length() == first_position
    # transformers 5 renamed `past_key_values` to `cache`.
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    positions = torch.arange(first_position, first_position + tokens.shape[1])[None]
    return model(tokens, position_ids=positions, use_cache=True, **{name: cache}).logits[0]


def empty_stretch(model, cache, length: int) -> None:
    """Append `length` positions whose keys and values are zero to every layer of `cache`."""
    config = model.config
    for layer in range(config.num_hidden_layers):
        zeros = torch.zeros(1, config.num_key_value_heads, length, config.head_dim)
        cache.update(zeros, zeros.clone(), layer)


@pytest.mark.parametrize("start", STARTS)
def test_logits_match_transformers_far_into_the_context(models, start):
    ours, theirs = models
    generator = torch.Generator().manual_seed(start)
    vocab_size = ours.params.vocab_size
    first = torch.randint(3, vocab_size, (1, CHUNK), generator=generator)
    chunk = torch.randint(3, vocab_size, (1, CHUNK), generator=generator)
    steps = torch.randint(3, vocab_size, (2,), generator=generator)
    decode_at = start + CHUNK

    ours.allocate_cache(torch.float32, "cpu")  # zeroed: the stretch between the first tokens and the chunk
    with torch.inference_mode():
        our_first = ours.forward(first, 0)[0]
        our_chunk = ours.forward(chunk, start)[0]
        our_step = ours.forward(steps[None, :1], decode_at)[0, 0]  # one token, the prefill entry point
        our_decode = ours.forward_decode(steps[1:], torch.tensor([0]), torch.tensor([decode_at + 1]))[0]

        cache = transformers.DynamicCache(config=theirs.config)
        their_first = hf_step(theirs, first, cache, 0)
        empty_stretch(theirs, cache, start - CHUNK)
        their_chunk = hf_step(theirs, chunk, cache, start)
        their_step = hf_step(theirs, steps[None, :1], cache, decode_at)[0]
        their_decode = hf_step(theirs, steps[None, 1:], cache, decode_at + 1)[0]

    for what, mine, reference in [
        ("positions 0..63", our_first, their_first),
        (f"chunk at {start}..{decode_at - 1}", our_chunk, their_chunk),
        (f"one token at {decode_at}", our_step, their_step),
        (f"forward_decode at {decode_at + 1}", our_decode, their_decode),
    ]:
        difference = (mine - reference).abs().max().item()
        assert difference <= TOLERANCE, f"{what}: max |logit difference| {difference:.2e}"

    # The far context matters: without the first tokens the chunk's logits are far from these.
    ours.allocate_cache(torch.float32, "cpu")
    with torch.inference_mode():
        alone = ours.forward(chunk, start)[0]
    assert (alone - their_chunk).abs().max().item() > 100 * TOLERANCE
