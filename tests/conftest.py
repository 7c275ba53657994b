import pytest
from sentencepiece import SentencePieceProcessor

from llama import Llama
from tests.tiny import INFILL_PIECES, make_checkpoint, train_tokenizer


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory):
    """Vocabulary with the infilling pieces (a 7B/13B/34B-style tokenizer)."""
    return train_tokenizer(tmp_path_factory.mktemp("tok"), special_pieces=INFILL_PIECES)


@pytest.fixture(scope="session")
def step_tokenizer_path(tmp_path_factory):
    """Vocabulary with the infilling pieces and <step> (a 70B-style tokenizer)."""
    return train_tokenizer(tmp_path_factory.mktemp("tok_step"), special_pieces=INFILL_PIECES + ["<step>"])


@pytest.fixture(scope="session")
def plain_tokenizer_path(tmp_path_factory):
    """Vocabulary with no special pieces at all (a plain Llama 2-style tokenizer)."""
    return train_tokenizer(tmp_path_factory.mktemp("tok_plain"), special_pieces=[])


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory, tokenizer_path):
    """A tiny random MP=1 fp32 checkpoint matching `tokenizer_path`."""
    import sentencepiece as spm

    vocab = spm.SentencePieceProcessor(model_file=str(tokenizer_path)).vocab_size()
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"), vocab_size=vocab)


@pytest.fixture(scope="module")
def sp(tokenizer_path):
    return SentencePieceProcessor(model_file=str(tokenizer_path))


@pytest.fixture(scope="module")
def llama(checkpoint_dir, tokenizer_path):
    """The tiny checkpoint in fp32 with 4 slots of 128 tokens (the engine tests' model)."""
    return Llama.build(
        str(checkpoint_dir), str(tokenizer_path), max_seq_len=128, max_batch_size=4, dtype="float32"
    )


@pytest.fixture
def engine(llama):
    """The engine of `llama`, with prefix reuse on and the default prefill chunk."""
    llama.engine.prefix_reuse = True
    llama.engine.prefill_chunk = 512
    return llama.engine
