"""The README's quick start is what CI runs: two commands, the second one being CI's test command."""

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def quick_start_commands():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    assert len(blocks) >= 2, "the quick start needs its two commands in bash blocks"
    return [block.strip() for block in blocks[:2]]


def test_quick_start_is_two_single_line_commands():
    install_and_run, install_and_test = quick_start_commands()
    for command in (install_and_run, install_and_test):
        assert "\n" not in command, f"a quick start command must be one line: {command!r}"
    assert install_and_run.startswith("pip install -e . && python example_")
    assert install_and_test.startswith('pip install -e ".[test]" && ')


def test_no_text_file_holds_a_merge_conflict_marker():
    markers = re.compile(r"^(<<<<<<< |>>>>>>> |=======$)", flags=re.M)
    suffixes = {".md", ".py", ".cpp", ".h", ".toml", ".cfg", ".txt", ".json", ".sh"}
    skipped = {".git", "build", "__pycache__"}
    files = [
        path
        for path in ROOT.rglob("*")
        if path.suffix in suffixes
        and path.is_file()
        and not skipped & set(path.relative_to(ROOT).parts)
        and not any(part.endswith(".egg-info") for part in path.parts)
    ]
    assert any(path.name == "README.md" for path in files)
    conflicted = [
        str(path.relative_to(ROOT)) for path in files if markers.search(path.read_text(errors="replace"))
    ]
    assert not conflicted, f"unresolved merge conflicts in {conflicted}"


def test_ci_runs_the_readme_test_command():
    _, install_and_test = quick_start_commands()
    install, test_command = (part.strip() for part in install_and_test.split("&&"))
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines
    assert 'pip install --quiet -e ".[test]"' in ci_lines
    assert install == 'pip install -e ".[test]"'


def test_test_extra_has_what_the_tests_import():
    setup = (ROOT / "setup.py").read_text()
    extra = re.search(r'"test":\s*\[(.*?)\]', setup, flags=re.S).group(1)
    for package in ("pytest", "transformers"):
        assert f'"{package}' in extra, f"setup.py's test extra lacks {package}"


def python_api_blocks():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Python API", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread (and do not fight other processes for cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_python_api_examples_run(checkpoint_dir, tokenizer_path, capsys, one_thread):
    """The README's API snippets, run in order on a tiny checkpoint in place of CodeLlama-7b."""
    blocks = python_api_blocks()
    code = "\n".join(blocks)
    for method in ("Llama.build", "text_completion", "text_infilling", "<FILL_ME>", "chat_completion"):
        assert method in code, f"the README's Python API section shows no {method}"
    code = code.replace('"CodeLlama-7b/tokenizer.model"', repr(str(tokenizer_path)))
    code = code.replace('"CodeLlama-7b/"', repr(str(checkpoint_dir)))
    # Shorter generations keep the test fast; the calls are otherwise as written.
    code = re.sub(r"max_gen_len=\d+", "max_gen_len=8", code).replace("max_seq_len=512", "max_seq_len=160")
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    printed = capsys.readouterr().out
    assert "Loaded" in printed
    # The last printed value is the chat reply; the <FILL_ME> example printed its full text.
    assert 'def add(a, b):\n    """' in printed
    assert namespace["results"][0]["generation"]["role"] == "assistant"
