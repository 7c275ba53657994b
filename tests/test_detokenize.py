"""Incremental detokenizer against SentencePiece's own decoding; stop strings across deltas."""

import random

import pytest

from llama import Tokenizer
from llama.detokenize import IncrementalDetokenizer, StopMatcher


@pytest.fixture(scope="module")
def tok(tokenizer_path):
    return Tokenizer(str(tokenizer_path))


def byte_id(tok: Tokenizer, value: int) -> int:
    return tok.piece_id(f"<0x{value:02X}>")


def deltas(tok: Tokenizer, ids):
    """Every delta, one per token, then the flush."""
    detok = IncrementalDetokenizer(tok)
    return [detok.add(i) for i in ids] + [detok.flush()]


def random_ids(tok: Tokenizer, rng: random.Random, n: int):
    """Ids mixing whole pieces, control/unknown/special tokens, bytes of valid UTF-8
    characters (sometimes cut short), and bytes that are likely to be invalid."""
    ids = []
    while len(ids) < n:
        kind = rng.random()
        if kind < 0.3:
            ids.append(rng.randrange(tok.n_words))
        elif kind < 0.4:
            ids.append(rng.choice([0, tok.bos_id, tok.eos_id, tok.eot_id, tok.prefix_id]))
        elif kind < 0.8:
            char = chr(rng.choice([0xE9, 0x2192, 0x4E2D, 0x1F600, 0x10FFFF, rng.randrange(0x80, 0xD800)]))
            data = char.encode("utf-8")
            if rng.random() < 0.2:
                data = data[: rng.randrange(1, len(data) + 1)]
            ids += [byte_id(tok, b) for b in data]
        else:
            ids.append(byte_id(tok, rng.choice([0x80, 0xBF, 0xC0, 0xC1, 0xED, 0xF4, 0xF5, 0xFF, 0x41])))
    return ids


def test_random_sequences_equal_sentencepiece_decoding(tok):
    rng = random.Random(0)
    for _ in range(400):
        ids = random_ids(tok, rng, rng.randrange(0, 25))
        assert "".join(deltas(tok, ids)) == tok.decode_infilling(ids), ids


def test_multibyte_characters_split_over_byte_tokens_stream_whole(tok):
    text = "x = 'é' → 😀"
    ids = tok.encode_infilling(text)
    pieces = [tok.token_piece(i) for i in ids]
    assert pieces.count("<0xF0>") == 1 and "<0xE2>" in pieces  # the characters really are split
    out = deltas(tok, ids)
    assert "".join(out) == text == tok.decode_infilling(ids)
    assert all("\ufffd" not in d for d in out)
    # Nothing comes out while a character is incomplete; the last byte brings it whole.
    emoji_first = pieces.index("<0xF0>")
    assert out[emoji_first : emoji_first + 3] == ["", "", ""]
    assert out[emoji_first + 3] == "😀"
    arrow_first = pieces.index("<0xE2>")
    assert out[arrow_first : arrow_first + 3] == ["", "", "→"]


def test_leading_space_is_kept(tok):
    ids = tok.encode_infilling(" def f():")
    out = deltas(tok, ids)
    assert out[0] == " def"
    assert "".join(out) == " def f():"
    assert tok.decode(ids) == "def f():"  # the batch API's decode drops it


def test_special_tokens_and_invalid_bytes_decode_as_sentencepiece(tok):
    assert deltas(tok, [tok.bos_id, tok.eos_id]) == ["", "", ""]
    assert "".join(deltas(tok, [0])) == " ⁇ "
    assert "".join(deltas(tok, [tok.eot_id])) == " <EOT>"
    # A lone continuation byte, and each byte of a sequence cut short, become one U+FFFD each.
    assert (
        "".join(deltas(tok, [byte_id(tok, 0x80)])) == "\ufffd" == tok.decode_infilling([byte_id(tok, 0x80)])
    )
    cut = [byte_id(tok, 0xE2), byte_id(tok, 0x86), tok.piece_id("a")]
    assert deltas(tok, cut) == ["", "", "\ufffd\ufffda", ""]
    # A control token ends a run of bytes even though it prints nothing.
    split = [byte_id(tok, 0xE2), byte_id(tok, 0x86), tok.bos_id, byte_id(tok, 0x92)]
    assert "".join(deltas(tok, split)) == "\ufffd" * 3 == tok.decode_infilling(split)
    # An impossible second byte is known to be invalid at once: nothing is held back.
    assert deltas(tok, [byte_id(tok, 0xE0), byte_id(tok, 0x80)])[:2] == ["", "\ufffd\ufffd"]


def test_out_of_vocabulary_id_is_an_error(tok):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        IncrementalDetokenizer(tok).add(tok.n_words)


def stream(matcher: StopMatcher, chunks):
    """Emitted pieces per chunk, whether it stopped, and the flush."""
    emitted = []
    stopped = False
    for chunk in chunks:
        text, stopped = matcher.feed(chunk)
        emitted.append(text)
        if stopped:
            break
    return emitted, stopped, matcher.flush()


@pytest.mark.parametrize(
    "chunks, emitted",
    [
        (["abc\n", "\nrest"], ["abc", ""]),  # spans 2 deltas
        (["abc", "\n", "\nrest"], ["abc", "", ""]),  # spans 2 deltas, the first one all held
        (["ab<", "/s", ">tail"], ["ab", "", ""]),  # spans 3 deltas
        (["x</", "s", ">"], ["x", "", ""]),
    ],
)
def test_stop_string_split_across_deltas(chunks, emitted):
    out, stopped, rest = stream(StopMatcher(["\n\n", "</s>"]), chunks)
    assert (out, stopped, rest) == (emitted, True, "")


def test_false_partial_match_is_emitted_in_full_when_it_continues_differently():
    matcher = StopMatcher(["</s>"])
    assert matcher.feed("a </") == ("a ", False)  # "</" may start the stop string: held
    assert matcher.feed("d") == ("</d", False)  # it did not
    assert matcher.feed("<") == ("", False)
    assert matcher.feed("") == ("", False)
    assert matcher.flush() == "<"  # the stream ended: the held text was not a stop string


def test_the_stop_string_complete_first_wins():
    # One stop string a prefix of another: the shorter one is complete first.
    assert stream(StopMatcher(["\n\n", "\n"]), ["a\n", "\nb"]) == (["a"], True, "")
    assert stream(StopMatcher(["foobar", "foo"]), ["fo", "ob"]) == (["", ""], True, "")
    # A longer one held as a possible start, then a shorter one inside it completes.
    assert stream(StopMatcher(["abcd", "bc"]), ["xab", "c"]) == (["x", "a"], True, "")


def test_include_stop_keeps_the_stop_string():
    matcher = StopMatcher(["END"], include_stop=True)
    assert stream(matcher, ["done E", "N", "D and more"]) == (["done ", "", "END"], True, "")
    assert matcher.feed("after") == ("", True)


@pytest.mark.parametrize(
    "stops, match",
    [
        ("END", "list of strings"),
        (["a", ""], "non-empty"),
        (["a", "b", "c", "d", "e"], "at most 4"),
        ([3], "str"),
    ],
)
def test_bad_stop_strings(stops, match):
    with pytest.raises(ValueError, match=match):
        StopMatcher(stops)


def test_detokenizer_and_stop_matcher_together_over_random_splits(tok):
    text = "def f(x):\n    return 'é→'\n\n# end"
    ids = tok.encode_infilling(text)
    detok, matcher = IncrementalDetokenizer(tok), StopMatcher(["\n\n"])
    out, stopped = [], False
    for token_id in ids:
        piece, stopped = matcher.feed(detok.add(token_id))
        out.append(piece)
        if stopped:
            break
    assert stopped and "".join(out) == text.split("\n\n")[0]


def test_tokenizer_that_normalises_whitespace_streams_its_pieces(tmp_path):
    """Such a tokenizer cannot decode exactly without the leading space (no infilling): the deltas
    are its pieces' text, which is SentencePiece's decoding with the first space kept."""
    import sentencepiece as spm

    from tests.tiny import corpus_text

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(corpus_text(), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(tmp_path / "nfkc"),
        vocab_size=400,
        byte_fallback=True,
        minloglevel=2,
    )
    tok = Tokenizer(str(tmp_path / "nfkc.model"))
    with pytest.raises(ValueError):
        tok.decode_infilling([5])
    ids = tok.encode("def f(x): return x + 1", bos=False, eos=False)
    assert "".join(deltas(tok, ids)) == " " + tok.decode(ids)
