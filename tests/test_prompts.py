"""Golden prompt token sequences, written by hand from the published Code Llama formats.

Every expected sequence is built from SentencePiece's own primitives (`encode` of the literal text
the format prescribes, `piece_to_id` of a special piece), never from the prompt code under test.
The prompts are captured where the public methods hand them to `Llama.generate`.
"""

from types import SimpleNamespace

import pytest
from sentencepiece import SentencePieceProcessor

from llama import Llama, Tokenizer
from tests.tiny import INFILL_PIECES, train_tokenizer

BOS, EOS = 1, 2  # <s> and </s> in every Llama vocabulary


def spm(path) -> SentencePieceProcessor:
    return SentencePieceProcessor(model_file=str(path))


def pid(sp: SentencePieceProcessor, piece: str) -> int:
    token_id = sp.piece_to_id(piece)
    assert sp.id_to_piece(token_id) == piece, f"{piece!r} missing from the test vocabulary"
    return token_id


def nolead_by_space(sp: SentencePieceProcessor, s: str):
    """enc_nolead(s) for an `s` that starts with a space: SentencePiece's dummy prefix *is* one
    leading space (added to non-empty text), so encoding the rest with it gives the same pieces."""
    assert s.startswith(" ") and len(s) > 1
    return sp.encode(s[1:])


def nolead_by_sentinel(sp: SentencePieceProcessor, s: str):
    """enc_nolead(s) the way the reference release computes it: encode a one-piece sentinel
    followed by `s` and drop the sentinel's two pieces ("▁" and "☺")."""
    assert sp.encode("☺") == [pid(sp, "▁"), pid(sp, "☺")]
    return sp.encode("☺" + s)[2:]


class Recorder:
    """Stands in for `Llama.generate` (the reference signature and the keyword-only `speculation`)
    and records what it was given."""

    def __init__(self):
        self.prompts = None
        self.stop_token = "not called"

    def __call__(
        self,
        prompt_tokens,
        max_gen_len,
        temperature=0.6,
        top_p=0.9,
        logprobs=False,
        echo=False,
        stop_token=None,
        *,
        speculation=None,
    ):
        self.prompts, self.stop_token = prompt_tokens, stop_token
        tokens = [[] for _ in prompt_tokens]
        return tokens, ([[] for _ in prompt_tokens] if logprobs else None)


def recording_llama(tokenizer_path):
    tokenizer = Tokenizer(str(tokenizer_path))
    params = SimpleNamespace(max_seq_len=2048, max_batch_size=4, vocab_size=tokenizer.n_words)
    llama = Llama(SimpleNamespace(params=params), tokenizer)
    llama.generate = Recorder()
    return llama


@pytest.fixture(scope="module")
def sentinel_tokenizer_path(tmp_path_factory):
    """Infilling pieces, <step> and the reference's "☺" sentinel as a one-piece symbol."""
    return train_tokenizer(
        tmp_path_factory.mktemp("tok_sentinel"),
        special_pieces=INFILL_PIECES + ["<step>", "☺"],
        name="sentinel",
    )


# ----------------------------------------------------------------------------- completion


def test_completion_prompt_is_bos_plus_encoding(tokenizer_path):
    sp = spm(tokenizer_path)
    llama = recording_llama(tokenizer_path)
    prompts = ["def fib(n):", "  import os\n", "x"]
    llama.text_completion(prompts, max_gen_len=4)
    assert llama.generate.prompts == [[BOS] + sp.encode(p) for p in prompts]
    assert llama.generate.stop_token in (None, EOS)


# ----------------------------------------------------------------------------- infilling


@pytest.mark.parametrize("fixture", ["tokenizer_path", "sentinel_tokenizer_path"])
def test_prefix_suffix_middle(fixture, request):
    path = request.getfixturevalue(fixture)
    sp = spm(path)
    pre, suf, mid, eot = (pid(sp, p) for p in ("▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>"))
    prefix = "def add(a, b):\n    return"
    suffixes = [" a + b\n", "  # two spaces\n"]
    expected = [[BOS, pre] + sp.encode(prefix) + [suf] + nolead_by_space(sp, s) + [mid] for s in suffixes]
    if fixture == "sentinel_tokenizer_path":
        # Suffixes that do not start with a space, encoded by the reference's own method.
        suffixes += ["\n\nprint(add(1, 2))\n", "result = add(3, 4)", ""]
        expected += [
            [BOS, pre] + sp.encode(prefix) + [suf] + nolead_by_sentinel(sp, s) + [mid] for s in suffixes[2:]
        ]
    llama = recording_llama(path)
    llama.text_infilling([prefix] * len(suffixes), suffixes, max_gen_len=4)
    assert llama.generate.prompts == expected
    assert llama.generate.stop_token == eot


@pytest.mark.parametrize("fixture", ["tokenizer_path", "sentinel_tokenizer_path"])
def test_suffix_prefix_middle(fixture, request):
    path = request.getfixturevalue(fixture)
    sp = spm(path)
    pre, suf, mid, eot = (pid(sp, p) for p in ("▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>"))
    prefixes = ["def add(a, b):\n    return", "  indented"]
    suffix = " a + b\n"
    expected = [[BOS, pre, suf] + nolead_by_space(sp, suffix) + [mid] + sp.encode(p) for p in prefixes]
    suffixes = [suffix, suffix]
    if fixture == "sentinel_tokenizer_path":
        suffixes.append("\n    return total\n")
        prefixes.append("def total(xs):\n")
        expected.append(
            [BOS, pre, suf] + nolead_by_sentinel(sp, suffixes[-1]) + [mid] + sp.encode(prefixes[-1])
        )
    llama = recording_llama(path)
    llama.text_infilling(prefixes, suffixes, max_gen_len=4, suffix_first=True)
    assert llama.generate.prompts == expected
    assert llama.generate.stop_token == eot


def test_fill_me_prompts_split_at_the_marker(sentinel_tokenizer_path):
    sp = spm(sentinel_tokenizer_path)
    pre, suf, mid = (pid(sp, p) for p in ("▁<PRE>", "▁<SUF>", "▁<MID>"))
    llama = recording_llama(sentinel_tokenizer_path)
    out = llama.text_infilling(prompts=['def f(x):\n    """<FILL_ME>\n    return x\n', "<FILL_ME> end"])
    assert llama.generate.prompts == [
        [BOS, pre]
        + sp.encode('def f(x):\n    """')
        + [suf]
        + nolead_by_sentinel(sp, "\n    return x\n")
        + [mid],
        [BOS, pre] + sp.encode("") + [suf] + nolead_by_space(sp, " end") + [mid],
    ]
    # The recorder generated nothing, so the full text is the prompt without its marker.
    assert [o["full_text"] for o in out] == ['def f(x):\n    """\n    return x\n', " end"]


# ----------------------------------------------------------------------------- Instruct chat


def test_instruct_single_user_message(tokenizer_path):
    sp = spm(tokenizer_path)
    llama = recording_llama(tokenizer_path)
    llama.chat_completion([[{"role": "user", "content": "  Write a hello world in C.  \n"}]], max_gen_len=4)
    assert llama.generate.prompts == [[BOS] + sp.encode("[INST] Write a hello world in C. [/INST]")]
    assert llama.generate.stop_token in (None, EOS)


def test_instruct_system_message_is_folded_into_the_first_user_message(tokenizer_path):
    sp = spm(tokenizer_path)
    llama = recording_llama(tokenizer_path)
    dialog = [
        {"role": "system", "content": "Answer in Python only."},
        {"role": "user", "content": "Sort a list. "},
    ]
    llama.chat_completion([dialog], max_gen_len=4)
    text = "[INST] <<SYS>>\nAnswer in Python only.\n<</SYS>>\n\nSort a list. [/INST]"
    assert llama.generate.prompts == [[BOS] + sp.encode(text)]


def test_instruct_earlier_turns(tokenizer_path):
    sp = spm(tokenizer_path)
    llama = recording_llama(tokenizer_path)
    turns = [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "  4 \n"},
        {"role": "user", "content": "\nAnd 3+3?"},
        {"role": "assistant", "content": "6"},
        {"role": "user", "content": "Thanks"},
    ]
    system = {"role": "system", "content": "Be terse."}
    llama.chat_completion([turns, [system] + turns], max_gen_len=4)
    without_system = (
        [BOS]
        + sp.encode("[INST] What is 2+2? [/INST] 4 ")
        + [EOS, BOS]
        + sp.encode("[INST] And 3+3? [/INST] 6 ")
        + [EOS, BOS]
        + sp.encode("[INST] Thanks [/INST]")
    )
    with_system = (
        [BOS]
        + sp.encode("[INST] <<SYS>>\nBe terse.\n<</SYS>>\n\nWhat is 2+2? [/INST] 4 ")
        + [EOS, BOS]
        + sp.encode("[INST] And 3+3? [/INST] 6 ")
        + [EOS, BOS]
        + sp.encode("[INST] Thanks [/INST]")
    )
    assert llama.generate.prompts == [without_system, with_system]


# ----------------------------------------------------------------------------- turn-based chat


def test_turn_format_without_destinations(step_tokenizer_path):
    sp = spm(step_tokenizer_path)
    step = pid(sp, "<step>")
    llama = recording_llama(step_tokenizer_path)
    out = llama.chat_completion([[{"role": "user", "content": " Hello! "}]], max_gen_len=4)
    # No system message: an empty one is inserted, and an empty content has no body.
    expected = (
        [BOS]
        + sp.encode(" Source: system")
        + [step]
        + sp.encode(" Source: user")
        + sp.encode("\n\n Hello!")
        + [step]
        + sp.encode(" Source: assistant\nDestination: user")
        + sp.encode("\n\n ")
    )
    assert llama.generate.prompts == [expected]
    assert llama.generate.stop_token == step
    assert out[0]["generation"] == {"role": "assistant", "content": "", "destination": "user"}


def test_turn_format_with_destinations_and_earlier_turns(step_tokenizer_path):
    sp = spm(step_tokenizer_path)
    step = pid(sp, "<step>")
    llama = recording_llama(step_tokenizer_path)
    dialog = [
        {"role": "system", "content": "You write code."},
        {"role": "user", "content": "List files.", "destination": " assistant "},
        {"role": "assistant", "content": "import os\nprint(os.listdir())\n", "destination": "ipython"},
        {"role": "user", "content": "", "destination": "assistant"},
    ]
    llama.chat_completion([dialog], max_gen_len=4)
    expected = (
        [BOS]
        + sp.encode(" Source: system")
        + sp.encode("\n\n You write code.")
        + [step]
        + sp.encode(" Source: user\nDestination: assistant")
        + sp.encode("\n\n List files.")
        + [step]
        + sp.encode(" Source: assistant\nDestination: ipython")
        + sp.encode("\n\n import os\nprint(os.listdir())")
        + [step]
        + sp.encode(" Source: user\nDestination: assistant")
        + [step]
        + sp.encode(" Source: assistant\nDestination: user")
        + sp.encode("\n\n ")
    )
    assert llama.generate.prompts == [expected]


# ------------------------------------------------------------ no sentinel, no infilling pieces

STRINGS = [
    "foo",
    " foo",
    "  two leading spaces",
    "\n    return x\n",
    "\tindented = True",
    "x = 1  # comment   ",
    "é, ü and 中文",
    "naïve ☃ snowman",
    "",
    " ",
    "    ",
    "a",
    "[/INST]",
    "<0x41> literal",
]


@pytest.fixture(scope="module")
def plain_with_sentinel_path(tmp_path_factory):
    """The plain vocabulary plus "☺" (one more piece, so every merge is the same)."""
    return train_tokenizer(
        tmp_path_factory.mktemp("tok_plain_sentinel"), vocab_size=601, special_pieces=["☺"], name="plain_s"
    )


def test_no_sentinel_infilling_encode_is_exact(plain_tokenizer_path, plain_with_sentinel_path):
    plain_sp, with_sentinel = spm(plain_tokenizer_path), spm(plain_with_sentinel_path)
    assert plain_sp.piece_to_id("☺") == plain_sp.unk_id()  # the naive method would fail here
    # Same pieces in the same order (ids shifted by one after the sentinel): same segmentation.
    plain_pieces = [plain_sp.id_to_piece(i) for i in range(plain_sp.vocab_size())]
    sentinel_pieces = [with_sentinel.id_to_piece(i) for i in range(with_sentinel.vocab_size())]
    assert sentinel_pieces == plain_pieces[:3] + ["☺"] + plain_pieces[3:]

    tok = Tokenizer(str(plain_tokenizer_path))
    for s in STRINGS:
        ids = tok.encode_infilling(s)
        reference_pieces = [with_sentinel.id_to_piece(i) for i in nolead_by_sentinel(with_sentinel, s)]
        assert [plain_sp.id_to_piece(i) for i in ids] == reference_pieces, s
    for s in STRINGS + ["☺ starts with the missing sentinel"]:
        # The dummy prefix is one leading space (for non-empty text): enc_nolead(" " + s) == enc(s).
        if s:
            assert tok.encode_infilling(" " + s) == plain_sp.encode(s), s
        assert tok.decode_infilling(tok.encode_infilling(s)) == s, s


def test_no_sentinel_infilling_decode_is_exact(plain_tokenizer_path, plain_with_sentinel_path):
    plain_sp, with_sentinel = spm(plain_tokenizer_path), spm(plain_with_sentinel_path)
    tok = Tokenizer(str(plain_tokenizer_path))
    sentinel = pid(with_sentinel, "☺")
    for s in STRINGS:
        ids = plain_sp.encode(s)  # starts with a "▁" piece that plain decoding would drop
        # The reference: decode after the sentinel, then drop the sentinel's character.
        in_sentinel_vocab = [with_sentinel.piece_to_id(plain_sp.id_to_piece(i)) for i in ids]
        expected = with_sentinel.decode([sentinel] + in_sentinel_vocab)[1:]
        assert tok.decode_infilling(ids) == expected, s
        assert tok.decode_infilling(ids) == (" " + s if ids else ""), s
        assert tok.decode_infilling(tok.encode_infilling(s)) == s, s


def test_no_infilling_pieces_is_a_clear_error(plain_tokenizer_path):
    llama = recording_llama(plain_tokenizer_path)
    for call in (
        lambda: llama.text_infilling(["def f():"], ["\n"], max_gen_len=4),
        lambda: llama.text_infilling(["def f():"], ["\n"], max_gen_len=4, suffix_first=True),
        lambda: llama.text_infilling(prompts=["def f(<FILL_ME>):"], max_gen_len=4),
    ):
        with pytest.raises(ValueError, match=r"cannot infill.*▁<PRE>, ▁<SUF>, ▁<MID>, ▁<EOT>"):
            call()
    assert llama.generate.prompts is None  # nothing reached the generator
