from llama import Llama


def test_build_and_complete(checkpoint_dir, tokenizer_path):
    generator = Llama.build(
        str(checkpoint_dir), str(tokenizer_path), max_seq_len=64, max_batch_size=2, dtype="float32"
    )
    out = generator.text_completion(["def f(x):"], temperature=0, max_gen_len=5)
    assert len(out) == 1 and isinstance(out[0]["generation"], str)
