"""Tokenizer: special pieces by piece, BOS/EOS/pad, round trips, infilling encode/decode."""

import pytest
import sentencepiece
from sentencepiece import SentencePieceProcessor

from llama import Tokenizer
from llama.prompts import require_infilling
from tests.tiny import INFILL_PIECES, corpus_text, train_tokenizer

SPECIAL_ATTRS = {
    "prefix_id": "▁<PRE>",
    "suffix_id": "▁<SUF>",
    "middle_id": "▁<MID>",
    "eot_id": "▁<EOT>",
    "step_id": "<step>",
}

TEXTS = [
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    " leading space",
    "   three leading spaces",
    "\n\nnewlines first",
    "\ttab",
    "trailing spaces   ",
    "x=1;y=2",
    "unicode: é ü 中文 ☃ 😀",
    "[INST] tags are plain text [/INST] <<SYS>>",
    " ",
    "a",
    "12345 67890",
]


def pieces_surface(tok: Tokenizer, ids) -> str:
    """The text a list of pieces spells: "▁" is a space, <0xNN> pieces are raw bytes."""
    out = bytearray()
    for token_id in ids:
        piece = tok.token_piece(token_id)
        if piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
            out.append(int(piece[3:5], 16))
        else:
            out += piece.replace("▁", " ").encode("utf-8")
    return out.decode("utf-8")


@pytest.fixture(scope="module")
def reordered_tokenizer_path(tmp_path_factory):
    """Special pieces at other ids than usual, and no ▁<EOT>."""
    return train_tokenizer(
        tmp_path_factory.mktemp("tok_reordered"),
        special_pieces=["<step>", "▁<MID>", "▁<SUF>", "▁<PRE>"],
        name="reordered",
    )


@pytest.mark.parametrize(
    "fixture, present",
    [
        ("tokenizer_path", {"prefix_id", "suffix_id", "middle_id", "eot_id"}),
        ("step_tokenizer_path", set(SPECIAL_ATTRS)),
        ("plain_tokenizer_path", set()),
        ("reordered_tokenizer_path", {"prefix_id", "suffix_id", "middle_id", "step_id"}),
    ],
)
def test_special_ids_are_looked_up_by_piece(fixture, present, request):
    path = request.getfixturevalue(fixture)
    sp = SentencePieceProcessor(model_file=str(path))
    tok = Tokenizer(str(path))
    for attr, piece in SPECIAL_ATTRS.items():
        if attr in present:
            assert getattr(tok, attr) == sp.piece_to_id(piece), attr
            assert tok.token_piece(getattr(tok, attr)) == piece
        else:
            assert getattr(tok, attr) is None, attr
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, -1)
    assert tok.n_words == sp.vocab_size() == 600
    assert tok.piece_id("<unk>") == 0  # unk itself is present, not "missing"
    assert tok.piece_id("no such piece") is None


def test_reordered_vocabulary_ids(reordered_tokenizer_path):
    tok = Tokenizer(str(reordered_tokenizer_path))
    # Trained with the pieces in this order right after <unk>, <s>, </s>.
    assert (tok.step_id, tok.middle_id, tok.suffix_id, tok.prefix_id, tok.eot_id) == (3, 4, 5, 6, None)
    with pytest.raises(ValueError, match=r"cannot infill.*lacks the pieces ▁<EOT>\."):
        require_infilling(tok)


def test_encode_decode_round_trip(tokenizer_path):
    sp = SentencePieceProcessor(model_file=str(tokenizer_path))
    tok = Tokenizer(str(tokenizer_path))
    for text in TEXTS:
        ids = sp.encode(text)
        assert tok.encode(text, bos=False, eos=False) == ids
        assert tok.encode(text, bos=True, eos=False) == [1] + ids
        assert tok.encode(text, bos=False, eos=True) == ids + [2]
        assert tok.encode(text, bos=True, eos=True) == [1] + ids + [2]
        assert tok.decode(ids) == text
        assert tok.decode([1] + ids + [2]) == text  # control pieces decode to nothing
        # The dummy leading space: the first piece starts with "▁", and spells " " + text.
        assert tok.token_piece(ids[0]).startswith("▁")
        assert pieces_surface(tok, ids) == " " + text
        assert [tok.token_piece(i) for i in ids] == [sp.id_to_piece(i) for i in ids]
    with pytest.raises(TypeError, match="str"):
        tok.encode(b"bytes", bos=True, eos=False)


@pytest.mark.parametrize("fixture", ["tokenizer_path", "step_tokenizer_path", "plain_tokenizer_path"])
def test_infilling_encode_has_no_dummy_space(fixture, request):
    path = request.getfixturevalue(fixture)
    tok = Tokenizer(str(path))
    corpus_lines = [line for line in corpus_text().splitlines()[:400] if line.strip()][::7]
    for text in TEXTS + corpus_lines + [line + "\n" for line in corpus_lines[:20]]:
        ids = tok.encode_infilling(text)
        assert pieces_surface(tok, ids) == text, text  # no space added, leading spaces kept
        assert tok.token_piece(ids[0]).startswith("▁") == text.startswith(" "), text
        assert tok.decode_infilling(ids) == text, text
        # decode drops the leading space of a first "▁" piece; decode_infilling keeps it.
        with_dummy = tok.encode(text, bos=False, eos=False)
        assert tok.decode_infilling(with_dummy) == " " + text
        assert tok.decode(with_dummy) == text
    assert tok.encode_infilling("") == [] and tok.decode_infilling([]) == ""


def test_infilling_refused_when_the_normaliser_changes_whitespace(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(corpus_text(), encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(tmp_path / "squash"),
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        user_defined_symbols=INFILL_PIECES,
        remove_extra_whitespaces=True,  # strips leading spaces: no exact encoding without one
        minloglevel=2,
        num_threads=1,
    )
    tok = Tokenizer(str(tmp_path / "squash.model"))
    assert tok.decode(tok.encode("x = 1", bos=True, eos=False)) == "x = 1"  # completion still works
    with pytest.raises(ValueError, match="normalises whitespace"):
        tok.encode_infilling(" a + b")
    with pytest.raises(ValueError, match="normalises whitespace"):
        tok.decode_infilling([5, 6])


def test_missing_or_invalid_model_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        Tokenizer(str(tmp_path / "nowhere.model"))
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match="not a valid SentencePiece model"):
        Tokenizer(str(junk))
