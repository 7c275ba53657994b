"""Weights placed for streaming at load (`llama.alignment.place_weight`): large CPU weights in
their own mappings advised for transparent huge pages, the rest 64-byte aligned, the values
unchanged. The mapping flags are read back from /proc/self/smaps (Linux), so these tests check
what the kernel was asked for whatever memory it had free for 2 MiB pages at the time."""

import sys
from typing import Dict, List, Tuple

import pytest
import sentencepiece as spm
import torch

from llama import Llama, alignment, quantization
from tests.tiny import make_checkpoint

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")

MiB = 2**20


def mappings() -> List[Tuple[int, int, List[str]]]:
    """(start, end, VmFlags) of every mapping of this process."""
    found, current = [], None
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(part, 16) for part in head.split("-"))
                current = [start, end, []]
                found.append(current)
            elif head == "VmFlags:":
                current[2] = line.split()[1:]
    return [tuple(entry) for entry in found]


def huge_page_advice(tensor: torch.Tensor) -> Dict[str, int]:
    """Bytes of `tensor` in mappings advised for huge pages ("hg" flag) and in others."""
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    bytes_by_advice = {"advised": 0, "not advised": 0}
    for first, last, flags in mappings():
        overlap = min(end, last) - max(start, first)
        if overlap > 0:
            bytes_by_advice["advised" if "hg" in flags else "not advised"] += overlap
    return bytes_by_advice


def test_on_huge_pages_advises_whole_huge_pages_and_keeps_the_values():
    source = torch.randn(5 * MiB // 4 + 7)  # 5 MiB and 28 bytes: two whole huge pages and a tail
    placed = alignment.on_huge_pages(source)
    assert torch.equal(placed, source) and placed.dtype == source.dtype and placed.is_contiguous()
    assert placed.data_ptr() % alignment.HUGE_PAGE == 0
    advice = huge_page_advice(placed)
    # The whole huge pages are advised; the tail (1 MiB + 28 bytes) stays on base pages, so the
    # copy never takes a whole 2 MiB page for a partial one.
    assert advice == {"advised": 4 * MiB, "not advised": MiB + 28}
    view = placed[:10].clone()
    del placed
    assert torch.equal(view, source[:10])
    with pytest.raises(ValueError, match="places CPU tensors"):
        alignment.on_huge_pages(torch.empty(4, device="meta"))


def test_place_weight_copies_large_cpu_weights_only_where_huge_pages_exist(monkeypatch):
    large = torch.randn(3 * MiB // 4)  # 3 MiB
    small = torch.randn(1024)
    monkeypatch.setattr(alignment, "huge_pages_available", lambda: True)
    placed = alignment.place_weight(large)
    assert torch.equal(placed, large) and placed.data_ptr() % alignment.HUGE_PAGE == 0
    assert huge_page_advice(placed)["advised"] == 2 * MiB
    assert alignment.place_weight(small) is small  # below one huge page: aligned only (it already is)

    monkeypatch.setattr(alignment, "huge_pages_available", lambda: False)
    assert alignment.place_weight(large) is large
    shifted = torch.randn(3 * MiB // 4 + 1)[1:]  # starts 4 bytes past a 64-byte boundary
    fixed = alignment.place_weight(shifted)
    assert torch.equal(fixed, shifted) and fixed.data_ptr() % alignment.ALIGNMENT == 0
    assert huge_page_advice(fixed)["advised"] == 0


@pytest.mark.parametrize(
    "setting, available",
    [
        ("always [madvise] never\n", True),
        ("[always] madvise never\n", True),
        ("always madvise [never]\n", False),
    ],
)
def test_huge_pages_available_reads_the_system_setting(tmp_path, monkeypatch, setting, available):
    path = tmp_path / "enabled"
    path.write_text(setting)
    monkeypatch.setattr(alignment, "THP_SETTING", path)
    assert alignment.huge_pages_available() is available
    monkeypatch.setattr(alignment, "THP_SETTING", tmp_path / "missing")
    assert alignment.huge_pages_available() is False


def test_huge_pages_can_be_turned_off(tmp_path, monkeypatch):
    path = tmp_path / "enabled"
    path.write_text("always [madvise] never\n")
    monkeypatch.setattr(alignment, "THP_SETTING", path)
    monkeypatch.setenv("CODELLAMA_HUGE_PAGES", "0")
    assert alignment.huge_pages_available() is False
    assert alignment.huge_pages_refusal() == "CODELLAMA_HUGE_PAGES=0"
    large = torch.randn(3 * MiB // 4)
    assert alignment.place_weight(large) is large
    monkeypatch.setenv("CODELLAMA_HUGE_PAGES", "1")
    assert alignment.huge_pages_available() is True


@pytest.fixture(scope="module")
def wide_checkpoint(tmp_path_factory, tokenizer_path):
    """One layer of dim 2048: w1/w2/w3 of 44 MiB in fp32, 11 MiB in int8, 5.5 MiB in int4 (over a
    huge page); wk of 1 MiB in fp32 (under)."""
    vocab = spm.SentencePieceProcessor(model_file=str(tokenizer_path)).vocab_size()
    return make_checkpoint(
        tmp_path_factory.mktemp("wide"),
        vocab,
        dim=2048,
        n_layers=1,
        n_heads=16,
        n_kv_heads=1,
        multiple_of=256,
    )


def linear_tensors(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The linear layers' weights (or quantized codes) of `model` by name."""
    found = {}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if (
            name.endswith(("wq.weight", "wk.weight", "w1.weight", "w2.weight", "w3.weight", "codes"))
            or name == "output.weight"
        ):
            found[name] = tensor
    return found


@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
def test_loading_places_the_linear_weights_on_huge_pages(
    wide_checkpoint, tokenizer_path, monkeypatch, quantize
):
    def build() -> Llama:
        return Llama.build(
            str(wide_checkpoint), str(tokenizer_path), 32, 1, dtype="float32", quantize=quantize
        )

    monkeypatch.setattr(alignment, "huge_pages_available", lambda: True)
    placed = build()
    monkeypatch.setattr(alignment, "huge_pages_available", lambda: False)
    unplaced = build()
    tensors = linear_tensors(placed.model)
    large = [name for name, t in tensors.items() if t.numel() * t.element_size() >= alignment.HUGE_PAGE]
    assert large and len(large) < len(tensors), "the checkpoint must have weights over and under a huge page"
    for name, tensor in tensors.items():
        assert tensor.is_contiguous() and tensor.data_ptr() % alignment.ALIGNMENT == 0, name
        advice = huge_page_advice(tensor)
        if name in large:
            assert tensor.data_ptr() % alignment.HUGE_PAGE == 0, name
            whole = tensor.numel() * tensor.element_size() // alignment.HUGE_PAGE * alignment.HUGE_PAGE
            assert advice["advised"] == whole, name
        else:
            assert advice["advised"] == 0, name
    for name, tensor in linear_tensors(unplaced.model).items():
        assert huge_page_advice(tensor)["advised"] == 0, name
        assert torch.equal(tensor, tensors[name]), name  # the same values wherever they live
    if quantize:
        assert any(isinstance(m, quantization.QuantizedWeight) for m in placed.model.modules())
    tokens = torch.tensor([[1, 5, 9, 13]])
    assert torch.equal(placed.model(tokens, 0), unplaced.model(tokens, 0))
