"""The install requirements setup.py declares cover what the `llama` package imports, on every
Python version it supports, and admit no torch too old for the APIs the code calls."""

import ast
import functools
import sys
from importlib import metadata
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Set, Tuple

import pytest
import setuptools  # noqa: F401  (first, so distutils.core below is the one setup.py's setup() drives)
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "llama"
PYTHON_VERSIONS = ["3.8", "3.9", "3.10", "3.11", "3.12", "3.13", "3.14"]

# Import names whose distribution is named otherwise, for modules not installed here (installed
# ones are looked up in their own metadata).
DISTRIBUTION_OF = {"yaml": "PyYAML", "google": "protobuf", "PIL": "Pillow", "sklearn": "scikit-learn"}

# torch APIs the code may call, and the last torch release without them.
TORCH_APIS = {"torch.library.custom_op": "2.3.1", "torch.compiler.is_compiling": "2.2.2"}

pytestmark = pytest.mark.skipif(sys.version_info < (3, 10), reason="needs sys.stdlib_module_names")


@functools.lru_cache(maxsize=None)
def install_requires() -> Tuple[List[Requirement], SpecifierSet]:
    """setup.py's install_requires and python_requires, read by running it up to its arguments."""
    from distutils.core import run_setup

    dist = run_setup(str(ROOT / "setup.py"), stop_after="init")
    return [Requirement(line) for line in dist.install_requires], SpecifierSet(dist.python_requires)


# Optional parts of the package and the extra that installs what only they import.
OPTIONAL_PARTS = {"server": "server", "attention_mask.py": "mask"}
# Imported only as a fallback when the extra's own package is missing.
FALLBACKS = {"matplotlib"}


@functools.lru_cache(maxsize=None)
def extras() -> Dict[str, Set[str]]:
    from distutils.core import run_setup

    dist = run_setup(str(ROOT / "setup.py"), stop_after="init")
    return {
        name: {canonicalize_name(Requirement(r).name) for r in reqs}
        for name, reqs in dist.extras_require.items()
    }


def optional_extra(file: str) -> Optional[str]:
    """The extra a file of the package belongs to (None for the core)."""
    parts = Path(file).parts
    return OPTIONAL_PARTS.get(parts[0])


def version_condition(test: ast.expr) -> Optional[Tuple[str, Tuple[int, ...]]]:
    """("<" or ">=", version) for a test of the form `sys.version_info >= (3, 11)`, else None."""
    if (
        isinstance(test, ast.Compare)
        and len(test.ops) == 1
        and isinstance(test.ops[0], ast.GtE)
        and ast.unparse(test.left) == "sys.version_info"
        and isinstance(test.comparators[0], ast.Tuple)
    ):
        return ">=", tuple(ast.literal_eval(test.comparators[0]))
    return None


def imports(node: ast.AST, pythons: Set[str]) -> Iterator[Tuple[str, Set[str]]]:
    """(top-level module, Python versions on which the import runs) for each absolute import."""
    if isinstance(node, ast.If) and version_condition(node.test):
        _, bound = version_condition(node.test)
        newer = {v for v in pythons if tuple(int(p) for p in v.split(".")) >= bound}
        for child in node.body:
            yield from imports(child, newer)
        for child in node.orelse:
            yield from imports(child, pythons - newer)
        return
    if isinstance(node, ast.Import):
        for alias in node.names:
            yield alias.name.split(".")[0], pythons
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        yield node.module.split(".")[0], pythons
    for child in ast.iter_child_nodes(node):
        yield from imports(child, pythons)


def third_party_imports(pythons: Set[str]) -> Dict[str, Dict[str, Set[str]]]:
    """{module: {file: Python versions}} for every import of a module outside the standard library."""
    found: Dict[str, Dict[str, Set[str]]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for module, versions in imports(ast.parse(path.read_text(), str(path)), pythons):
            if module in sys.stdlib_module_names or module == "llama" or not versions:
                continue
            found.setdefault(module, {}).setdefault(str(path.relative_to(PACKAGE)), set()).update(versions)
    return found


@functools.lru_cache(maxsize=None)
def installed_distributions() -> Dict[str, List[str]]:
    return metadata.packages_distributions()


def distribution(module: str) -> str:
    installed = installed_distributions().get(module)
    return canonicalize_name(installed[0] if installed else DISTRIBUTION_OF.get(module, module))


def test_every_imported_module_is_a_declared_requirement():
    requirements, python_requires = install_requires()
    pythons = {v for v in PYTHON_VERSIONS if python_requires.contains(v + ".0")}
    declared = {canonicalize_name(r.name): r for r in requirements}
    found = third_party_imports(pythons)
    assert {"torch", "fairscale", "sentencepiece", "safetensors"} <= set(found)  # the parser sees imports
    problems = []
    for module, files in sorted(found.items()):
        name = distribution(module)
        wanted = {optional_extra(f) for f in files}
        if None not in wanted:  # imported by optional parts only: their extras must declare it
            missing = sorted(e for e in wanted if name not in extras().get(e, set()))
            if missing and module not in FALLBACKS:
                problems.append(
                    f"{module} (imported by {sorted(files)}) needs {name} in the extras {missing}"
                )
            continue
        if name not in declared:
            problems.append(f"{module} (imported by {sorted(files)}) needs {name} in requirements.txt")
            continue
        marker = declared[name].marker
        for file, versions in files.items():
            missing = sorted(v for v in versions if marker and not marker.evaluate({"python_version": v}))
            if missing:
                problems.append(f"{file} imports {module} on Python {missing}, where {name} is not required")
    assert not problems, problems


def test_a_version_conditional_import_needs_its_requirement_only_there():
    """typing_extensions is imported on Python < 3.11 only: required there, not on 3.11 and later."""
    requirements, _ = install_requires()
    found = third_party_imports(set(PYTHON_VERSIONS))
    assert found["typing_extensions"] == {"prompts.py": {"3.8", "3.9", "3.10"}}
    (typing_extensions,) = [r for r in requirements if canonicalize_name(r.name) == "typing-extensions"]
    applies = {v for v in PYTHON_VERSIONS if typing_extensions.marker.evaluate({"python_version": v})}
    assert applies == {"3.8", "3.9", "3.10"}


def attribute_chains() -> Set[str]:
    """Every dotted name (`torch.library.custom_op`, ...) the package's code mentions."""
    chains = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute):
                chains.add(ast.unparse(node))
    return chains


@pytest.mark.parametrize("api, last_release_without", sorted(TORCH_APIS.items()))
def test_the_torch_floor_has_the_apis_the_code_calls(api, last_release_without):
    if api not in attribute_chains():
        pytest.skip(f"{api} is not used")
    requirements, _ = install_requires()
    (torch,) = [r for r in requirements if r.name == "torch"]
    assert not torch.specifier.contains(last_release_without), f"{torch} admits torch {last_release_without}"
    assert torch.specifier.contains(metadata.version("torch").split("+")[0])  # the torch tested here
