"""Weight-only int8/int4 quantization: the stored numbers, both ways of multiplying by them, quantized
checkpoints (written, sharded, loaded under torchrun MP=2) and the errors for bad input."""

import json
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

from llama import Llama, checkpoint, kernels, quantization
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
def test_linear_matches_fp64_reference_and_torch_ops_agree(mode, group_size, rows):
    """The plain path (dequantize, F.linear) against an fp64 product with the weights the parts
    stand for; torch's weight-only kernels (bf16 activations) against the plain path. 48 output
    rows are not a multiple of torch's 32-row int4 blocks, so the padding is exercised."""
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(48, 192, generator=gen)
    scheme = make_scheme(mode, group_size)
    parts = quantization.quantize(weight, scheme)
    x = torch.randn(2, rows, 192, generator=gen)
    expected = x.double() @ reference_weight(parts, mode, group_size).T
    plain = QuantizedWeight(parts, scheme, 192, CPU, torch_ops=False)
    torch.testing.assert_close(plain.linear(x).double(), expected, rtol=1e-5, atol=1e-4)
    fast = QuantizedWeight(parts, scheme, 192, CPU, torch_ops=True)
    assert fast.torch_int4 == (mode == "int4")
    # bf16 activations and outputs: within a percent of the outputs' scale.
    assert (fast.linear(x) - plain.linear(x)).abs().max() <= 0.01 * plain.linear(x).abs().max()
    for name, tensor in parts.items():  # torch's int4 packing reads back the stored parts exactly
        assert torch.equal(fast.parts()[name], tensor), name


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
