"""Building, caching and loading the C++ kernels: cache folder without a home directory, cache
key, rebuild of a broken library, build timeout and errors, one OpenMP runtime per process."""

import ctypes
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from llama import kernel_build, kernels

RUNNABLE_HERE = kernel_build.cpu_variants()
needs_a_variant = pytest.mark.skipif(not RUNNABLE_HERE, reason="no kernel variant runs on this CPU")


def no_home(monkeypatch, tmp_path: Path) -> None:
    """A process without HOME and without a passwd entry: Path.home() raises."""

    def home():
        raise RuntimeError("Could not determine home directory.")

    for name in ("HOME", "XDG_CACHE_HOME", "CODELLAMA_KERNEL_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(Path, "home", staticmethod(home))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


def test_given_cache_folder_never_asks_for_the_home_directory(monkeypatch, tmp_path):
    no_home(monkeypatch, tmp_path)
    monkeypatch.setenv("CODELLAMA_KERNEL_CACHE", str(tmp_path / "given"))
    assert kernel_build.cache_dir() == tmp_path / "given"


def test_without_a_home_directory_the_cache_is_a_private_temporary_folder(monkeypatch, tmp_path):
    no_home(monkeypatch, tmp_path)
    folder = kernel_build.cache_dir()
    assert folder == tmp_path / f"codellama-kernels-{os.getuid()}"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700


def test_a_shared_fallback_folder_disables_the_kernels_with_a_warning(monkeypatch, tmp_path):
    no_home(monkeypatch, tmp_path)
    shared = tmp_path / f"codellama-kernels-{os.getuid()}"
    shared.mkdir()
    shared.chmod(0o777)  # anyone could plant a library here
    with pytest.warns(RuntimeWarning, match="not a folder of this user alone"):
        assert kernel_build.cache_dir() is None
    monkeypatch.delenv("CI", raising=False)
    with pytest.warns(RuntimeWarning) as caught:
        assert kernels._load("avx2") is None
    assert any("could not be built" in str(w.message) for w in caught)


@needs_a_variant
def test_builds_without_a_home_directory_and_rebuilds_a_broken_library(monkeypatch, tmp_path):
    no_home(monkeypatch, tmp_path)
    variant = RUNNABLE_HERE[-1]
    cached = kernel_build.cache_dir() / f"codellama_{variant}_{kernel_build._cache_key(variant)}.so"
    cached.write_bytes(b"not a shared library")  # e.g. cut short by a full disk
    library = kernel_build.load(variant)
    assert hasattr(library, "codellama_gemv_bf16")
    assert cached.read_bytes()[:4] == b"\x7fELF"


def test_cache_key_covers_compiler_version_and_flags(monkeypatch):
    key = kernel_build._cache_key("avx2")
    assert kernel_build._cache_key("avx512bf16") != key
    path, version = kernel_build._compiler_identity(os.environ.get("CXX", "g++"))
    monkeypatch.setattr(kernel_build, "_compiler_identity", lambda compiler: (path, version + " patched"))
    assert kernel_build._cache_key("avx2") != key
    monkeypatch.setattr(kernel_build, "_compiler_identity", lambda compiler: (path + "-other", version))
    assert kernel_build._cache_key("avx2") != key
    monkeypatch.undo()
    monkeypatch.setattr(kernel_build, "_COMMON_FLAGS", kernel_build._COMMON_FLAGS + ["-DEXTRA"])
    assert kernel_build._cache_key("avx2") != key


def test_build_timeout_is_an_error_naming_the_setting(monkeypatch, tmp_path):
    monkeypatch.setenv("CODELLAMA_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CODELLAMA_KERNEL_BUILD_TIMEOUT", "0.001")
    with pytest.raises(kernel_build.KernelBuildError, match="CODELLAMA_KERNEL_BUILD_TIMEOUT"):
        kernel_build.load("avx2")
    assert not list(tmp_path.glob("*.so"))


def test_build_failure_warns_or_fails_in_ci(monkeypatch, tmp_path):
    monkeypatch.setenv("CODELLAMA_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    monkeypatch.delenv("CI", raising=False)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
        assert kernels._load("avx2") is None
    monkeypatch.setenv("CI", "true")
    with pytest.raises(RuntimeError, match="CI=true"):
        kernels._load("avx2")


@needs_a_variant
def test_kernels_use_the_openmp_runtime_torch_loaded(tmp_path):
    """Loading the kernels in a fresh process maps no OpenMP runtime that was not there before."""
    probe = (
        "import torch\n"
        "from llama import kernel_build, kernels\n"
        "def runtimes():\n"
        "    with open('/proc/self/maps') as maps:\n"
        "        paths = {line.split()[-1] for line in maps if '/' in line}\n"
        "    return {p for p in paths if kernel_build._OPENMP_LIBRARY.search(p.rsplit('/', 1)[-1])}\n"
        "before = runtimes()\n"
        "assert kernels.kernel_available()\n"
        "print(sorted(runtimes() - before), kernel_build.openmp_runtime())\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr
    new_runtimes, runtime = result.stdout.split("] ")
    assert new_runtimes == "[", f"the kernels loaded a second OpenMP runtime: {new_runtimes}]"
    torch_root = Path(torch.__file__).resolve().parent
    if runtime.strip() != "None":  # torch runs OpenMP: the kernels are linked to its own copy
        assert torch_root in Path(runtime.strip()).resolve().parents or "torch.libs" in runtime


def test_every_kernel_source_ships_with_the_package():
    """An installed package builds the kernels from its own copy of llama/csrc: setup.py's
    package data must cover every source file there."""
    import fnmatch
    import re

    setup_py = (Path(__file__).resolve().parents[1] / "setup.py").read_text()
    patterns = re.findall(r'"(csrc/[^"]+)"', setup_py)
    sources = [
        p.relative_to(kernel_build.SOURCE_DIR.parent).as_posix() for p in kernel_build.SOURCE_DIR.iterdir()
    ]
    assert sources and patterns
    missing = [s for s in sources if not any(fnmatch.fnmatch(s, p) for p in patterns)]
    assert not missing, f"not in setup.py package_data: {missing}"


@pytest.mark.parametrize("refused", [True, False])
def test_a_library_is_used_only_after_a_test_call_ran_right(tmp_path, refused):
    """A CPU flag is no proof: a library whose test call dies (SIGILL) or computes a wrong result
    is reported, and the caller survives; a real variant passes."""
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        pytest.skip("no C++ compiler")
    source = Path(__file__).resolve().parent / "fake_kernels.cpp"
    library = tmp_path / f"fake_{refused}.so"
    flags = ["-DREFUSED"] if refused else []
    subprocess.run([compiler, "-shared", "-fPIC", *flags, str(source), "-o", str(library)], check=True)
    reason = kernel_build.prove_library(ctypes.CDLL(str(library)))
    assert reason is not None
    assert ("killed by SIGILL" if refused else "wrong result") in reason
    if RUNNABLE_HERE:
        assert kernel_build.prove(RUNNABLE_HERE[0]) is None
    absent = [v for v in kernel_build.VARIANTS if v not in RUNNABLE_HERE]
    for variant in absent:
        assert "the CPU flags lack" in kernel_build.prove(variant)
