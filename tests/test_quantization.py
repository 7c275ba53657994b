"""Weight-only int8/int4 quantization: the stored numbers, both ways of multiplying by them, quantized
checkpoints (written, sharded, loaded under torchrun MP=2) and the errors for bad input."""

import json
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

from llama import (
    Llama,
    alignment,
    checkpoint,
    int4_pack,
    kernels,
    memory_plan,
    quantization,
    quantized_backends,
)
from llama.model import ModelArgs
from llama.quantization import QuantizedWeight, make_scheme
from llama.quantize import main as quantize_main
from llama.quantized_checkpoint import (
    QUANTIZED_FILE,
    QuantizedCheckpoint,
    QuantizingReader,
    write_quantized_checkpoint,
)
from llama.reshard import reshard
from tests.test_parallel import _launch_torchrun
from tests.tiny import random_state_dict, tiny_params, write_checkpoint

CPU = torch.device("cpu")
SCHEMES = [("int8", None), ("int4", 32), ("int4", 64), ("int4", 128)]


def reference_weight(parts, mode, group_size=None) -> torch.Tensor:
    """The fp64 weight the stored parts stand for, from the layout's definition."""
    codes = parts["weight"]
    if mode == "int8":
        return codes.double() * parts["scales"].double()[:, None]
    values = torch.empty(codes.shape[0], codes.shape[1] * 2, dtype=torch.float64)
    values[:, 0::2] = (codes % 16).double()
    values[:, 1::2] = (codes // 16).double()
    scales = parts["scales"].double().repeat_interleave(group_size, dim=1)
    zeros = parts["zeros"].double().repeat_interleave(group_size, dim=1)
    return (values - 8) * scales + zeros


@pytest.mark.parametrize("mode,group_size", SCHEMES)
def test_codes_stay_in_range_and_within_half_a_step(mode, group_size):
    weight = torch.randn(80, 256, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    parts = quantization.quantize(weight, make_scheme(mode, group_size))
    error = (reference_weight(parts, mode, group_size) - weight.double()).abs()
    if mode == "int8":
        assert parts["weight"].dtype == torch.int8 and parts["weight"].abs().max() <= 127
        step = parts["scales"].double()[:, None]
    else:
        assert parts["weight"].dtype == torch.uint8 and parts["weight"].shape == (80, 128)
        assert parts["scales"].shape == parts["zeros"].shape == (80, 256 // group_size)
        step = parts["scales"].double().repeat_interleave(group_size, dim=1)
    assert (error <= 0.51 * step).all()


@pytest.mark.parametrize("mode,group_size", [("int8", None), ("int4", 32), ("int4", 64)])
@pytest.mark.parametrize("rows", [1, 5, 40])
def test_linear_matches_fp64_reference_and_torch_ops_agree(mode, group_size, rows, torch_backends):
    """The plain path (dequantize, F.linear) against an fp64 product with the weights the parts
    stand for; torch's weight-only kernels (bf16 activations; the hand-written kernels, tested in
    tests/test_quantized_kernels.py, turned off) against the plain path. 48 output rows are not a
    multiple of torch's 32-row int4 blocks, so the padding is exercised."""
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(48, 192, generator=gen)
    scheme = make_scheme(mode, group_size)
    parts = quantization.quantize(weight, scheme)
    x = torch.randn(2, rows, 192, generator=gen)
    expected = x.double() @ reference_weight(parts, mode, group_size).T
    plain = QuantizedWeight(parts, scheme, 192, CPU, torch_ops=False)
    torch.testing.assert_close(plain.linear(x).double(), expected, rtol=1e-5, atol=1e-4)
    fast = QuantizedWeight(parts, scheme, 192, CPU, torch_ops=True)
    assert fast.backend == quantized_backends.TABLE[("cpu", mode)][1]
    assert fast.packed == (mode == "int4")
    # bf16 activations and outputs: within a percent of the outputs' scale.
    assert (fast.linear(x) - plain.linear(x)).abs().max() <= 0.01 * plain.linear(x).abs().max()
    for name, tensor in parts.items():  # torch's int4 packing reads back the stored parts exactly
        assert torch.equal(fast.parts()[name], tensor), name
    if fast.packed:  # also where the packed layout is unknown: the kernel itself gives the codes
        fast.layout = None
        for name, tensor in parts.items():
            assert torch.equal(fast.parts()[name], tensor), name
        torch.testing.assert_close(fast.dequantize(torch.float32), plain.dequantize(torch.float32))


@pytest.fixture
def torch_backends():
    """The hand-written kernels turned off: quantized weights built now take torch's backends."""
    kernels.set_enabled(False)
    yield
    kernels.set_enabled(True)


# A model whose row-parallel inputs split into 32-wide groups on 4 ranks (wo: 128 -> 32 each,
# w2: 384 -> 96 each, which 64 does not divide).
def _params(vocab):
    return tiny_params(vocab, dim=128, n_heads=8, n_kv_heads=4, multiple_of=128)


@pytest.fixture(scope="module")
def bf16_ckpt(tmp_path_factory, tokenizer_path):
    tmp = tmp_path_factory.mktemp("quant")
    vocab = spm.SentencePieceProcessor(model_file=str(tokenizer_path)).vocab_size()
    params = _params(vocab)
    ckpt = write_checkpoint(
        tmp / "bf16_mp2", params, random_state_dict(ModelArgs(**params), seed=3), mp=2, dtype=torch.bfloat16
    )
    (ckpt / "tokenizer.model").write_bytes(Path(tokenizer_path).read_bytes())
    return ckpt


@pytest.fixture(scope="module")
def quantized_dirs(bf16_ckpt, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quantized")
    return {
        name: write_quantized_checkpoint(str(bf16_ckpt), tmp / name, mode, group, progress=False)
        for name, mode, group in (("int8", "int8", None), ("int4", "int4", 32))
    }


@pytest.mark.parametrize("name", ["int8", "int4"])
@pytest.mark.parametrize("mp", [1, 2, 4])
def test_quantize_then_shard_equals_shard_then_quantize(bf16_ckpt, quantized_dirs, tmp_path, name, mp):
    """Each rank's part of the quantized checkpoint equals quantizing that rank's part of the
    16-bit checkpoint resharded for MP ranks (int8 row-parallel scales come from whole rows)."""
    stored = QuantizedCheckpoint(quantized_dirs[name])
    sharded = reshard(str(bf16_ckpt), str(tmp_path / f"mp{mp}"), mp, progress=False)
    on_load = QuantizingReader(checkpoint.open_checkpoint(str(sharded)), stored.scheme)
    assert sorted(on_load.keys()) == sorted(stored.keys())
    for key in stored.keys():
        for rank in range(mp):
            if key.endswith(("norm.weight", "tok_embeddings.weight")):
                assert torch.equal(stored.read(key, rank, mp), on_load.read(key, rank, mp)), key
                continue
            want, got = stored.read_parts(key, rank, mp), on_load.read_parts(key, rank, mp)
            assert want.keys() == got.keys()
            for part in want:
                assert torch.equal(want[part], got[part]), (key, part, rank)


def test_quantized_file_records_scheme_and_layout(quantized_dirs):
    from safetensors import safe_open

    with safe_open(str(quantized_dirs["int4"] / QUANTIZED_FILE), framework="pt") as f:
        metadata = f.metadata()
        assert f.get_tensor("layers.0.feed_forward.w2.weight").dtype == torch.uint8
        assert f.get_tensor("tok_embeddings.weight").dtype == torch.bfloat16
    assert metadata["scheme"] == "int4" and metadata["group_size"] == "32"
    assert "low nibble" in metadata["layout"]
    assert (quantized_dirs["int4"] / "params.json").is_file()
    assert (quantized_dirs["int4"] / "tokenizer.model").is_file()


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_build_quantizing_on_load_equals_loading_the_quantized_checkpoint(
    bf16_ckpt, quantized_dirs, tokenizer_path, name
):
    tokens = torch.randint(3, 500, (2, 12), generator=torch.Generator().manual_seed(4))
    group = None if name == "int8" else 32
    logits = {}
    for label, kwargs in (
        ("plain", {"ckpt_dir": str(bf16_ckpt)}),
        ("on_load", {"ckpt_dir": str(bf16_ckpt), "quantize": name, "quantize_group_size": group}),
        ("stored", {"ckpt_dir": str(quantized_dirs[name])}),
    ):
        generator = Llama.build(
            tokenizer_path=str(tokenizer_path), max_seq_len=32, max_batch_size=2, dtype="float32", **kwargs
        )
        with torch.inference_mode():
            logits[label] = generator.model(tokens, 0)
    assert torch.equal(logits["on_load"], logits["stored"])
    error = (logits["stored"] - logits["plain"]).norm() / logits["plain"].norm()
    assert error < (0.02 if name == "int8" else 0.3), error  # near the 16-bit model (random weights)
    assert error > 0


def test_quantized_checkpoint_under_torchrun_mp2_gives_mp1_tokens(quantized_dirs, tokenizer_path, tmp_path):
    gen = torch.Generator().manual_seed(5)
    job = {
        "ckpt_dirs": {name: str(path) for name, path in quantized_dirs.items()},
        "tokenizer": str(tokenizer_path),
        "forward_tokens": torch.randint(3, 500, (2, 16), generator=gen).tolist(),
        "prompts": [[1] + torch.randint(3, 500, (n,), generator=gen).tolist() for n in (3, 9, 17)],
        "out_dir": str(tmp_path),
    }
    job_path = tmp_path / "job.json"
    job_path.write_text(json.dumps(job))
    proc = _launch_torchrun(job_path, worker="quantized_worker.py")
    assert proc.returncode == 0, f"torchrun failed\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    ranks = [torch.load(tmp_path / f"quantized_rank{r}.pt", weights_only=False) for r in range(2)]
    was_enabled = kernels.enabled()
    try:
        for name, ckpt_dir in job["ckpt_dirs"].items():
            for torch_ops in (False, True):
                kernels.set_enabled(torch_ops)
                generator = Llama.build(
                    ckpt_dir, str(tokenizer_path), max_seq_len=64, max_batch_size=3, dtype="float32"
                )
                with torch.inference_mode():
                    logits = generator.model(torch.tensor(job["forward_tokens"]), 0)
                tokens, _ = generator.generate(job["prompts"], max_gen_len=12, temperature=0.0)
                for rank in ranks:
                    got = rank[(name, torch_ops)]
                    if not torch_ops:  # fp32 throughout: equal up to the order of the sums
                        assert got["tokens"] == tokens, name
                        torch.testing.assert_close(got["logits"], logits, atol=1e-4, rtol=0)
                    else:  # bf16 activations and partial sums: near ties may flip, logits stay close
                        assert (got["logits"] - logits).abs().max() <= 0.02 * logits.abs().max(), name
    finally:
        kernels.set_enabled(was_enabled)


# Bad input.


@pytest.mark.parametrize(
    "mode,group_size,message",
    [
        ("int3", None, "unknown quantization mode 'int3': use one of int8, int4"),
        ("int4", 48, "int4 group size 48 is not supported: use one of 32, 64, 128"),
        ("int8", 64, "int8 has one scale per output row and takes no group size"),
        (None, 32, r"a group size \(32\) was given without a quantization mode: add quantize='int4'"),
    ],
)
def test_unknown_scheme_is_refused(bf16_ckpt, tokenizer_path, mode, group_size, message):
    with pytest.raises(ValueError, match=message):
        Llama.build(str(bf16_ckpt), str(tokenizer_path), 32, 1, quantize=mode, quantize_group_size=group_size)


def test_group_size_that_does_not_divide_is_refused(bf16_ckpt, tmp_path, capsys):
    demo = Path(__file__).resolve().parents[1] / "models" / "demo"  # dim 192
    out = tmp_path / "out"
    code = quantize_main(
        ["--ckpt_dir", str(demo), "--out", str(out), "--mode", "int4", "--group_size", "128"]
    )
    assert code == 1 and not out.exists()
    assert (
        "int4 group size 128 does not divide the 192 input columns of layers.0.attention.wq.weight: "
        "use group size 32 or 64" in capsys.readouterr().err
    )
    reader = QuantizingReader(checkpoint.open_checkpoint(str(bf16_ckpt)), make_scheme("int4", 64))
    with pytest.raises(
        ValueError, match="it has 384 input columns, 96 on each of 4 model-parallel ranks. Use group size 32"
    ):
        reader.read_parts("layers.1.feed_forward.w2.weight", 0, 4)


def test_quantizing_a_quantized_checkpoint_is_refused(quantized_dirs, tokenizer_path, tmp_path, capsys):
    code = quantize_main(
        ["--ckpt_dir", str(quantized_dirs["int4"]), "--out", str(tmp_path / "o"), "--mode", "int8"]
    )
    assert code == 1
    assert "is already quantized (int4 with group size 32): quantize the original" in capsys.readouterr().err
    with pytest.raises(
        ValueError, match="already quantized as int4 with group size 32; it cannot be quantized again"
    ):
        Llama.build(str(quantized_dirs["int4"]), str(tokenizer_path), 32, 1, quantize="int8")


@pytest.mark.parametrize("damage", ["truncate", "metadata", "missing_scales"])
def test_corrupt_quantized_checkpoint_is_refused(quantized_dirs, tokenizer_path, tmp_path, damage):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "params.json").write_bytes((quantized_dirs["int8"] / "params.json").read_bytes())
    data = (quantized_dirs["int8"] / QUANTIZED_FILE).read_bytes()
    if damage == "truncate":
        (bad / QUANTIZED_FILE).write_bytes(data[: len(data) // 2])
        message = "is truncated or corrupt"
    else:
        tensors = load_file(str(quantized_dirs["int8"] / QUANTIZED_FILE))
        metadata = {"format": "codellama-weight-only-quantized", "scheme": "int8", "group_size": ""}
        if damage == "metadata":
            metadata["scheme"] = "int2"
            message = "records an unusable quantization scheme"
        else:
            del tensors["layers.1.attention.wo.scales"]
            message = (
                "lacks layers.1.attention.wo.scales, a part of the quantized layers.1.attention.wo.weight"
            )
        save_file(tensors, str(bad / QUANTIZED_FILE), metadata=metadata)
    with pytest.raises(ValueError, match=message):
        Llama.build(str(bad), str(tokenizer_path), 32, 1)


def test_hugging_face_source_gives_the_same_quantized_tensors(bf16_ckpt, quantized_dirs, tmp_path):
    from llama.convert import to_hf

    hf_dir = to_hf(str(bf16_ckpt), tmp_path / "hf", progress=False)
    out = write_quantized_checkpoint(str(hf_dir), tmp_path / "q", "int4", 32, progress=False)
    from_hf, from_meta = QuantizedCheckpoint(out), QuantizedCheckpoint(quantized_dirs["int4"])
    assert sorted(from_hf.keys()) == sorted(from_meta.keys())
    for key in from_meta.keys():
        if key.endswith(("norm.weight", "tok_embeddings.weight")):
            assert torch.equal(from_hf.read(key), from_meta.read(key)), key
        else:
            for part, tensor in from_meta.read_parts(key).items():
                assert torch.equal(from_hf.read_parts(key)[part], tensor), (key, part)


# Memory placement: every quantized tensor contiguous at a 64-byte boundary, however the file lays it out.


def misaligned(tensor: torch.Tensor, offset: int = 1) -> torch.Tensor:
    """A copy of `tensor` whose data starts `offset` bytes past a 64-byte boundary."""
    nbytes = tensor.numel() * tensor.element_size()
    raw = torch.empty(nbytes + 128, dtype=torch.uint8)
    start = -raw.data_ptr() % 64 + offset
    view = raw[start : start + nbytes].view(tensor.dtype).view(tensor.shape)
    view.copy_(tensor)
    assert view.data_ptr() % 64 == offset
    return view


@pytest.mark.parametrize("offset", [1, 2, 8, 16, 32])
def test_aligned_copies_misaligned_and_strided_tensors_only(offset):
    source = torch.randint(-127, 128, (33, 70), dtype=torch.int8)
    shifted = misaligned(source, offset)
    out = alignment.aligned(shifted)
    assert out.data_ptr() % 64 == 0 and out.is_contiguous() and torch.equal(out, source)
    assert out.data_ptr() != shifted.data_ptr()
    strided = alignment.aligned(source.t())
    assert strided.is_contiguous() and strided.data_ptr() % 64 == 0 and torch.equal(strided, source.t())
    ready = torch.empty(8, 64, dtype=torch.bfloat16)
    assert ready.data_ptr() % 64 == 0 and alignment.aligned(ready) is ready  # no copy when not needed
    torch_uint8 = torch.empty(101, dtype=torch.uint8)[1:]  # the usual odd-offset view
    assert alignment.aligned(torch_uint8).data_ptr() % 64 == 0
    with pytest.raises(ValueError, match="power of two"):
        alignment.aligned(source, 48)


@pytest.mark.parametrize("mode,group_size", [("int8", None), ("int4", 32)])
@pytest.mark.parametrize("torch_ops", [True, False])
def test_quantized_weight_from_misaligned_parts_holds_aligned_tensors(mode, group_size, torch_ops):
    gen = torch.Generator().manual_seed(7)
    weight, x = torch.randn(40, 96, generator=gen), torch.randn(3, 96, generator=gen)
    scheme = make_scheme(mode, group_size)
    parts = quantization.quantize(weight, scheme)
    shifted = {name: misaligned(tensor, 8) for name, tensor in parts.items()}
    built = QuantizedWeight(shifted, scheme, 96, CPU, torch_ops=torch_ops)
    for name, buffer in built.named_buffers():
        assert buffer.data_ptr() % 64 == 0 and buffer.is_contiguous(), name
    expected = QuantizedWeight(parts, scheme, 96, CPU, torch_ops=torch_ops).linear(x)
    assert torch.equal(built.linear(x), expected)


def with_padded_header(source: Path, target: Path, padding: int = 8) -> None:
    """Copy the safetensors file `source` to `target` with `padding` spaces added to its JSON
    header: a valid file whose tensors all start `padding` bytes later in the file (the offsets
    in the header count from the end of the header, so they do not change)."""
    data = source.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = data[8 : 8 + length] + b" " * padding
    target.write_bytes(len(header).to_bytes(8, "little") + header + data[8 + length :])


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_quantized_checkpoint_with_a_longer_header_loads_aligned_and_equal(
    quantized_dirs, tokenizer_path, tmp_path, name
):
    from safetensors import safe_open

    padded = tmp_path / "padded"
    padded.mkdir()
    for item in quantized_dirs[name].iterdir():
        if item.name == QUANTIZED_FILE:
            with_padded_header(item, padded / item.name)
        else:
            (padded / item.name).write_bytes(item.read_bytes())
    with safe_open(str(padded / QUANTIZED_FILE), framework="pt") as handle:  # the file shifts the codes
        offsets = {handle.get_tensor(key).data_ptr() % 64 for key in handle.keys() if key.endswith(".weight")}
    assert offsets - {0}, "no tensor of the padded file starts off a 64-byte boundary"
    tokens = torch.randint(3, 500, (2, 12), generator=torch.Generator().manual_seed(4))
    logits = {}
    for label, folder in (("as written", quantized_dirs[name]), ("padded", padded)):
        generator = Llama.build(
            str(folder), str(tokenizer_path), max_seq_len=32, max_batch_size=2, dtype="bfloat16"
        )
        weights = [m for m in generator.model.modules() if isinstance(m, QuantizedWeight)]
        assert weights
        for weight in weights:
            for part, buffer in weight.named_buffers():
                assert buffer.data_ptr() % 64 == 0 and buffer.is_contiguous(), (label, part)
        with torch.inference_mode():
            logits[label] = generator.model(tokens, 0)
    assert torch.equal(logits["as written"], logits["padded"])


# The int4 fast path: found by a round trip on this CPU, taken, and never given up silently.


def test_int4_fast_path_round_trips_and_is_taken_on_this_cpu(monkeypatch, torch_backends):
    """torch ships its CPU int4 kernel for every CPU (AVX-512, AVX2 and plain C++ builds), so the
    round trip must pass here; then, without the hand-written kernels, a linear layer multiplies
    with it and never dequantizes."""
    usable, found = int4_pack.cpu_round_trip()
    assert usable, found
    gen = torch.Generator().manual_seed(8)
    weight, x = torch.randn(100, 128, generator=gen), torch.randn(2, 3, 128, generator=gen)
    scheme = make_scheme("int4", 32)
    parts = quantization.quantize(weight, scheme)
    fast = QuantizedWeight(parts, scheme, 128, CPU)
    assert fast.backend.name == "torch-int4pack-cpu" and fast.packed
    assert fast.codes.numel() * 2 == int4_pack.padded_rows(100) * 128  # 4 bits a weight, nothing else kept
    calls = []
    monkeypatch.setattr(quantization, "dequantize", lambda *a, **k: calls.append(a) or None)
    monkeypatch.setattr(QuantizedWeight, "dequantize", lambda *a, **k: calls.append(a) or None)
    for activations in (x, x.to(torch.bfloat16)):
        assert fast.uses_op(activations)
        out = fast.linear(activations)
        expected = activations.double() @ reference_weight(parts, "int4", 32).T
        assert (out.double() - expected).abs().max() <= 0.02 * expected.abs().max()
    assert not calls, "the forward dequantized the whole weight"


def test_int4_packed_layout_is_read_back_whichever_torch_uses(monkeypatch):
    """torch packs 64-row blocks on AVX-512 and 32-row blocks on AVX2: the layout that reads back
    a converter's output is found by trying each on a probe, here with each packing written out
    from its definition; an unknown packing gives None (the kernel is then asked for the codes)."""

    def blocks(values: torch.Tensor, rows: int, pairs: bool = False) -> torch.Tensor:
        out = []
        for first in range(0, values.shape[0], rows):
            block = values[first : first + rows].T  # [K, rows]
            low, high = (
                (block[:, 0::2], block[:, 1::2]) if pairs else (block[:, : rows // 2], block[:, rows // 2 :])
            )
            out.append((low | (high << 4)).reshape(-1))
        return torch.cat(out)

    def avx512(values):  # byte d of input k: rows d and d + 32; byte 16 + d: rows d + 16 and d + 48
        out = []
        for first in range(0, values.shape[0], 64):
            block = values[first : first + 64].T
            pairs = [block[:, d] | (block[:, d + 32] << 4) for d in range(16)]
            pairs += [block[:, d + 16] | (block[:, d + 48] << 4) for d in range(16)]
            out.append(torch.stack(pairs, dim=1).reshape(-1))
        return torch.cat(out)

    find = int4_pack.cpu_layout.__wrapped__
    for packer, rows in (
        (avx512, 64),
        (lambda v: blocks(v, 32), 32),
        (lambda v: blocks(v, 32, pairs=True), 32),
    ):
        monkeypatch.setattr(int4_pack, "cpu_pack", packer)
        layout = find()
        assert layout is not None and layout.block_rows == rows
    monkeypatch.setattr(int4_pack, "cpu_pack", lambda v: blocks(v.flip(0), 32))
    assert find() is None


def test_a_failing_int4_round_trip_falls_back_loudly(monkeypatch, torch_backends):
    monkeypatch.setattr(int4_pack, "cpu_round_trip", lambda: (False, "a simulated mismatch"))
    monkeypatch.setattr(quantized_backends, "_warned", set())
    parts = quantization.quantize(torch.randn(64, 64), make_scheme("int4", 32))
    with pytest.warns(
        RuntimeWarning, match="dequantize their whole weight on every call.*a simulated mismatch"
    ):
        weight = QuantizedWeight(parts, make_scheme("int4", 32), 64, CPU)
    assert weight.backend is quantized_backends.DEQUANTIZE and not weight.uses_op(torch.randn(1, 64))
    assert any(
        "FALLBACK" in line and "a simulated mismatch" in line for line in quantized_backends.describe("cpu")
    )
    kernels.set_enabled(True)  # the hand-written kernel needs no torch int4 operation
    if kernels.kernel_available():
        assert QuantizedWeight(parts, make_scheme("int4", 32), 64, CPU).backend.kernel == "int4"


# One table of backends per device and scheme, CUDA included (asked, not run: no GPU here).


def test_backend_table_per_device_and_scheme(monkeypatch):
    monkeypatch.setattr(quantized_backends, "_warned", set())
    cuda_int4 = quantized_backends.choose("cuda", "int4", 4096)
    assert cuda_int4.op == "aten._weight_int4pack_mm" and cuda_int4.max_rows is None
    assert "aten._convert_weight_to_int4pack" in cuda_int4.packing
    cuda_int8 = quantized_backends.choose("cuda", "int8", 4096)
    assert cuda_int8.op == "aten._weight_int8pack_mm" and not cuda_int8.dequantizes
    for rows in (1, 512):  # no whole-weight dequantization per call on a GPU, at any row count
        for backend in (cuda_int4, cuda_int8):
            assert quantized_backends.uses_op(backend, rows, torch.float16, "cuda")
    cpu_int8 = quantized_backends.choose("cpu", "int8", 4096)
    assert cpu_int8.op == "aten._weight_int8pack_mm"
    if kernels.kernel_available():  # the hand-written kernels first, for decode-sized calls
        assert cpu_int8.kernel == "int8" and quantized_backends.uses_kernel(cpu_int8, kernels.MAX_ROWS)
        assert not quantized_backends.uses_kernel(cpu_int8, kernels.MAX_ROWS + 1)
        cpu_int4 = quantized_backends.choose("cpu", "int4", 4096)
        assert cpu_int4.kernel == "int4" and cpu_int4.int4_layout == "kernel" and cpu_int4.op is None
    assert [entry.name for entry in quantized_backends.TABLE[("cpu", "int4")]] == [
        "codellama-int4-cpu",
        "torch-int4pack-cpu",
    ]
    assert quantized_backends.uses_op(cpu_int8, 64, torch.float32, "cpu")
    assert not quantized_backends.uses_op(cpu_int8, 65, torch.float32, "cpu")
    assert quantized_backends.choose("cpu", "int8", 4096, torch_ops=False) is quantized_backends.DEQUANTIZE
    with pytest.warns(RuntimeWarning, match="multiple of 32 inputs"):
        assert quantized_backends.choose("cuda", "int4", 48) is quantized_backends.DEQUANTIZE
    with pytest.warns(RuntimeWarning, match="no weight-only int4 operator for mps"):
        assert quantized_backends.choose("mps", "int4", 4096) is quantized_backends.DEQUANTIZE


def test_cuda_int4_packing_input_is_the_stored_codes_with_the_even_input_high():
    values = torch.randint(0, 16, (8, 64), generator=torch.Generator().manual_seed(9), dtype=torch.uint8)
    stored = int4_pack.pack_plain(values)
    assert torch.equal(int4_pack.unpack_plain(stored), values)
    swapped = int4_pack.cuda_codes(stored)
    assert torch.equal(swapped >> 4, values[:, 0::2]) and torch.equal(swapped & 0x0F, values[:, 1::2])
    assert [int4_pack.cuda_inner_k_tiles(k) for k in (4096, 192, 96, 48)] == [8, 4, 2, None]


# The memory plan counts the weights as they are loaded.


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_memory_plan_counts_the_loaded_quantized_weights(quantized_dirs, tokenizer_path, name):
    generator = Llama.build(
        str(quantized_dirs[name]), str(tokenizer_path), max_seq_len=32, max_batch_size=1, dtype="float32"
    )
    model = generator.model
    assert isinstance(model.output.weight, QuantizedWeight)  # the output layer is quantized too
    loaded = sum(p.numel() * p.element_size() for p in model.parameters())
    loaded += sum(
        b.numel() * b.element_size()
        for m in model.modules()
        if isinstance(m, QuantizedWeight)
        for b in m.buffers()
    )
    params = json.loads((quantized_dirs[name] / "params.json").read_text())
    settings = memory_plan.Settings(
        ModelArgs(**params), dtype=torch.float32, quantization=name, group_size=32
    )
    assert memory_plan.weight_bytes(settings) == loaded
