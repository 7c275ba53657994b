"""`reshard` and `convert` never write over their input: an --out_dir that contains the input
folder, or lies inside it, is refused even with --force, and the input is left byte for byte."""

import hashlib
import re
from pathlib import Path
from typing import Dict

import pytest
import sentencepiece as spm

import llama.convert
import llama.reshard
from tests.tiny import make_checkpoint


def snapshot(folder: Path) -> Dict[str, str]:
    """md5 of every file under `folder`, by relative path."""
    return {
        str(path.relative_to(folder)): hashlib.md5(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.fixture
def meta_dir(tmp_path, tokenizer_path) -> Path:
    vocab = spm.SentencePieceProcessor(model_file=str(tokenizer_path)).vocab_size()
    return make_checkpoint(tmp_path / "models" / "CodeLlama-tiny", vocab_size=vocab)


@pytest.fixture
def hf_dir(meta_dir, tmp_path) -> Path:
    return llama.convert.to_hf(str(meta_dir), tmp_path / "models" / "CodeLlama-tiny-hf", progress=False)


COMMANDS = {
    "reshard": lambda src, out: llama.reshard.main(
        ["--ckpt_dir", src, "--out_dir", out, "--mp", "1", "--force"]
    ),
    "to-hf": lambda src, out: llama.convert.main(["to-hf", "--ckpt_dir", src, "--out_dir", out, "--force"]),
    "from-hf": lambda src, out: llama.convert.main(["from-hf", "--hf_dir", src, "--out_dir", out, "--force"]),
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("direction", ["output contains input", "output inside input"])
def test_output_folder_overlapping_the_input_is_refused_even_with_force(
    command, direction, meta_dir, hf_dir, capsys
):
    source = hf_dir if command == "from-hf" else meta_dir
    out = source.parent if direction == "output contains input" else source / "resharded"
    before = snapshot(source.parent)

    assert COMMANDS[command](str(source), str(out)) == 1

    error = capsys.readouterr().err
    assert re.search(r"output directory .*(contains|lies inside) the input directory", error), error
    assert str(out) in error and str(source) in error
    assert snapshot(source.parent) == before  # nothing deleted, nothing written
    assert sorted(p.name for p in source.parent.iterdir()) == ["CodeLlama-tiny", "CodeLlama-tiny-hf"]


def test_output_folder_reached_through_a_link_is_refused(meta_dir, tmp_path):
    link = tmp_path / "link-to-models"
    link.symlink_to(meta_dir.parent, target_is_directory=True)
    before = snapshot(meta_dir)
    with pytest.raises(ValueError, match="contains the input directory"):
        llama.reshard.reshard(str(meta_dir), str(link), 1, force=True, progress=False)
    assert snapshot(meta_dir) == before


def test_a_sibling_output_folder_is_still_written(meta_dir):
    out = llama.reshard.reshard(str(meta_dir), str(meta_dir.parent / "CodeLlama-tiny-mp1"), 1, progress=False)
    assert sorted(p.name for p in out.glob("*.pth")) == ["consolidated.00.pth"]
