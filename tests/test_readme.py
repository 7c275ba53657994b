"""The README's quick start is what CI runs: two commands, the second one being CI's test command."""

import re
from pathlib import Path

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


def test_ci_runs_the_readme_test_command():
    _, install_and_test = quick_start_commands()
    install, test_command = (part.strip() for part in install_and_test.split("&&"))
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines
    assert 'pip install --quiet -e ".[test]"' in ci_lines
    assert install == 'pip install -e ".[test]"'


def test_test_extra_has_what_the_tests_import():
    setup = (ROOT / "setup.py").read_text()
    extra = re.search(r'"test":\s*\[(.*?)\]', setup).group(1)
    for package in ("pytest", "transformers"):
        assert f'"{package}' in extra, f"setup.py's test extra lacks {package}"
