"""The example scripts, run end to end as a user runs them (plain python and torchrun with 2 ranks)
on a tiny checkpoint, checked against what the Python API returns for the same prompts."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import example_completion
import example_infilling
import example_instructions
from llama import Llama, cli
from tests.tiny import make_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SEPARATOR = "=" * 34  # the reference's separator line between results
GEN_LEN = 6


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer_path):
    """The same tiny random weights saved unsharded (MP=1) and in two shards (MP=2)."""
    import sentencepiece as spm

    vocab = spm.SentencePieceProcessor(model_file=str(tokenizer_path)).vocab_size()
    root = tmp_path_factory.mktemp("example_ckpts")
    return {mp: make_checkpoint(root / f"mp{mp}", vocab_size=vocab, mp=mp, seed=3) for mp in (1, 2)}


@pytest.fixture(scope="module")
def generator(checkpoints, tokenizer_path):
    """The oracle: the Python API on the MP=1 checkpoint, in fp32, on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Llama.build(str(checkpoints[1]), str(tokenizer_path), 512, 4, dtype="float32")
    torch.set_num_threads(threads)


def run_example(script, *args, nproc=None, cwd=ROOT):
    """Run an example script; return (exit status, stdout, stderr), output decoded byte-exact."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONIOENCODING="utf-8")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    if nproc is None:
        command = [sys.executable, str(script)]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
        command += ["--standalone", str(script)]
    done = subprocess.run(command + list(args), cwd=cwd, env=env, capture_output=True, timeout=180)
    return done.returncode, done.stdout.decode("utf-8"), done.stderr.decode("utf-8", "replace")


def model_flags(checkpoints, tokenizer_path, mp=1):
    return [
        "--ckpt_dir",
        str(checkpoints[mp]),
        "--tokenizer_path",
        str(tokenizer_path),
        "--temperature",
        "0",
        "--max_gen_len",
        str(GEN_LEN),
        "--dtype",
        "float32",
    ]


def completion_block(prompt, generation):
    return f"{prompt}\n> {generation}\n\n{SEPARATOR}\n\n"


def test_completion_prints_each_builtin_prompt_and_its_completion(checkpoints, tokenizer_path, generator):
    prompts = example_completion.PROMPTS
    assert any("def fizzbuzz(n: int):" in p for p in prompts)
    assert any("argparse" in p and 'if __name__ == "__main__":' in p for p in prompts)
    status, out, err = run_example(ROOT / "example_completion.py", *model_flags(checkpoints, tokenizer_path))
    assert status == 0, err
    expected = generator.text_completion(prompts, temperature=0, max_gen_len=GEN_LEN)
    assert all(r["generation"] for r in expected)
    assert "".join(completion_block(p, r["generation"]) for p, r in zip(prompts, expected)) in out
    assert out.count(SEPARATOR) == len(prompts)


def test_completion_of_own_prompt_under_torchrun_matches_one_process(checkpoints, tokenizer_path, generator):
    prompt = "def add(a, b):\n    return"
    flags = model_flags(checkpoints, tokenizer_path, mp=2) + ["--prompt", prompt]
    status, out, err = run_example(ROOT / "example_completion.py", *flags, nproc=2)
    assert status == 0, err
    [expected] = generator.text_completion([prompt], temperature=0, max_gen_len=GEN_LEN)
    assert "MP=2" in out
    # Printed once (rank 1 is silent), and MP=2 greedy tokens equal MP=1's.
    assert out.count(completion_block(prompt, expected["generation"])) == 1
    assert out.count(SEPARATOR) == 1
    assert "fizzbuzz" not in out


def test_infilling_prints_prompt_middle_and_filled_text(checkpoints, tokenizer_path, generator):
    prompts = example_infilling.PROMPTS
    assert len(prompts) == 4 and all(p.count("<FILL_ME>") == 1 for p in prompts)
    status, out, err = run_example(ROOT / "example_infilling.py", *model_flags(checkpoints, tokenizer_path))
    assert status == 0, err
    prefixes = [p.split("<FILL_ME>")[0] for p in prompts]
    suffixes = [p.split("<FILL_ME>")[1] for p in prompts]
    expected = generator.text_infilling(prefixes, suffixes, temperature=0, max_gen_len=GEN_LEN)
    position = 0
    for prompt, prefix, suffix, result in zip(prompts, prefixes, suffixes, expected):
        middle = result["generation"]
        block = f"{prompt}\n> {middle}\n\n{'=' * 13} Filled in text {'=' * 13}\n\n{prefix}{middle}{suffix}\n"
        found = out.find(block, position)
        assert found >= 0, f"missing or out of order:\n{block}"
        position = found + len(block)
    assert out.count(" Prompt ") == len(prompts)


def test_infilling_of_own_prompt_file(checkpoints, tokenizer_path, generator, tmp_path):
    prompt = 'def total(items):\n    """<FILL_ME>"""\n    return sum(items)\n'
    prompt_file = tmp_path / "gap.py"
    prompt_file.write_text(prompt, encoding="utf-8")
    flags = model_flags(checkpoints, tokenizer_path) + ["--prompt_file", str(prompt_file)]
    status, out, err = run_example(ROOT / "example_infilling.py", *flags)
    assert status == 0, err
    [expected] = generator.text_infilling(
        ['def total(items):\n    """'], ['"""\n    return sum(items)\n'], temperature=0, max_gen_len=GEN_LEN
    )
    assert f"{prompt}\n> {expected['generation']}\n" in out
    assert expected["full_text"] in out
    assert "remove_non_ascii" not in out


def test_infilling_prompt_without_marker_is_a_one_line_error(
    checkpoints, tokenizer_path, monkeypatch, capsys
):
    flags = model_flags(checkpoints, tokenizer_path) + ["--prompt", "def f(x):\n    return x"]
    monkeypatch.setattr(sys, "argv", ["example_infilling.py"] + flags)
    with pytest.raises(SystemExit) as exited:
        cli.run(example_infilling.main)
    assert exited.value.code == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: prompt 0 has 0 <FILL_ME> markers; put exactly one where the code should be filled in"
    ]


def chat_block(dialog, reply):
    messages = "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in dialog)
    return f"{messages}> Assistant: {reply}\n\n{SEPARATOR}\n\n"


def test_instructions_print_each_dialog_and_the_answer(checkpoints, tokenizer_path, generator):
    dialogs = example_instructions.DIALOGS
    assert [d[0]["role"] for d in dialogs] == ["user", "user", "system"]
    assert "Bash" in dialogs[0][0]["content"] and "JavaScript" in dialogs[2][0]["content"]
    status, out, err = run_example(
        ROOT / "example_instructions.py", *model_flags(checkpoints, tokenizer_path)
    )
    assert status == 0, err
    expected = generator.chat_completion(dialogs, temperature=0, max_gen_len=GEN_LEN)
    blocks = [chat_block(d, r["generation"]["content"]) for d, r in zip(dialogs, expected)]
    assert "".join(blocks) in out
    assert "System: Provide answers in JavaScript\n\nUser: Write a function" in out


def test_instructions_own_prompt_with_system_under_torchrun(checkpoints, tokenizer_path, generator):
    flags = model_flags(checkpoints, tokenizer_path, mp=2)
    flags += ["--prompt", "How do I reverse a list?", "--system", "Answer in Python"]
    status, out, err = run_example(ROOT / "example_instructions.py", *flags, nproc=2)
    assert status == 0, err
    dialog = [
        {"role": "system", "content": "Answer in Python"},
        {"role": "user", "content": "How do I reverse a list?"},
    ]
    [expected] = generator.chat_completion([dialog], temperature=0, max_gen_len=GEN_LEN)
    assert out.count(chat_block(dialog, expected["generation"]["content"])) == 1
    assert out.count(SEPARATOR) == 1


def test_missing_demo_model_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError) as missing:
        cli.model_paths(None, None, tmp_path)
    message = str(missing.value)
    assert message.startswith("the bundled demo model is missing")
    assert str(tmp_path / "models" / "demo") in message and "--ckpt_dir" in message


def test_default_paths_are_the_demo_model_beside_the_scripts(tmp_path):
    demo = tmp_path / "models" / "demo"
    demo.mkdir(parents=True)
    (demo / "params.json").write_text("{}")
    assert cli.model_paths(None, None, tmp_path) == (str(demo), str(demo / "tokenizer.model"))
    # A given checkpoint folder brings its own tokenizer; explicit paths are kept as they are.
    assert cli.model_paths("w/7b", None, tmp_path) == ("w/7b", str(Path("w/7b") / "tokenizer.model"))
    assert cli.model_paths("w/7b", "t.model", tmp_path) == ("w/7b", "t.model")


def test_user_prompt_sources(tmp_path, monkeypatch):
    assert cli.user_prompt(None, None) is None
    assert cli.user_prompt("def f():", None) == "def f():"
    prompt_file = tmp_path / "p.txt"
    prompt_file.write_text("x = 1\n\n", encoding="utf-8")
    assert cli.user_prompt(None, str(prompt_file)) == "x = 1\n\n"
    # fire parses text that looks like a Python literal; the prompt is what was typed.
    monkeypatch.setattr(sys, "argv", ["example_completion.py", "--prompt", "a, b"])
    assert cli.user_prompt(("a", "b"), None) == "a, b"
    monkeypatch.setattr(sys, "argv", ["example_completion.py", "--prompt=42"])
    assert cli.user_prompt(42, None) == "42"
    with pytest.raises(ValueError, match="either --prompt or --prompt_file"):
        cli.user_prompt("x", str(prompt_file))
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        cli.user_prompt(None, str(tmp_path / "nope.txt"))
    with pytest.raises(ValueError, match="empty"):
        cli.user_prompt("  \n", None)


@pytest.mark.parametrize(
    "module, marker, count",
    [
        (example_completion, "> ", len(example_completion.PROMPTS)),
        (example_infilling, " Filled in text ", len(example_infilling.PROMPTS)),
        (example_instructions, "> Assistant: ", len(example_instructions.DIALOGS)),
    ],
)
def test_runs_on_the_bundled_demo_model_by_default(module, marker, count):
    """The quick start: no --ckpt_dir or --tokenizer_path (only a short generation, to keep it fast)."""
    script = Path(module.__file__)
    status, out, err = run_example(script, "--max_gen_len", "12")
    assert status == 0, err
    assert f"from {ROOT / 'models' / 'demo'} (MP=1" in out
    assert out.count(marker) >= count
    first_prompt = (getattr(module, "PROMPTS", None) or [module.DIALOGS[0][0]["content"]])[0]
    assert first_prompt in out
