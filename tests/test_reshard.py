"""`python -m llama.reshard` and resharding on load in one process (any shard count -> MP=1).

The multi-process direction (MP=2 and MP=4 groups) is in test_reshard_multiprocess.py.
"""

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llama.reshard
from llama import Llama, checkpoint
from llama.reshard import main, reshard
from tests.layouts import assert_same_outputs, probe, write_layouts
from tests.tiny import shard_state_dict

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def layouts(tmp_path_factory, tokenizer_path):
    return write_layouts(tmp_path_factory.mktemp("layouts"), tokenizer_path)


@pytest.fixture(scope="module")
def reference(layouts, tokenizer_path):
    """Outputs of the MP=1 checkpoint loaded as saved (no resharding)."""
    _, _, dirs = layouts
    return probe(Llama.build(str(dirs[1]), str(tokenizer_path), 32, 2, dtype="float32"))


def load_shards(folder: Path):
    paths = sorted(folder.glob("consolidated.*.pth"))
    return [torch.load(path, map_location="cpu", weights_only=True) for path in paths]


@pytest.mark.parametrize("source_mp, target_mp", [(1, 2), (2, 1), (2, 4), (1, 4)])
def test_reshard_writes_the_fairscale_split_of_the_weights(layouts, tmp_path, source_mp, target_mp):
    params, full, dirs = layouts
    out = reshard(str(dirs[source_mp]), str(tmp_path / "out"), target_mp, progress=False)

    shards = load_shards(out)
    expected = shard_state_dict(full, target_mp)  # the test fixtures' own split of the released layout
    assert len(shards) == target_mp
    for rank, (shard, want) in enumerate(zip(shards, expected)):
        assert sorted(shard) == sorted(want), f"rank {rank} keys"
        for key in want:
            assert torch.equal(shard[key], want[key]), f"rank {rank} {key}"
    # Each file holds its own part only, not the whole source tensors it was sliced from.
    part_bytes = sum(t.numel() * t.element_size() for t in expected[0].values())
    assert os.path.getsize(out / "consolidated.00.pth") < part_bytes * 1.1 + 65536

    assert json.loads((out / "params.json").read_text()) == params
    assert (out / "tokenizer.model").read_bytes() == (dirs[source_mp] / "tokenizer.model").read_bytes()
    checklist = {}
    for line in (out / "checklist.chk").read_text().splitlines():
        digest, name = line.split("  ")
        checklist[name] = digest
    files = sorted(p.name for p in out.iterdir() if p.name != "checklist.chk")
    assert sorted(checklist) == files
    for name in files:
        assert checklist[name] == hashlib.md5((out / name).read_bytes()).hexdigest()


def test_build_merges_two_shards_on_one_process(layouts, tokenizer_path, reference):
    _, _, dirs = layouts
    generator = Llama.build(str(dirs[2]), str(tokenizer_path), 32, 2, dtype="float32")
    assert_same_outputs(probe(generator), reference, "MP=2 checkpoint on 1 process")


def test_resharded_checkpoints_load_and_match(layouts, tokenizer_path, reference, tmp_path):
    _, _, dirs = layouts
    merged = reshard(str(dirs[2]), str(tmp_path / "mp1"), 1, progress=False)
    generator = Llama.build(str(merged), str(tokenizer_path), 32, 2, dtype="float32")
    assert_same_outputs(probe(generator), reference, "2 -> 1 by llama.reshard")
    split = reshard(str(dirs[1]), str(tmp_path / "mp4"), 4, progress=False)
    generator = Llama.build(str(split), str(tokenizer_path), 32, 2, dtype="float32")
    assert_same_outputs(probe(generator), reference, "1 -> 4 by llama.reshard, loaded on 1 process")


def test_unsplittable_shapes_name_the_tensor_and_sizes(tmp_path, tokenizer_path):
    # multiple_of=2 gives an FFN hidden size of 170, which 4 ranks cannot split.
    params, _, dirs = write_layouts(tmp_path, tokenizer_path, mps=(1,), multiple_of=2)
    for attempt in (
        lambda: reshard(str(dirs[1]), str(tmp_path / "out"), 4, progress=False),
        lambda: checkpoint.load_rank_state_dict(str(dirs[1]), params, 0, 4),  # what Llama.build runs
    ):
        with pytest.raises(ValueError) as err:
            attempt()
        message = str(err.value)
        assert "feed_forward.w1.weight" in message and "(170, 64)" in message and "4 " in message
    assert not (tmp_path / "out").exists()
    # Heads that do not divide are named too.
    with pytest.raises(ValueError, match="n_kv_heads=4"):
        reshard(str(dirs[1]), str(tmp_path / "out"), 8, progress=False)


def test_refuses_a_non_empty_output_unless_forced(layouts, tmp_path, capsys):
    _, _, dirs = layouts
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty.*--force"):
        reshard(str(dirs[1]), str(out), 2, progress=False)
    assert main(["--ckpt_dir", str(dirs[1]), "--out_dir", str(out), "--mp", "2"]) == 1
    assert "--force" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]

    assert main(["--ckpt_dir", str(dirs[1]), "--out_dir", str(out), "--mp", "2", "--force"]) == 0
    assert not (out / "notes.txt").exists()
    assert len(load_shards(out)) == 2
    # An empty folder is fine without --force; nothing is left beside the outputs.
    (tmp_path / "empty").mkdir()
    reshard(str(dirs[2]), str(tmp_path / "empty"), 1, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "out"]


def test_help_describes_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    usage = capsys.readouterr().out
    for option in ("--ckpt_dir", "--out_dir", "--mp", "--force"):
        assert option in usage


def test_an_interrupted_write_leaves_no_checkpoint(layouts, tmp_path, monkeypatch):
    _, _, dirs = layouts
    real_save = torch.save
    calls = []

    def failing_save(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            Path(path).write_bytes(b"half a file")
            raise OSError("disk full")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(llama.reshard.torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        reshard(str(dirs[1]), str(tmp_path / "out"), 2, progress=False)
    assert len(calls) == 2
    assert list(tmp_path.iterdir()) == []  # no output folder, no staging leftovers

    # With --force over an existing checkpoint, the old one survives a failed rewrite intact.
    previous = reshard(str(dirs[2]), str(tmp_path / "old"), 1, progress=False)
    before = {p.name: p.read_bytes() for p in previous.iterdir()}
    calls.clear()
    with pytest.raises(OSError):
        reshard(str(dirs[1]), str(previous), 4, force=True, progress=False)
    assert {p.name: p.read_bytes() for p in previous.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]


def test_a_killed_process_leaves_no_loadable_checkpoint(layouts, tmp_path):
    _, _, dirs = layouts
    out = tmp_path / "out"
    # Kill the process (no chance to clean up) while it writes the second shard.
    script = (
        "import os, signal, sys, torch\n"
        "import llama.reshard as r\n"
        "real = torch.save\n"
        "def save(obj, path, *a, **k):\n"
        "    real(obj, path, *a, **k)\n"
        "    if path.name.endswith('01.pth'):\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "r.torch.save = save\n"
        "sys.exit(r.main(sys.argv[1:]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-c", script, "--ckpt_dir", str(dirs[1]), "--out_dir", str(out), "--mp", "4"],
        env=env,
        capture_output=True,
        timeout=120,
    )
    assert run.returncode == -signal.SIGKILL
    assert not out.exists()
    leftovers = list(tmp_path.iterdir())
    assert all(p.name.startswith(".out.partial-") for p in leftovers)
    with pytest.raises((FileNotFoundError, ValueError)):
        checkpoint.read_params(str(out))
