"""Writing a checkpoint directory all-or-nothing: files go to a hidden staging folder next to
the destination, which replaces the destination only once everything is written."""

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Optional, Union

import torch

CHECKLIST_FILE = "checklist.chk"

PathLike = Union[str, Path]


@contextlib.contextmanager
def staged_output_dir(
    out_dir: PathLike, force: bool = False, source_dir: Optional[PathLike] = None
) -> Iterator[Path]:
    """Yield an empty staging folder; on success it becomes `out_dir`, on any error (or
    interrupt) it is deleted and `out_dir` is left as it was.

    A killed process leaves only a hidden `.NAME.partial-*` folder beside `out_dir`, never a
    loadable half-written checkpoint in it. With `force`, an existing `out_dir` is replaced
    (after the new one is complete).

    Raises:
        ValueError: if `out_dir` is a file, is not empty and `force` is off, or is `source_dir`,
            contains it or lies inside it.
    """
    out_dir = Path(out_dir)
    if source_dir is not None:
        check_apart(source_dir, out_dir)
    if out_dir.exists():
        if not out_dir.is_dir():
            raise ValueError(f"the output path {out_dir} exists and is not a directory")
        if any(out_dir.iterdir()) and not force:
            raise ValueError(
                f"the output directory {out_dir} is not empty: choose another --out_dir, or pass --force "
                "to replace its contents"
            )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it private
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, old / out_dir.name)
    os.replace(staging, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_apart(source_dir: PathLike, out_dir: PathLike) -> None:
    """Check that neither folder is the other or inside it (symbolic links followed).

    Replacing `out_dir` deletes whatever it holds, and a folder written inside the input
    mixes the two checkpoints.

    Raises:
        ValueError: naming both folders.
    """
    source, out = Path(source_dir).resolve(), Path(out_dir).resolve()
    if out == source:
        problem = "is the input directory"
    elif source in out.parents:
        problem = f"lies inside the input directory {source_dir}"
    elif out in source.parents:
        problem = f"contains the input directory {source_dir}"
    else:
        return
    raise ValueError(
        f"the output directory {out_dir} {problem}: choose an --out_dir outside {source_dir} that does not "
        "contain it"
    )


def copy_if_present(src_dir: PathLike, name: str, dst_dir: PathLike) -> bool:
    """Copy `src_dir/name` into `dst_dir` if it exists; return whether it did."""
    src = Path(src_dir) / name
    if not src.is_file():
        return False
    shutil.copyfile(src, Path(dst_dir) / name)
    return True


def md5_file(path: Path, chunk_bytes: int = 1 << 24) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def write_checklist(ckpt_dir: PathLike) -> Path:
    """Write `checklist.chk` (`md5  filename` per file, as `md5sum` prints) for every other file."""
    ckpt_dir = Path(ckpt_dir)
    names = sorted(p.name for p in ckpt_dir.iterdir() if p.is_file() and p.name != CHECKLIST_FILE)
    lines = [f"{md5_file(ckpt_dir / name)}  {name}\n" for name in names]
    path = ckpt_dir / CHECKLIST_FILE
    path.write_text("".join(lines))
    return path


def owns_storage(tensor: torch.Tensor) -> bool:
    """True if `tensor` covers its whole storage (torch.save would write nothing more)."""
    return tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
