"""The demo model's data: CPython standard library source, its held-out modules and its functions.

The corpus is the pure-Python standard library of the running interpreter (PSF license), in a
fixed file order. The modules in `HELD_OUT_MODULES` are never trained on (nor used for the
tokenizer); the evaluation and the tests draw their prompts from them.
"""

import ast
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

# Evaluation modules (paths relative to the stdlib folder): never trained on.
HELD_OUT_MODULES = [
    "bisect.py",
    "colorsys.py",
    "fnmatch.py",
    "glob.py",
    "graphlib.py",
    "heapq.py",
    "netrc.py",
    "shlex.py",
    "statistics.py",
    "textwrap.py",
]

# Folders that are not the library proper: tests, generated tables, bundled third-party code.
_EXCLUDED_DIRS = {
    "site-packages",
    "dist-packages",
    "test",
    "tests",
    "idle_test",
    "encodings",
    "pydoc_data",
    "ensurepip",
    "__pycache__",
    "__phello__",
}
_MAX_FILE_BYTES = 400_000


def stdlib_dir() -> Path:
    """The folder of the running interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def _is_library_file(relative: Path) -> bool:
    if any(part in _EXCLUDED_DIRS or part.startswith("config-") for part in relative.parts[:-1]):
        return False
    return not relative.name.startswith("_sysconfigdata")


def corpus_files(root: Optional[Path] = None) -> List[Path]:
    """Every library `.py` file under `root` (default: the stdlib), sorted, relative to `root`.

    Raises:
        FileNotFoundError: if `root` has no Python files (no standard library source installed).
    """
    root = stdlib_dir() if root is None else root
    files = sorted(
        path.relative_to(root)
        for path in root.rglob("*.py")
        if _is_library_file(path.relative_to(root)) and path.stat().st_size <= _MAX_FILE_BYTES
    )
    if not files:
        raise FileNotFoundError(
            f"no Python source found under {root}: the demo corpus is the standard library source "
            "that ships with CPython (install the full interpreter, not a stripped one)"
        )
    return files


def read_source(root: Path, relative: Path) -> Optional[str]:
    """The text of a source file, or None if it is not UTF-8 or not valid Python."""
    try:
        text = (root / relative).read_text(encoding="utf-8")
        ast.parse(text)
    except (UnicodeDecodeError, SyntaxError, ValueError):
        return None
    return text


def split_corpus(root: Optional[Path] = None) -> "tuple[List[Path], List[Path]]":
    """(training files, held-out files), both in sorted order.

    Raises:
        FileNotFoundError: if a held-out module is missing from this interpreter's library.
    """
    root = stdlib_dir() if root is None else root
    files = corpus_files(root)
    held_out = [Path(name) for name in HELD_OUT_MODULES]
    missing = [str(path) for path in held_out if path not in set(files)]
    if missing:
        raise FileNotFoundError(f"held-out modules {missing} are not in the standard library at {root}")
    return [path for path in files if path not in set(held_out)], held_out


@dataclass
class Function:
    """A function found in a source file, with the line spans the objectives cut at.

    Line numbers are 0-based indexes into `text.splitlines(keepends=True)`; `body_start` is the
    first line after the signature and docstring, `end` is one past the function's last line.
    """

    name: str
    signature: str
    docstring: Optional[str]
    indent: str
    def_line: int
    body_start: int
    end: int

    def header(self, lines: List[str]) -> str:
        """The signature and docstring lines."""
        return "".join(lines[self.def_line : self.body_start])

    def body(self, lines: List[str]) -> str:
        """The lines after the docstring, ending with a newline."""
        body = "".join(lines[self.body_start : self.end])
        return body if body.endswith("\n") else body + "\n"

    def summary(self) -> str:
        """The first paragraph of the docstring on one line ("" without a docstring)."""
        if not self.docstring:
            return ""
        return " ".join(self.docstring.strip().split("\n\n")[0].split())


def find_functions(text: str) -> List[Function]:
    """Every function and method of `text` (in source order) whose body starts on its own line."""
    lines = text.splitlines(keepends=True)
    found = []
    for node in ast.walk(ast.parse(text)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.end_lineno is None:
            continue
        first = node.body[0]
        docstring = ast.get_docstring(node, clean=True)
        if docstring is not None:
            if len(node.body) < 2:
                continue  # docstring only: nothing to complete
            body_start = first.end_lineno  # the line after the docstring (0-based)
        else:
            body_start = first.lineno - 1
        if body_start <= node.lineno - 1:
            continue  # `def f(): return x` on one line
        def_text = lines[node.lineno - 1]
        found.append(
            Function(
                name=node.name,
                signature=f"{node.name}({ast.unparse(node.args)})",
                docstring=docstring,
                indent=def_text[: len(def_text) - len(def_text.lstrip())],
                def_line=node.lineno - 1,
                body_start=body_start,
                end=node.end_lineno,
            )
        )
    return sorted(found, key=lambda function: function.def_line)


def dedent_lines(text: str, indent: str) -> Optional[str]:
    """`text` with `indent` removed from every non-blank line; None if a line lacks it."""
    out = []
    for line in text.splitlines(keepends=True):
        if not line.strip():
            out.append(line.lstrip(" \t"))
        elif line.startswith(indent):
            out.append(line[len(indent) :])
        else:
            return None
    return "".join(out)


def instruction_request(function: Function) -> str:
    """The user message of an instruction pair: write this function, described by its docstring."""
    return f"Write a Python function `{function.signature}`: {function.summary()}"


def tail_lines(text: str, budget: int) -> str:
    """The last `budget` characters of `text`, starting at a line start."""
    if len(text) <= budget:
        return text
    cut = text.find("\n", len(text) - budget)
    return "" if cut < 0 else text[cut + 1 :]


def head_lines(text: str, budget: int) -> str:
    """The first `budget` characters of `text`, ending at a line end."""
    if len(text) <= budget:
        return text
    cut = text.rfind("\n", 0, budget)
    return "" if cut < 0 else text[: cut + 1]
