"""Checkpoint files made to attack the loader: each is refused with a ValueError naming the file
(and the field), without running anything it holds and without memory in proportion to the
sizes it claims. Also: the safetensors files of a Hugging Face folder are closed after use."""

import json
import os
import re
import shutil
import struct
import tracemalloc
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

import llama.reshard
from llama import Llama, checkpoint, hf_format
from llama.convert import from_hf, to_hf
from tests.tiny import make_checkpoint


@pytest.fixture(scope="module")
def vocab(tokenizer_path) -> int:
    return spm.SentencePieceProcessor(model_file=str(tokenizer_path)).vocab_size()


@pytest.fixture(scope="module")
def originals(tmp_path_factory, vocab):
    """A tiny Meta checkpoint and the same weights as a Hugging Face folder of several files."""
    root = tmp_path_factory.mktemp("hostile")
    meta = make_checkpoint(root / "meta", vocab_size=vocab)
    hf = to_hf(str(meta), root / "hf", max_shard_size="100KB", progress=False)
    assert (hf / hf_format.INDEX_FILE).is_file()
    return meta, hf


@pytest.fixture
def meta_dir(originals, tmp_path) -> Path:
    return Path(shutil.copytree(originals[0], tmp_path / "meta"))


@pytest.fixture
def hf_dir(originals, tmp_path) -> Path:
    return Path(shutil.copytree(originals[1], tmp_path / "hf"))


def weight_files(hf_dir: Path):
    return sorted(hf_dir.glob("*.safetensors"))


# ---------------------------------------------------------------------------------------------
# A pickle that would run code
# ---------------------------------------------------------------------------------------------


class MakesFolder:
    """Unpickles as a call to os.mkdir(path): what an attacker's object would do."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_a_shard_whose_pickle_runs_code_is_refused_unrun(meta_dir, tmp_path, tokenizer_path):
    shard_path = meta_dir / "consolidated.00.pth"
    marker = tmp_path / "code-ran"
    shard = torch.load(shard_path, weights_only=True)
    shard["rope.freqs"] = MakesFolder(marker)
    torch.save(shard, shard_path)
    torch.load(shard_path, weights_only=False)  # the file is hostile: unpickling it runs the call
    assert marker.is_dir()
    marker.rmdir()

    with pytest.raises(ValueError) as err:
        Llama.build(str(meta_dir), str(tokenizer_path), max_seq_len=32, max_batch_size=1, dtype="float32")
    message = str(err.value)
    assert str(shard_path) in message
    assert "refused unread" in message and "could run code" in message and "posix.mkdir" in message
    assert "truncated" not in message
    assert not marker.exists()
    assert (
        llama.reshard.main(["--ckpt_dir", str(meta_dir), "--out_dir", str(tmp_path / "out"), "--mp", "1"])
        == 1
    )
    assert not marker.exists() and not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# safetensors headers that claim more than the file holds
# ---------------------------------------------------------------------------------------------


def rewrite_header(path: Path, edit) -> None:
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    edit(header)
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data[8 + length :])


def claim_a_huge_tensor(header: dict) -> None:
    name = next(key for key in header if key != "__metadata__")
    start = header[name]["data_offsets"][0]
    header[name]["shape"] = [1 << 20, 1 << 20]
    header[name]["data_offsets"] = [start, start + (4 << 40)]  # 4 TiB of float32


def claim_a_huge_header(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 1 << 40) + data[8:])


@pytest.mark.parametrize("damage", ["tensor larger than the file", "header larger than the file"])
def test_a_safetensors_file_claiming_more_than_it_holds_is_refused(hf_dir, tmp_path, damage):
    target = weight_files(hf_dir)[1]
    if damage == "tensor larger than the file":
        rewrite_header(target, claim_a_huge_tensor)
        expected = r"is not a valid safetensors file"
    else:
        claim_a_huge_header(target)
        expected = r"claims a 1099511627776-byte header but is only \d+ bytes long"
    with pytest.raises(ValueError, match=re.escape(str(target)) + " " + expected):
        checkpoint.load_rank_state_dict(str(hf_dir), checkpoint.read_params(str(hf_dir)), 0, 1)
    with pytest.raises(ValueError, match=re.escape(str(target))):
        from_hf(str(hf_dir), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_safetensors_file_shorter_than_its_header_length_is_refused(hf_dir):
    target = weight_files(hf_dir)[0]
    target.write_bytes(b"\x10\x00")
    with pytest.raises(ValueError, match=re.escape(str(target)) + ".* too short"):
        hf_format.HFCheckpoint(str(hf_dir))


# ---------------------------------------------------------------------------------------------
# Index entries that leave the folder
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "entry",
    ["{outside}/{name}", "../outside/{name}", "sub/../../outside/{name}", "..\\outside\\{name}", "C:{name}"],
)
def test_an_index_naming_a_file_outside_the_folder_is_refused(hf_dir, tmp_path, entry):
    # A readable checkpoint file does lie outside: without the check it would be loaded.
    outside = tmp_path / "outside"
    outside.mkdir()
    moved = weight_files(hf_dir)[0]
    shutil.copy(moved, outside / moved.name)
    index_path = hf_dir / hf_format.INDEX_FILE
    index = json.loads(index_path.read_text())
    entry = entry.format(outside=outside, name=moved.name)
    index["weight_map"] = {k: (entry if v == moved.name else v) for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    moved.unlink()

    with pytest.raises(ValueError) as err:
        hf_format.HFCheckpoint(str(hf_dir))
    assert str(index_path) in str(err.value) and repr(entry) in str(err.value)
    assert "outside the checkpoint folder" in str(err.value)


@pytest.mark.parametrize("weight_map", [None, ["model.safetensors"], {"lm_head.weight": 7}])
def test_an_index_without_a_map_of_file_names_is_refused(hf_dir, weight_map):
    index_path = hf_dir / hf_format.INDEX_FILE
    index_path.write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ValueError, match=re.escape(str(index_path))):
        hf_format.HFCheckpoint(str(hf_dir))


# ---------------------------------------------------------------------------------------------
# params.json and config.json
# ---------------------------------------------------------------------------------------------


def test_a_params_json_of_several_megabytes_is_refused_unread(meta_dir):
    path = meta_dir / "params.json"
    params = json.loads(path.read_text())
    path.write_text(json.dumps({**params, "padding": "x" * 8_000_000}))
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=re.escape(str(path)) + r" is 8\d{6} bytes, more than"):
            checkpoint.read_params(str(meta_dir))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000  # the file was not read into memory


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("dim", "64", r"dim must be a positive integer, got '64'"),
        ("n_layers", -2, r"n_layers must be a positive integer, got -2"),
        ("n_heads", 4.0, r"n_heads must be a positive integer, got 4\.0"),
        ("n_kv_heads", True, r"n_kv_heads must be a positive integer, got True"),
        ("vocab_size", "600", r"vocab_size must be a positive integer, or -1 .*, got '600'"),
        ("vocab_size", 0, r"vocab_size must be a positive integer, or -1 .*, got 0"),
        ("norm_eps", float("nan"), r"norm_eps must be a positive number, got nan"),
        ("rope_theta", float("inf"), r"rope_theta must be a positive number, got inf"),
        ("max_seq_len", 4096, r"sets \['max_seq_len'\], which size the KV cache"),
    ],
)
def test_a_params_json_field_of_the_wrong_type_is_named(meta_dir, field, value, expected):
    path = meta_dir / "params.json"
    params = json.loads(path.read_text())
    path.write_text(json.dumps({**params, field: value}))
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + expected):
        checkpoint.read_params(str(meta_dir))


def test_deeply_nested_json_is_refused_as_invalid(meta_dir):
    path = meta_dir / "params.json"
    path.write_text("[" * 200_000)
    with pytest.raises(ValueError, match=re.escape(str(path)) + " is not valid JSON"):
        checkpoint.read_params(str(meta_dir))


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("num_key_value_heads", "4", r"num_key_value_heads must be a positive integer, got '4'"),
        ("num_hidden_layers", -1, r"num_hidden_layers must be a positive integer, got -1"),
        ("rms_norm_eps", "1e-5", r"rms_norm_eps must be a positive number, got '1e-5'"),
        ("padding", "x" * 3_000_000, r"is 3\d{6} bytes, more than"),
    ],
)
def test_a_config_json_field_of_the_wrong_type_is_named(hf_dir, tmp_path, field, value, expected):
    path = hf_dir / hf_format.CONFIG_FILE
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, field: value}))
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + expected):
        checkpoint.read_params(str(hf_dir))
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + expected):
        from_hf(str(hf_dir), tmp_path / "out", progress=False)


# ---------------------------------------------------------------------------------------------
# Open files are closed
# ---------------------------------------------------------------------------------------------


def open_or_mapped(paths) -> set:
    """Which of `paths` this process has open or memory-mapped."""
    names = {str(Path(p).resolve()) for p in paths}
    found = set()
    with open("/proc/self/maps") as maps:
        for line in maps:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].strip() in names:
                found.add(parts[5].strip())
    for fd in os.listdir("/proc/self/fd"):
        target = os.path.realpath(f"/proc/self/fd/{fd}")
        if target in names:
            found.add(target)
    return found


needs_proc = pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux /proc")


@needs_proc
def test_a_hugging_face_checkpoint_closes_its_files(hf_dir):
    files = weight_files(hf_dir)
    with hf_format.HFCheckpoint(str(hf_dir)) as ckpt:
        assert open_or_mapped(files) == {str(p.resolve()) for p in files}
        whole = ckpt.read("layers.0.attention.wq.weight")
        expected = whole.clone()
    assert torch.equal(whole, expected)  # what was read stays valid
    del whole
    assert open_or_mapped(files) == set()
    ckpt.close()  # twice is fine


@needs_proc
def test_files_opened_before_a_refusal_are_closed(hf_dir):
    files = weight_files(hf_dir)
    rewrite_header(files[-1], claim_a_huge_tensor)
    with pytest.raises(ValueError, match=re.escape(str(files[-1]))) as err:
        hf_format.HFCheckpoint(str(hf_dir))
    assert err.traceback  # the failed constructor's frame is still referenced here
    assert open_or_mapped(files) == set()
