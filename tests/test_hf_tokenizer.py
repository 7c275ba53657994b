"""A folder written by `python -m llama.convert to-hf` used the Hugging Face way: transformers'
AutoTokenizer, `<FILL_ME>` prompts, `apply_chat_template`, `generate` and `pipeline`, checked
against this engine's own prompt ids and greedy generations."""

import json
import re
import shutil
from pathlib import Path

import jinja2
import pytest
import torch

from llama import Llama
from llama.convert import from_hf, to_hf
from llama.hf_tokenizer import write_tokenizer_files
from llama.prompts import instruct_prompt_tokens, turn_prompt_tokens
from llama.tokenizer import Tokenizer
from tests.layouts import write_layouts
from tests.tiny import corpus_text

# transformers 4 puts a space after special tokens itself; the files are written for 5.
transformers = pytest.importorskip("transformers", minversion="5")

CODE_STRINGS = [
    "def f(x):\n    return x + 1\n",
    'import os\n\n\nclass A:\n    """Doc."""\n\n    def __init__(self, n: int = 10):\n        self.n = n\n',
    "x = [i ** 2 for i in range(10)]  # squares\n\tprint(x[-1])",
    "if a != b and c >= 0.5e-3:\n        pass\n",
    "é ü 日本 🙂 ",
]

ONE_TURN = [{"role": "user", "content": "  Write a function that adds two numbers.\n"}]
MULTI_TURN = [
    {"role": "system", "content": " Answer in Python only. "},
    {"role": "user", "content": "How do I sum a list?"},
    {"role": "assistant", "content": " def total(xs):\n    return sum(xs)\n"},
    {"role": "user", "content": "And the product?"},
    {"role": "assistant", "content": "import math\nmath.prod(xs)"},
    {"role": "user", "content": "Thanks. Now the mean, in one line.  "},
]


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tokenizer_path):
    """(Meta checkpoint folder, its Hugging Face conversion)."""
    root = tmp_path_factory.mktemp("hf_tokenizer")
    _, _, dirs = write_layouts(root, tokenizer_path, mps=(1,))
    return dirs[1], to_hf(str(dirs[1]), root / "hf", progress=False)


@pytest.fixture(scope="module")
def step_converted(tmp_path_factory, step_tokenizer_path):
    root = tmp_path_factory.mktemp("hf_tokenizer_step")
    _, _, dirs = write_layouts(root, step_tokenizer_path, mps=(1,))
    return to_hf(str(dirs[1]), root / "hf", progress=False)


def load_tokenizer(folder):
    # A fresh instance each time: transformers' Code Llama tokenizer changes its normaliser for
    # good after the first infilling call (see the README), which would leak between tests.
    return transformers.AutoTokenizer.from_pretrained(str(folder))


def chat_ids(hf_tokenizer, dialog):
    return list(hf_tokenizer.apply_chat_template(dialog, tokenize=True, return_dict=False))


def test_to_hf_writes_the_published_tokenizer_files(converted, tokenizer_path):
    _, folder = converted
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "special_tokens_map.json",
        "tokenizer.model",
        "tokenizer_config.json",
    ]
    ours = Tokenizer(str(tokenizer_path))
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    expected = {
        "tokenizer_class": "CodeLlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "prefix_token": "▁<PRE>",
        "middle_token": "▁<MID>",
        "suffix_token": "▁<SUF>",
        "eot_token": "▁<EOT>",
        "fill_token": "<FILL_ME>",
        "model_max_length": 16384,
    }
    assert {key: config[key] for key in expected} == expected
    assert config["added_tokens_decoder"][str(ours.prefix_id)]["content"] == "▁<PRE>"
    assert "[INST]" in config["chat_template"]
    special = json.loads((folder / "special_tokens_map.json").read_text(encoding="utf-8"))
    assert special["additional_special_tokens"] == ["▁<PRE>", "▁<MID>", "▁<SUF>", "▁<EOT>"]
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 1, "eos_token_id": 2}


def test_step_and_plain_tokenizers_get_their_own_files(step_converted, plain_tokenizer_path, tmp_path):
    config = json.loads((step_converted / "tokenizer_config.json").read_text(encoding="utf-8"))
    step_id = Tokenizer(str(step_converted / "tokenizer.model")).step_id
    assert config["additional_special_tokens"] == ["<step>"] and "Source: " in config["chat_template"]
    generation = json.loads((step_converted / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [2, step_id]

    shutil.copyfile(plain_tokenizer_path, tmp_path / "tokenizer.model")
    write_tokenizer_files(str(tmp_path / "tokenizer.model"), tmp_path, model_max_length=4096)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    infilling = [config[k] for k in ("prefix_token", "suffix_token", "middle_token", "eot_token")]
    assert (
        infilling == [None] * 4 and config["model_max_length"] == 4096 and "[INST]" in config["chat_template"]
    )
    plain = load_tokenizer(tmp_path)
    assert plain("def f(x):").input_ids == Tokenizer(str(plain_tokenizer_path)).encode(
        "def f(x):", True, False
    )
    with pytest.raises(ValueError, match="infilling"):
        plain("def f(x):<FILL_ME>\n")


def test_without_a_tokenizer_only_generation_config_is_added(checkpoint_dir, tmp_path):
    out = to_hf(str(checkpoint_dir), tmp_path / "hf", progress=False)
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]
    assert json.loads((out / "generation_config.json").read_text()) == {"bos_token_id": 1, "eos_token_id": 2}


def test_an_unreadable_tokenizer_is_named_and_nothing_is_written(converted, tmp_path):
    ckpt_dir, _ = converted
    broken = tmp_path / "ckpt"
    shutil.copytree(ckpt_dir, broken)
    (broken / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match=r"ckpt/tokenizer.model' is not a valid SentencePiece model"):
        to_hf(str(broken), tmp_path / "hf", progress=False)
    assert not (tmp_path / "hf").exists()


def test_auto_tokenizer_adds_bos_and_gives_our_ids(converted, tokenizer_path):
    _, folder = converted
    hf_tokenizer = load_tokenizer(folder)
    assert type(hf_tokenizer).__name__ == "CodeLlamaTokenizer"
    ours = Tokenizer(str(tokenizer_path))
    # Whole top-level blocks of real code (strings that start with whitespace differ: README).
    blocks = [block for block in corpus_text().split("\n\n") if block[:1].strip()][:150]
    for text in CODE_STRINGS + blocks:
        ids = hf_tokenizer(text).input_ids
        assert ids[0] == ours.bos_id
        assert ids == ours.encode(text, bos=True, eos=False), repr(text)
    assert hf_tokenizer.decode(
        ours.encode(CODE_STRINGS[1], bos=True, eos=False), skip_special_tokens=True
    ) == (CODE_STRINGS[1])


def test_fill_me_prompt_becomes_an_infilling_prompt(converted, tokenizer_path):
    _, folder = converted
    ours = Tokenizer(str(tokenizer_path))
    prefix, suffix = 'def add(a, b):\n    """', '"""\n    return a + b\n'
    ids = load_tokenizer(folder)(prefix + "<FILL_ME>" + suffix).input_ids
    # transformers encodes the suffix with a leading space, which the reference does not (README).
    expected = (
        [ours.bos_id, ours.prefix_id]
        + ours.encode(prefix, bos=False, eos=False)
        + [ours.suffix_id]
        + ours.encode(suffix, bos=False, eos=False)
        + [ours.middle_id]
    )
    assert ids == expected


def test_readme_differences_from_the_reference_are_still_true(converted, tokenizer_path):
    _, folder = converted
    ours = Tokenizer(str(tokenizer_path))
    space = ours.sp_model.piece_to_id("▁")
    hf_ids = load_tokenizer(folder)("  x = 1").input_ids
    assert hf_ids == [ours.bos_id] + ours.encode("  x = 1", bos=False, eos=False)[1:]  # one space fewer
    assert ours.encode("  x = 1", bos=False, eos=False)[0] == space
    leaky = load_tokenizer(folder)
    hf_ids = leaky("a = <FILL_ME>\nb = 2").input_ids
    suffix_start = hf_ids.index(ours.suffix_id) + 1
    assert hf_ids[suffix_start] == space and ours.encode_infilling("\nb = 2")[0] != space
    # Why the README wraps infilling calls: unwrapped, the object's later chat prompts gain a space.
    assert chat_ids(leaky, ONE_TURN) == [ours.bos_id, space] + instruct_prompt_tokens(ours, ONE_TURN)[1:]


def test_chat_template_gives_the_instruct_prompt_ids(converted, tokenizer_path):
    _, folder = converted
    ours = Tokenizer(str(tokenizer_path))
    hf_tokenizer = load_tokenizer(folder)
    for dialog in (ONE_TURN, MULTI_TURN, MULTI_TURN[1:4]):
        assert chat_ids(hf_tokenizer, dialog) == instruct_prompt_tokens(ours, dialog)
    assert chat_ids(hf_tokenizer, MULTI_TURN).count(ours.bos_id) == 3
    with pytest.raises(jinja2.TemplateError, match="alternate"):
        hf_tokenizer.apply_chat_template([{"role": "assistant", "content": "hi"}])


def test_chat_template_gives_the_turn_format_with_a_step_tokenizer(step_converted):
    ours = Tokenizer(str(step_converted / "tokenizer.model"))
    hf_tokenizer = load_tokenizer(step_converted)
    with_destinations = [
        {"role": "user", "content": "Plot y = x^2.", "destination": "ipython"},
        {"role": "assistant", "content": "", "destination": "user"},
        {"role": "user", "content": " Thanks "},
    ]
    for dialog in (ONE_TURN, MULTI_TURN, with_destinations):
        ids = chat_ids(hf_tokenizer, dialog)
        assert ids == turn_prompt_tokens(ours, dialog)
        assert ids.count(ours.step_id) == len(dialog) + (dialog[0]["role"] != "system")


def test_generate_and_pipeline_follow_this_engine(converted):
    ckpt_dir, folder = converted
    generator = Llama.build(str(ckpt_dir), str(ckpt_dir / "tokenizer.model"), 128, 1, dtype="float32")
    hf_tokenizer = load_tokenizer(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    assert model.generation_config.eos_token_id == 2 and model.generation_config.bos_token_id == 1

    prompt = instruct_prompt_tokens(generator.tokenizer, MULTI_TURN[:4])
    (ours,), _ = generator.generate([prompt], max_gen_len=8, temperature=0.0)
    with torch.no_grad():
        out = model.generate(
            torch.tensor([chat_ids(hf_tokenizer, MULTI_TURN[:4])]), max_new_tokens=8, do_sample=False
        )[0].tolist()
    assert out[: len(prompt)] == prompt
    assert out[len(prompt) :] == ours and len(ours) == 8  # no EOS among these fixed weights' picks

    code = "def fibonacci(n):\n"
    pipe = transformers.pipeline("text-generation", model=model, tokenizer=hf_tokenizer)
    result = pipe(code, max_new_tokens=6, do_sample=False, return_tensors=True)[0]["generated_token_ids"]
    prompt = generator.tokenizer.encode(code, bos=True, eos=False)
    (ours,), _ = generator.generate([prompt], max_gen_len=6, temperature=0.0)
    assert list(result) == prompt + ours and len(ours) == 6
    reply = pipe(ONE_TURN, max_new_tokens=4, do_sample=False)[0]["generated_text"]
    assert reply[-1]["role"] == "assistant" and isinstance(reply[-1]["content"], str)


def test_from_hf_round_trips_with_and_without_the_tokenizer_files(converted, tmp_path):
    ckpt_dir, folder = converted
    original = torch.load(ckpt_dir / "consolidated.00.pth", weights_only=True)
    original.pop("rope.freqs")
    hub_style = tmp_path / "hub"
    shutil.copytree(folder, hub_style)
    for name in ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        (hub_style / name).unlink()
    (hub_style / "README.md").write_text("# model card\n")
    (hub_style / "tokenizer.json").write_text("{}")
    for source in (folder, hub_style):
        back = from_hf(str(source), tmp_path / f"back_{source.name}", 1, progress=False)
        converted_back = torch.load(back / "consolidated.00.pth", weights_only=True)
        assert sorted(converted_back) == sorted(original)
        assert all(torch.equal(converted_back[key], tensor) for key, tensor in original.items())
        assert (back / "tokenizer.model").read_bytes() == (ckpt_dir / "tokenizer.model").read_bytes()


def readme_snippet(folder) -> str:
    """The README's Hugging Face code, reading `folder`."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Hugging Face format", 1)[1].split("\n### ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    return code.replace('"CodeLlama-7b-Instruct-hf"', repr(str(folder)))


def readme_encode_infilling(folder):
    """The README's `encode_infilling`, defined on its own (without running the rest of the snippet)."""
    (definition,) = re.findall(
        r"^def encode_infilling\(.*?(?=^\S)", readme_snippet(folder), flags=re.S | re.M
    )
    namespace: dict = {}
    exec(compile(definition, "README.md", "exec"), namespace)
    return namespace["encode_infilling"]


def test_the_readme_snippet_runs_on_a_converted_folder(converted, tokenizer_path):
    _, folder = converted
    code = readme_snippet(folder)
    assert "apply_chat_template" in code and "<FILL_ME>" in code and "pipeline(" in code
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    ours = Tokenizer(str(tokenizer_path))
    # Infilling first, then the other calls on the same object: they still give the reference's ids.
    assert (
        namespace["infill"][:2] == [ours.bos_id, ours.prefix_id] and namespace["infill"][-1] == ours.middle_id
    )
    assert namespace["plain"] == ours.encode("def f(x):", bos=True, eos=False)
    assert list(namespace["chat"]) == instruct_prompt_tokens(
        ours, [{"role": "user", "content": "Sort a list"}]
    )


INFILL_PROMPTS = [
    ('def add(a, b):\n    """', '"""\n    return a + b\n'),
    ("import os\n\n\ndef main():\n", "\n\nif __name__ == '__main__':\n    main()\n"),
]


def test_one_tokenizer_infills_then_chats_with_the_reference_ids(converted, tokenizer_path):
    _, folder = converted
    ours = Tokenizer(str(tokenizer_path))
    encode_infilling = readme_encode_infilling(folder)
    hf_tokenizer = load_tokenizer(folder)
    # Interleaved, all on one instance: each result must not depend on what the instance did before.
    for prefix, suffix in INFILL_PROMPTS:
        ids = encode_infilling(hf_tokenizer, prefix + "<FILL_ME>" + suffix)
        assert ids == (
            [ours.bos_id, ours.prefix_id]
            + ours.encode(prefix, bos=False, eos=False)
            + [ours.suffix_id]
            + ours.encode(suffix, bos=False, eos=False)
            + [ours.middle_id]
        )
        assert ids == load_tokenizer(folder)(prefix + "<FILL_ME>" + suffix).input_ids
        for dialog in (ONE_TURN, MULTI_TURN):
            ids = chat_ids(hf_tokenizer, dialog)
            assert ids == instruct_prompt_tokens(ours, dialog)
            assert ids == chat_ids(load_tokenizer(folder), dialog)
        for text in CODE_STRINGS:
            ids = hf_tokenizer(text).input_ids
            assert ids == ours.encode(text, bos=True, eos=False), repr(text)
            assert ids == load_tokenizer(folder)(text).input_ids
        # Where a fresh object differs from the reference (README), this one still acts like a fresh one.
        assert hf_tokenizer("    return x").input_ids == load_tokenizer(folder)("    return x").input_ids
