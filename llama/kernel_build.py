"""Building, proving and loading the C++ kernels in `llama/csrc/`: one shared library per
instruction set.

Each variant (`VARIANTS`, fastest first) is one source file compiled with the system C++ compiler
(`CXX`, default `g++`) on first use and cached under `cache_dir()`. The cache key covers the
sources, the compiler's path and version, and every flag, so a changed compiler or source gives a
new library; a cached library that fails to load is rebuilt. The parallel loops use the OpenMP
runtime torch itself loaded (linked by path), or none when torch runs without OpenMP, so a process
never holds two OpenMP runtimes with two thread pools.

A CPU flag in /proc/cpuinfo is not proof that an instruction runs: a hypervisor can list AVX-512 or
AMX and still refuse them. `prove` runs one small call of a built library in a child process (an
illegal instruction kills the child, not the caller) and checks its result; only a proven variant
is used.
"""

import ctypes
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Dict, FrozenSet, List, Optional, Tuple

import torch

SOURCE_DIR = Path(__file__).resolve().parent / "csrc"

# Instruction-set variants, the fastest first: the CPU flags (as Linux names them in
# /proc/cpuinfo) each needs, and the compiler flags that enable them.
VARIANTS: Tuple[str, ...] = ("avx512bf16", "avx2")
_CPU_FLAGS: Dict[str, FrozenSet[str]] = {
    "avx512bf16": frozenset({"avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni"}),
    "avx2": frozenset({"avx2", "fma"}),
}
_ISA_FLAGS: Dict[str, List[str]] = {
    "avx512bf16": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mavx512vnni"],
    "avx2": ["-mavx2", "-mfma"],
}
# -ffp-contract=off: the rotary kernels must not fuse a product into a sum (they match torch
# bit for bit); the fused multiply-adds elsewhere are written out explicitly.
_COMMON_FLAGS = ["-O3", "-ffp-contract=off", "-fPIC", "-Wno-unknown-pragmas"]
_OPENMP_LIBRARY = re.compile(r"lib(gomp|iomp5|omp)[-.\w]*\.so[.\d]*$")

_I64, _PTR, _INT, _FLOAT = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_float
# The C entry points every variant exports, with their argument types (all return an int status).
ENTRY_POINTS = {
    "codellama_gemv_bf16": [_PTR, _I64, _PTR, _I64, _PTR, _I64, _I64, _I64, _I64, _INT],
    "codellama_gemv_f32": [_PTR, _I64, _PTR, _I64, _PTR, _I64, _I64, _I64, _I64, _INT],
    # The attention kernels take an optional block table (a pointer, then int64 sizes): common.h.
    "codellama_decode_attention_bf16": [
        _PTR,
        _I64,
        _PTR,
        _PTR,
        _I64,
        _PTR,
        _I64,
        _PTR,
        _I64,
        _PTR,
        _I64,
        _PTR,
    ]
    + [_I64] * 10
    + [_FLOAT, _INT],
    "codellama_decode_attention_f32": [_PTR, _I64, _PTR, _PTR, _I64, _PTR, _I64, _PTR, _I64, _PTR, _I64, _PTR]
    + [_I64] * 10
    + [_FLOAT, _INT],
    "codellama_decode_attention_int8": [_PTR, _I64, _PTR, _PTR, _I64, _PTR, _PTR, _I64, _PTR, _I64]
    + [_PTR, _I64, _PTR, _I64, _PTR]
    + [_I64] * 12
    + [_FLOAT, _INT],
    "codellama_prefill_attention_bf16": [_PTR, _I64, _PTR, _PTR, _I64, _PTR, _I64, _PTR]
    + [_I64] * 10
    + [_FLOAT, _INT],
    "codellama_prefill_attention_f32": [_PTR, _I64, _PTR, _PTR, _I64, _PTR, _I64, _PTR]
    + [_I64] * 10
    + [_FLOAT, _INT],
    "codellama_prefill_attention_int8": [_PTR, _I64, _PTR, _PTR, _I64, _PTR, _PTR, _I64, _PTR, _I64, _PTR]
    + [_I64] * 12
    + [_FLOAT, _INT],
    "codellama_rotary_bf16": [_PTR, _I64, _PTR, _PTR, _I64, _PTR, _I64, _I64, _I64, _I64, _INT],
    "codellama_gemv_int8": [_PTR, _I64, _INT, _PTR, _I64, _PTR, _I64, _PTR, _I64, _I64, _I64, _I64, _INT],
    "codellama_gemv_int4": [_PTR, _I64, _INT, _PTR, _I64, _PTR, _I64, _I64, _I64, _I64, _I64, _INT],
    "codellama_dequantize_int4": [_PTR, _I64, _PTR, _I64, _INT, _I64, _I64, _I64, _INT],
    # Several weights sharing the activations, in one call: a table of int64 per weight (common.h).
    "codellama_gemv_bf16_fused": [_PTR, _I64, _PTR, _I64, _PTR, _I64, _I64, _I64, _INT],
    "codellama_gemv_f32_fused": [_PTR, _I64, _PTR, _I64, _PTR, _I64, _I64, _I64, _INT],
    "codellama_gemv_int8_fused": [_PTR, _I64, _INT, _PTR, _I64, _PTR, _I64, _I64, _I64, _INT],
    "codellama_gemv_int4_fused": [_PTR, _I64, _INT, _PTR, _I64, _PTR, _I64, _I64, _I64, _I64, _INT],
    "codellama_rms_norm_bf16": [_PTR, _I64] * 4 + [_I64, _I64, _FLOAT, _INT, _INT],
    # A decoder layer of a decode step: the tables of decode_layer.h.
    "codellama_decode_layer": [_PTR, _PTR, _PTR, _INT, _INT],
    "codellama_decode_table_fields": [_PTR, _I64],
}


class KernelBuildError(RuntimeError):
    """A kernel library could not be compiled or loaded (the message has the compiler's output)."""


@lru_cache(maxsize=None)
def cpu_flags() -> FrozenSet[str]:
    """The instruction-set flags of this CPU from /proc/cpuinfo (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_variants() -> List[str]:
    """The variants this CPU can run, the fastest first (empty on CPUs that are not x86-64)."""
    return [name for name in VARIANTS if _CPU_FLAGS[name] <= cpu_flags()]


def cache_dir() -> Optional[Path]:
    """Where built libraries are kept: `CODELLAMA_KERNEL_CACHE` if set, else
    `$XDG_CACHE_HOME/codellama`, else `~/.cache/codellama`; without a home directory (no HOME
    and no passwd entry, as in some containers) a per-user folder in the temporary directory.

    Returns None, with a RuntimeWarning, when that fallback folder exists but is not owned by
    this user alone (another user could place a library there): the kernels are then not used.
    """
    given = os.environ.get("CODELLAMA_KERNEL_CACHE")
    if given:
        return Path(given)
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg) / "codellama"
    try:
        return Path.home() / ".cache" / "codellama"
    except (RuntimeError, KeyError, OSError):
        pass
    fallback = Path(tempfile.gettempdir()) / f"codellama-kernels-{os.getuid()}"
    try:
        fallback.mkdir(mode=0o700, exist_ok=True)
        status = fallback.lstat()
    except OSError as err:
        warnings.warn(
            f"no home directory and no usable cache folder ({err}); kernels disabled",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    if (
        not fallback.is_dir()
        or fallback.is_symlink()
        or status.st_uid != os.getuid()
        or status.st_mode & 0o022
    ):
        warnings.warn(
            f"no home directory, and {fallback} is not a folder of this user alone; kernels disabled "
            "(set CODELLAMA_KERNEL_CACHE to a private folder)",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    return fallback


def openmp_runtime() -> Optional[Path]:
    """The OpenMP runtime library torch itself uses, loaded in this process: the one inside torch's
    installation (its lib folder, or `torch.libs` of a wheel), else one not bundled by another
    package (other wheels, e.g. sentencepiece's, carry private copies). None when torch does not
    run its parallel loops with OpenMP (the kernels are then built without OpenMP)."""
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/" in line}
    except OSError:
        return None
    runtimes = sorted(Path(p) for p in paths if _OPENMP_LIBRARY.search(os.path.basename(p)))
    torch_root = Path(torch.__file__).resolve().parent
    own = [p for p in runtimes if torch_root in p.resolve().parents or p.parent.name == "torch.libs"]
    system = [p for p in runtimes if not p.parent.name.endswith(".libs")]
    found = own or system
    return found[0] if found else None


@lru_cache(maxsize=None)
def _compiler_identity(compiler: str) -> Tuple[str, str]:
    """(resolved path, first line of `--version`) of `compiler`; raises KernelBuildError."""
    path = shutil.which(compiler)
    if path is None:
        raise KernelBuildError(f"no C++ compiler {compiler!r} on PATH (set CXX to one)")
    path = os.path.realpath(path)
    try:
        version = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError) as err:
        raise KernelBuildError(f"{path} --version failed: {err}") from err
    return path, (version.stdout.splitlines() or [""])[0]


def _build_timeout() -> float:
    return float(os.environ.get("CODELLAMA_KERNEL_BUILD_TIMEOUT", "300"))


def build_commands(variant: str, source: Path, objfile: Path, library: Path) -> List[List[str]]:
    """The compile and link commands of `variant` (compiled, then linked to torch's OpenMP)."""
    compiler, _version = _compiler_identity(os.environ.get("CXX", "g++"))
    runtime = openmp_runtime()
    compile_cmd = [compiler, *_COMMON_FLAGS, *_ISA_FLAGS[variant], "-c", str(source), "-o", str(objfile)]
    link_cmd = [compiler, "-shared", str(objfile), "-o", str(library)]
    if runtime is not None:
        compile_cmd.insert(1, "-fopenmp")  # the pragmas only; the runtime is linked below by path
        link_cmd += [str(runtime), f"-Wl,-rpath,{runtime.parent}"]
    return [compile_cmd, link_cmd]


def _cache_key(variant: str) -> str:
    compiler, version = _compiler_identity(os.environ.get("CXX", "g++"))
    digest = hashlib.sha256()
    for part in (compiler, version, " ".join(build_commands(variant, Path("s"), Path("o"), Path("l"))[0])):
        digest.update(part.encode() + b"\0")
    digest.update(str(openmp_runtime()).encode() + b"\0")
    for path in sorted(SOURCE_DIR.glob("*.h")) + [SOURCE_DIR / f"kernels_{variant}.cpp"]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _open(path: Path) -> ctypes.CDLL:
    library = ctypes.CDLL(str(path))
    for name, argtypes in ENTRY_POINTS.items():
        function = getattr(library, name)
        function.argtypes = argtypes
        function.restype = ctypes.c_int
    return library


def _compile(variant: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        source = SOURCE_DIR / f"kernels_{variant}.cpp"
        objfile, built = Path(tmp) / "kernels.o", Path(tmp) / "kernels.so"
        for command in build_commands(variant, source, objfile, built):
            try:
                subprocess.run(command, check=True, capture_output=True, timeout=_build_timeout())
            except subprocess.TimeoutExpired as err:
                raise KernelBuildError(
                    f"building the {variant} kernels took over {err.timeout:.0f} s "
                    "(raise CODELLAMA_KERNEL_BUILD_TIMEOUT)"
                ) from err
            except subprocess.CalledProcessError as err:
                output = (err.stderr or b"").decode(errors="replace")[:2000]
                raise KernelBuildError(
                    f"building the {variant} kernels failed: {' '.join(command)}\n{output}"
                ) from err
            except OSError as err:
                raise KernelBuildError(f"building the {variant} kernels failed: {err}") from err
        os.replace(built, target)  # atomic: concurrent processes never load half a file


def load(variant: str) -> ctypes.CDLL:
    """The library of `variant`, built on first use (or rebuilt when the cached one does not load).

    Raises:
        ValueError: for an unknown variant name.
        KernelBuildError: if there is no cache folder, or the build fails or times out.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown kernel variant {variant!r}; use one of {', '.join(VARIANTS)}")
    folder = cache_dir()
    if folder is None:
        raise KernelBuildError("no usable folder for the kernel cache (set CODELLAMA_KERNEL_CACHE)")
    try:
        target = folder / f"codellama_{variant}_{_cache_key(variant)}.so"
    except OSError as err:
        raise KernelBuildError(f"cannot read the kernel sources in {SOURCE_DIR}: {err}") from err
    if target.exists():
        try:
            return _open(target)
        except (OSError, AttributeError):
            target.unlink(missing_ok=True)  # truncated or foreign: build it again
    _compile(variant, target)
    try:
        return _open(target)
    except (OSError, AttributeError) as err:
        raise KernelBuildError(f"the freshly built {target} does not load: {err}") from err


# Run by `prove` in a child process: one bf16 matrix-vector product of all-ones [1, 40] by [3, 40]
# (40: full vectors and a tail on every variant), which must give 40.0 three times; then one int8
# product of all-ones [1, 72] by all-ones codes [1, 72] with scale 1 (the integer dot products of
# AVX512-VNNI, and a tail), which must give 72.0.
_PROOF_SCRIPT = r"""
import ctypes, sys
library = ctypes.CDLL(sys.argv[1])
ONE, FORTY, SEVENTY_TWO = 0x3F80, 0x4220, 0x4290  # 1.0, 40.0 and 72.0 in bf16
x, w, y = (ctypes.c_uint16 * 40)(*[ONE] * 40), (ctypes.c_uint16 * 120)(*[ONE] * 120), (ctypes.c_uint16 * 3)()
function = library.codellama_gemv_bf16
function.argtypes = [ctypes.c_void_p, ctypes.c_int64] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_int]
function.restype = ctypes.c_int
status = function(x, 40, w, 120, y, 3, 1, 3, 40, 1)
print(status, list(y))
if status != 0 or list(y) != [FORTY] * 3:
    sys.exit(3)
x, q = (ctypes.c_uint16 * 72)(*[ONE] * 72), (ctypes.c_int8 * 72)(*[1] * 72)
s, y = (ctypes.c_uint16 * 1)(ONE), (ctypes.c_uint16 * 1)()
function = library.codellama_gemv_int8
function.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int] + [ctypes.c_void_p, ctypes.c_int64] * 3
function.argtypes += [ctypes.c_int64] * 3 + [ctypes.c_int]
function.restype = ctypes.c_int
status = function(x, 72, 1, q, 72, s, 1, y, 1, 1, 1, 72, 1)
print(status, list(y))
sys.exit(0 if status == 0 and list(y) == [SEVENTY_TWO] else 3)
"""


def signal_name(number: int) -> str:
    """ "SIGILL" for 4, and so on."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def prove_library(library: ctypes.CDLL) -> Optional[str]:
    """Run one small call of the loaded kernel `library` in a child process: None if it ran and
    gave the right result, else what happened (e.g. killed by SIGILL: the CPU or the virtual
    machine refused an instruction the CPU flags promise). Checked once per library file and process."""
    return _prove_path(library._name)  # the path it was loaded from


@lru_cache(maxsize=None)
def _prove_path(path: str) -> Optional[str]:
    try:
        child = subprocess.run(
            [sys.executable, "-c", _PROOF_SCRIPT, path], capture_output=True, text=True, timeout=120
        )
    except (OSError, subprocess.SubprocessError) as err:
        return f"the test call could not be run: {err}"
    if child.returncode == 0:
        return None
    if child.returncode < 0:
        name = signal_name(-child.returncode)
        why = " (an instruction was refused by the CPU or the virtual machine)" if name == "SIGILL" else ""
        return f"the test call was killed by {name}{why}"
    output = (child.stdout + child.stderr).strip()[-300:]
    return f"the test call gave a wrong result or failed (exit status {child.returncode}): {output}"


def prove(variant: str) -> Optional[str]:
    """Build `variant` if needed and run it once (`prove_library`): None if it runs here, else why
    not (including a build failure).

    Raises:
        ValueError: for an unknown variant name.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown kernel variant {variant!r}; use one of {', '.join(VARIANTS)}")
    if variant not in cpu_variants():
        return f"the CPU flags lack {', '.join(sorted(_CPU_FLAGS[variant] - cpu_flags()))}"
    try:
        library = load(variant)
    except KernelBuildError as err:
        return f"it could not be built: {str(err)[:300]}"
    return prove_library(library)
