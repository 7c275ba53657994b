"""`python -m llama.convert` between the Meta and Hugging Face layouts, and loading Hugging Face
folders directly with `Llama.build`."""

import json
import re

import pytest
import torch
from safetensors import safe_open

import llama.convert
from llama import Llama
from llama.convert import from_hf, main, parse_size, to_hf
from llama.model import ModelArgs
from tests.layouts import assert_same_outputs, probe, write_layouts
from tests.tiny import shard_state_dict


@pytest.fixture(scope="module")
def layouts(tmp_path_factory, tokenizer_path):
    return write_layouts(tmp_path_factory.mktemp("convert_layouts"), tokenizer_path, mps=(1, 2))


@pytest.fixture(scope="module")
def reference(layouts, tokenizer_path):
    _, _, dirs = layouts
    return probe(Llama.build(str(dirs[1]), str(tokenizer_path), 32, 2, dtype="float32"))


def read_hf_tensors(folder):
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            tensors.update({name: handle.get_tensor(name) for name in handle.keys()})
    return tensors


def test_hf_layout_names_permutation_and_config(layouts, tmp_path):
    params, full, dirs = layouts
    out = to_hf(str(dirs[2]), tmp_path / "hf", progress=False)
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "special_tokens_map.json",
        "tokenizer.model",
        "tokenizer_config.json",
    ]
    tensors = read_hf_tensors(out)
    assert len(tensors) == len(full) and all(t.dtype == torch.float32 for t in tensors.values())

    head_dim = params["dim"] // params["n_heads"]
    per_head = torch.tensor(
        list(range(0, head_dim, 2)) + list(range(1, head_dim, 2))
    )  # Hugging Face's per-head row order

    def hf_rows(weight, heads):
        return torch.cat([weight[h * head_dim + per_head] for h in range(heads)])

    layer = "model.layers.1."
    assert torch.equal(
        tensors[layer + "self_attn.q_proj.weight"], hf_rows(full["layers.1.attention.wq.weight"], 8)
    )
    assert torch.equal(
        tensors[layer + "self_attn.k_proj.weight"], hf_rows(full["layers.1.attention.wk.weight"], 4)
    )
    assert torch.equal(tensors[layer + "self_attn.v_proj.weight"], full["layers.1.attention.wv.weight"])
    assert torch.equal(tensors[layer + "mlp.gate_proj.weight"], full["layers.1.feed_forward.w1.weight"])
    assert torch.equal(tensors[layer + "post_attention_layernorm.weight"], full["layers.1.ffn_norm.weight"])
    assert torch.equal(tensors["model.embed_tokens.weight"], full["tok_embeddings.weight"])
    assert torch.equal(tensors["lm_head.weight"], full["output.weight"])

    config = json.loads((out / "config.json").read_text())
    expected = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 64,
        "intermediate_size": ModelArgs(**params).ffn_hidden_dim,
        "num_hidden_layers": 2,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "vocab_size": params["vocab_size"],
        "rms_norm_eps": params["norm_eps"],
        "rope_theta": 1e6,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }
    assert {key: config[key] for key in expected} == expected
    assert config["max_position_embeddings"] == 16384


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_meta_to_hf_to_meta_is_bit_exact(tmp_path, tokenizer_path, dtype):
    params, _, dirs = write_layouts(tmp_path / "src", tokenizer_path, mps=(1, 2), dtype=dtype)
    for mp in (1, 2):
        hf = to_hf(str(dirs[mp]), tmp_path / f"hf{mp}", max_shard_size="150KB", progress=False)
        assert (hf / "model.safetensors.index.json").is_file() and len(list(hf.glob("*.safetensors"))) > 1
        back = from_hf(str(hf), tmp_path / f"back{mp}", mp, progress=False)
        for rank in range(mp):
            name = f"consolidated.{rank:02d}.pth"
            original = torch.load(dirs[mp] / name, weights_only=True)
            original.pop("rope.freqs")
            converted = torch.load(back / name, weights_only=True)
            assert sorted(converted) == sorted(original)
            for key, tensor in original.items():
                assert converted[key].dtype == dtype
                assert torch.equal(converted[key], tensor), f"MP={mp} rank {rank} {key}"
        back_params = json.loads((back / "params.json").read_text())
        assert ModelArgs(**back_params).ffn_hidden_dim == ModelArgs(**params).ffn_hidden_dim
        unchanged = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "norm_eps", "rope_theta")
        assert {k: back_params[k] for k in unchanged} == {k: params[k] for k in unchanged}
        assert (back / "tokenizer.model").read_bytes() == tokenizer_path.read_bytes()
        assert (back / "checklist.chk").is_file()


def test_index_maps_every_tensor_to_its_file(layouts, tmp_path):
    _, full, dirs = layouts
    out = to_hf(str(dirs[1]), tmp_path / "hf", max_shard_size="100KB", progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(index["weight_map"]) == len(full)
    for name, filename in index["weight_map"].items():
        with safe_open(str(out / filename), framework="pt") as handle:
            assert name in handle.keys()
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in full.values())
    assert all((out / f).stat().st_size < 100_000 + 70_000 for f in set(index["weight_map"].values()))


def test_transformers_loads_the_output_with_the_same_logits(layouts, tmp_path, reference):
    from transformers import LlamaForCausalLM

    _, _, dirs = layouts
    out = to_hf(str(dirs[2]), tmp_path / "hf", progress=False)
    model = LlamaForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    from tests.layouts import PROBE_SEQUENCE

    with torch.no_grad():
        logits = model(torch.tensor([PROBE_SEQUENCE])).logits[0]
    difference = (logits - reference["logits"]).abs().max().item()
    assert difference <= 1e-4


def test_build_loads_hugging_face_folders(layouts, tokenizer_path, tmp_path, reference):
    _, _, dirs = layouts
    single = to_hf(str(dirs[1]), tmp_path / "single", progress=False)
    sharded = to_hf(str(dirs[2]), tmp_path / "sharded", max_shard_size="100KB", progress=False)
    for folder in (single, sharded):
        generator = Llama.build(str(folder), str(tokenizer_path), 32, 2, dtype="float32")
        assert_same_outputs(probe(generator), reference, f"Hugging Face folder {folder.name}")


def test_from_hf_splits_for_any_mp_and_checks_shapes(layouts, tmp_path):
    _, full, dirs = layouts
    hf = to_hf(str(dirs[1]), tmp_path / "hf", progress=False)
    out = from_hf(str(hf), tmp_path / "mp4", 4, progress=False)
    for rank, want in enumerate(shard_state_dict(full, 4)):
        shard = torch.load(out / f"consolidated.{rank:02d}.pth", weights_only=True)
        assert all(torch.equal(shard[key], want[key]) for key in want)
    config = json.loads((hf / "config.json").read_text())
    config["intermediate_size"] = 256  # disagrees with the weights
    (hf / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"feed_forward.w1.weight \(192, 64\) \(expected \(256, 64\)\)"):
        from_hf(str(hf), tmp_path / "bad", 1, progress=False)


def test_from_hf_names_tensors_that_cannot_be_split(tmp_path, tokenizer_path):
    # multiple_of=2 gives an FFN hidden size of 170, which 4 ranks cannot split.
    _, _, dirs = write_layouts(tmp_path / "src", tokenizer_path, mps=(1,), multiple_of=2)
    hf = to_hf(str(dirs[1]), tmp_path / "hf", progress=False)
    with pytest.raises(ValueError) as err:
        from_hf(str(hf), tmp_path / "bad", 4, progress=False)
    assert re.search(
        r"tensor layers\.\d\.feed_forward\.w[123]\.weight of shape \((170, 64|64, 170)\) into 4",
        str(err.value),
    )
    assert not (tmp_path / "bad").exists()


def test_refusals_and_interrupted_writes(layouts, tmp_path, monkeypatch, capsys):
    _, _, dirs = layouts
    out = tmp_path / "hf"
    out.mkdir()
    (out / "README.md").write_text("mine")
    assert main(["to-hf", "--ckpt_dir", str(dirs[1]), "--out_dir", str(out)]) == 1
    assert "--force" in capsys.readouterr().err
    assert main(["from-hf", "--hf_dir", str(dirs[1]), "--out_dir", str(tmp_path / "x")]) == 1
    assert "config.json" in capsys.readouterr().err

    real_save = llama.convert.save_file
    calls = []

    def failing_save(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(llama.convert, "save_file", failing_save)
    with pytest.raises(KeyboardInterrupt):
        to_hf(str(dirs[1]), out, force=True, max_shard_size="100KB", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    assert [p.name for p in out.iterdir()] == ["README.md"]  # the old contents survive


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("500mb") == 500 * 10**6
    assert parse_size(1234) == 1234
    with pytest.raises(ValueError, match="5 gigs"):
        parse_size("5 gigs")


def test_help_lists_both_directions(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    usage = capsys.readouterr().out
    assert "to-hf" in usage and "from-hf" in usage
    with pytest.raises(SystemExit):
        main(["to-hf", "--help"])
    assert "--max_shard_size" in capsys.readouterr().out


def test_a_hugging_face_folder_without_safetensors_is_named(tmp_path, tokenizer_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="only safetensors"):
        Llama.build(str(tmp_path), str(tokenizer_path), 32, 2)


def test_bad_max_position_embeddings_is_refused(layouts, tmp_path):
    _, _, dirs = layouts
    with pytest.raises(ValueError, match="max_position_embeddings"):
        to_hf(str(dirs[1]), tmp_path / "hf", max_position_embeddings=0, progress=False)
    assert not (tmp_path / "hf").exists()
