"""Llama.build: one test per bad input (each must name the problem and the fix), the load summary,
repeated builds, the dtype keyword, and peak memory of loading a shard."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

from llama import Llama, distributed
from llama.model import ModelArgs
from tests.tiny import random_state_dict, tiny_params, write_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def vocab(tokenizer_path) -> int:
    return spm.SentencePieceProcessor(model_file=str(tokenizer_path)).vocab_size()


@pytest.fixture(scope="module")
def good_sd(vocab):
    return random_state_dict(ModelArgs(**tiny_params(vocab)), seed=1)


def build(ckpt_dir, tokenizer_path, **kwargs) -> Llama:
    options = dict(max_seq_len=32, max_batch_size=2, dtype="float32")
    options.update(kwargs)
    return Llama.build(str(ckpt_dir), str(tokenizer_path), **options)


def greedy(generator: Llama):
    return generator.generate([[1, 5, 9, 14]], max_gen_len=6, temperature=0.0, logprobs=True)


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def test_missing_directory(tmp_path, tokenizer_path):
    missing = tmp_path / "CodeLlama-7b"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing)) + ".*does not exist"):
        build(missing, tokenizer_path)


def test_no_pth_files(tmp_path, tokenizer_path, vocab):
    (tmp_path / "params.json").write_text(json.dumps(tiny_params(vocab)))
    with pytest.raises(FileNotFoundError, match=r"no \*\.pth checkpoint files.*consolidated\.00\.pth"):
        build(tmp_path, tokenizer_path)


def test_missing_params_json(tmp_path, tokenizer_path, vocab, good_sd):
    write_checkpoint(tmp_path, tiny_params(vocab), good_sd)
    (tmp_path / "params.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"params\.json is missing"):
        build(tmp_path, tokenizer_path)


@pytest.mark.parametrize(
    "content, message",
    [
        ("{ not json", r"params\.json is not valid JSON"),
        ("[1, 2]", r"params\.json must hold a JSON object"),
        (json.dumps({"dim": 64, "n_layers": 2}), r"lacks the required fields \['n_heads'\]"),
        (
            json.dumps({"dim": 64, "n_layers": 2, "n_heads": 4, "n_experts": 8}),
            r"unknown fields \['n_experts'\]",
        ),
        (json.dumps({"dim": 64, "n_layers": 2, "n_heads": 0}), r"n_heads must be a positive integer, got 0"),
        (json.dumps({"dim": "64", "n_layers": 2, "n_heads": 4}), r"dim must be a positive integer, got '64'"),
        (
            json.dumps({"dim": 64, "n_layers": 2, "n_heads": 4, "rope_theta": -1}),
            r"rope_theta must be a positive",
        ),
    ],
)
def test_invalid_params_json(tmp_path, tokenizer_path, vocab, good_sd, content, message):
    write_checkpoint(tmp_path, tiny_params(vocab), good_sd)
    (tmp_path / "params.json").write_text(content)
    with pytest.raises(ValueError, match=message):
        build(tmp_path, tokenizer_path)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_unreadable_shard_is_named(tmp_path, tokenizer_path, vocab, good_sd, damage):
    write_checkpoint(tmp_path, tiny_params(vocab), good_sd)
    shard = tmp_path / "consolidated.00.pth"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2] if damage == "truncate" else os.urandom(len(data)))
    with pytest.raises(ValueError, match=re.escape(str(shard)) + r".*truncated or corrupt.*md5sum"):
        build(tmp_path, tokenizer_path)


def test_shard_holding_something_else_is_named(tmp_path, tokenizer_path, vocab, good_sd):
    write_checkpoint(tmp_path, tiny_params(vocab), good_sd)
    shard = tmp_path / "consolidated.00.pth"
    torch.save([torch.zeros(2)], shard)
    with pytest.raises(ValueError, match=re.escape(str(shard)) + r" does not hold a state dict"):
        build(tmp_path, tokenizer_path)


def test_shard_count_differs_from_world_size_is_resharded(tmp_path, tokenizer_path, vocab, good_sd):
    """Once an error, now resharded on load: a 2-shard checkpoint runs in one process and
    computes what the 1-shard one does."""
    write_checkpoint(tmp_path / "mp2", tiny_params(vocab), good_sd, mp=2)
    write_checkpoint(tmp_path / "mp1", tiny_params(vocab), good_sd, mp=1)
    assert greedy(build(tmp_path / "mp2", tokenizer_path)) == greedy(build(tmp_path / "mp1", tokenizer_path))


def test_missing_tokenizer(tmp_path, tokenizer_path, vocab, good_sd):
    write_checkpoint(tmp_path, tiny_params(vocab), good_sd)
    with pytest.raises(FileNotFoundError, match=r"tokenizer file .*tokenizer\.model.* not found"):
        build(tmp_path, tmp_path / "tokenizer.model")


def test_tokenizer_vocab_differs_from_checkpoint(tmp_path, tokenizer_path, vocab):
    params = tiny_params(vocab + 16)
    write_checkpoint(tmp_path, params, random_state_dict(ModelArgs(**params)))
    with pytest.raises(ValueError, match=rf"has {vocab} pieces but .*vocab_size={vocab + 16}"):
        build(tmp_path, tokenizer_path)


@pytest.mark.parametrize("heads, kv_heads, dim", [(3, 3, 48), (4, 1, 64)])
def test_heads_not_divisible_by_model_parallel_size(
    tmp_path, tokenizer_path, vocab, monkeypatch, heads, kv_heads, dim
):
    """A single process pretends to be rank 0 of 2 (tests/test_parallel.py checks this under a
    real two-process group)."""
    params = tiny_params(vocab, dim=dim, n_heads=heads, n_kv_heads=kv_heads)
    write_checkpoint(tmp_path, params, random_state_dict(ModelArgs(**params)), mp=1)
    monkeypatch.setattr(distributed, "init_model_parallel", lambda size=None: (0, 2))
    name, count = ("n_heads", heads) if heads % 2 else ("n_kv_heads", kv_heads)
    with pytest.raises(ValueError, match=rf"{name}={count} is not divisible by the model-parallel size 2"):
        build(tmp_path, tokenizer_path)


# ---------------------------------------------------------------------------------------------
# State dict contents
# ---------------------------------------------------------------------------------------------


def test_missing_keys_are_named(tmp_path, tokenizer_path, vocab, good_sd):
    sd = {k: v for k, v in good_sd.items() if k not in ("layers.1.ffn_norm.weight", "output.weight")}
    write_checkpoint(tmp_path, tiny_params(vocab), sd)
    with pytest.raises(ValueError, match=r"missing keys layers\.1\.ffn_norm\.weight, output\.weight"):
        build(tmp_path, tokenizer_path)


def test_unexpected_keys_are_named(tmp_path, tokenizer_path, vocab, good_sd):
    sd = dict(good_sd, **{"layers.2.attention.wq.weight": torch.zeros(64, 64)})
    write_checkpoint(tmp_path, tiny_params(vocab), sd)
    with pytest.raises(ValueError, match=r"unexpected keys layers\.2\.attention\.wq\.weight"):
        build(tmp_path, tokenizer_path)


def test_wrong_shapes_are_named(tmp_path, tokenizer_path, vocab, good_sd):
    sd = dict(good_sd)
    sd["layers.0.feed_forward.w1.weight"] = sd["layers.0.feed_forward.w1.weight"].T.contiguous()
    write_checkpoint(tmp_path, tiny_params(vocab), sd)
    hidden = ModelArgs(**tiny_params(vocab)).ffn_hidden_dim
    with pytest.raises(
        ValueError,
        match=rf"wrong shapes layers\.0\.feed_forward\.w1\.weight "
        rf"\(64, {hidden}\) \(expected \({hidden}, 64\)\)",
    ):
        build(tmp_path, tokenizer_path)


def test_many_problems_list_the_first_few(tmp_path, tokenizer_path, vocab, good_sd):
    sd = {k: v for k, v in good_sd.items() if not k.startswith("layers.1.")}
    write_checkpoint(tmp_path, tiny_params(vocab), sd)
    with pytest.raises(
        ValueError, match=r"missing keys (layers\.1\.[\w.]+, ){4}layers\.1\.[\w.]+ and 4 more"
    ):
        build(tmp_path, tokenizer_path)


def test_rope_freqs_is_ignored(tmp_path, tokenizer_path, vocab, good_sd):
    """Both with and without `rope.freqs` the checkpoint loads and computes the same."""
    write_checkpoint(tmp_path / "with", tiny_params(vocab), good_sd, with_rope_freqs=True)
    write_checkpoint(tmp_path / "without", tiny_params(vocab), good_sd, with_rope_freqs=False)
    assert "rope.freqs" in torch.load(tmp_path / "with" / "consolidated.00.pth", weights_only=True)
    assert greedy(build(tmp_path / "with", tokenizer_path)) == greedy(
        build(tmp_path / "without", tokenizer_path)
    )


# ---------------------------------------------------------------------------------------------
# Sizes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["max_seq_len", "max_batch_size"])
@pytest.mark.parametrize("value", [0, -3])
def test_sizes_below_one(checkpoint_dir, tokenizer_path, name, value):
    with pytest.raises(ValueError, match=rf"{name} must be a positive integer, got {value}"):
        build(checkpoint_dir, tokenizer_path, **{name: value})


def test_kv_cache_that_does_not_fit(checkpoint_dir, tokenizer_path):
    args = ModelArgs(**json.loads((checkpoint_dir / "params.json").read_text()))
    batch, seq = 4096, 1_000_000
    needed_gib = 2 * args.n_layers * args.n_kv_heads * args.head_dim * batch * seq * 4 / 2**30
    with pytest.raises(
        ValueError, match=rf"on cpu \(weights .*KV cache {needed_gib:.1f} GiB .* is free: lower max_seq_len"
    ):
        build(checkpoint_dir, tokenizer_path, max_seq_len=seq, max_batch_size=batch)


# ---------------------------------------------------------------------------------------------
# Successful builds
# ---------------------------------------------------------------------------------------------


def test_load_summary_is_one_line(checkpoint_dir, tokenizer_path, capsys):
    build(checkpoint_dir, tokenizer_path)  # model parallelism may print its setup the first time
    capsys.readouterr()
    generator = build(checkpoint_dir, tokenizer_path)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1, lines
    n_params = sum(p.numel() for p in generator.model.parameters())
    assert re.fullmatch(
        rf"Loaded {n_params / 1e6:.2f}M-parameter model from {re.escape(str(checkpoint_dir))} "
        r"\(MP=1, float32, cpu\) in \d+\.\d\d s",
        lines[0],
    ), lines[0]


def test_build_twice_in_one_process(checkpoint_dir, tokenizer_path):
    first = build(checkpoint_dir, tokenizer_path)
    before = greedy(first)
    second = build(checkpoint_dir, tokenizer_path, max_seq_len=48, max_batch_size=1)
    # Same weights, own cache; the first model is untouched by the second build. (Log-probs to
    # fp32 rounding: a repeated prompt reuses its cached prefix, computed in another shape.)
    for after in (greedy(second), greedy(first)):
        assert after[0] == before[0]
        assert after[1][0] == pytest.approx(before[1][0], abs=1e-6)
    assert (
        first.model.layers[0].attention.cache_k.data_ptr()
        != second.model.layers[0].attention.cache_k.data_ptr()
    )


def test_build_seeds_sampling(checkpoint_dir, tokenizer_path):
    """build(seed=...) fixes the sampled tokens (what keeps model-parallel ranks in step)."""

    def sampled(seed):
        generator = build(checkpoint_dir, tokenizer_path, seed=seed)
        return generator.generate([[1, 5, 9, 14]] * 2, max_gen_len=16, temperature=1.0, top_p=1.0)[0]

    assert sampled(3) == sampled(3)
    assert sampled(3) != sampled(4)


@pytest.mark.parametrize(
    "name, dtype", [("float32", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16)]
)
def test_dtype_keyword(checkpoint_dir, tokenizer_path, name, dtype):
    generator = build(checkpoint_dir, tokenizer_path, dtype=name)
    assert {p.dtype for p in generator.model.parameters()} == {dtype}
    assert generator.model.layers[0].attention.cache_k.dtype == dtype
    with torch.inference_mode():
        assert generator.model(torch.tensor([[1, 5, 9]]), 0).dtype == torch.float32  # logits always fp32
    tokens, logprobs = greedy(generator)
    assert len(tokens[0]) > 0 and all(lp <= 0 for lp in logprobs[0])
    reference_tokens, _ = greedy(build(checkpoint_dir, tokenizer_path, dtype="float32"))
    # Low precision changes the numbers, not the model: the first greedy token agrees.
    assert tokens[0][0] == reference_tokens[0][0]


def test_dtype_keyword_rejects_unknown_names(checkpoint_dir, tokenizer_path):
    with pytest.raises(ValueError, match=r"unknown dtype 'int8'; use one of float32, bfloat16, float16"):
        build(checkpoint_dir, tokenizer_path, dtype="int8")


def test_default_dtype(checkpoint_dir, tokenizer_path, monkeypatch):
    generator = build(checkpoint_dir, tokenizer_path, dtype=None)
    cpu = torch.device("cpu")
    expected = torch.bfloat16 if distributed.bf16_supported(cpu) else torch.float32
    assert {p.dtype for p in generator.model.parameters()} == {expected}
    # bf16 wherever supported; otherwise fp16 on GPU and fp32 on CPU.
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(distributed, "bf16_supported", lambda device: True)
    assert distributed.resolve_dtype(None, cpu) == distributed.resolve_dtype(None, gpu) == torch.bfloat16
    monkeypatch.setattr(distributed, "bf16_supported", lambda device: False)
    assert distributed.resolve_dtype(None, cpu) == torch.float32
    assert distributed.resolve_dtype(None, gpu) == torch.float16
    assert distributed.resolve_dtype("float16", cpu) == torch.float16
    assert distributed.resolve_dtype(torch.bfloat16, cpu) == torch.bfloat16
    with pytest.raises(ValueError, match="unsupported dtype torch.int8"):
        distributed.resolve_dtype(torch.int8, cpu)


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------

_MEASURE_RSS = """
import json, sys
import torch
torch.set_num_threads(1)
from llama import Llama

def status_bytes(field):
    # VmHWM is this program's own peak: ru_maxrss would also count the forking parent's memory.
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

baseline = status_bytes("VmRSS")
generator = Llama.build(sys.argv[1], sys.argv[2], max_seq_len=64, max_batch_size=1, dtype="bfloat16")
generator.generate([[1, 5, 9]], max_gen_len=2, temperature=0.0)  # reads every weight
print(json.dumps({"baseline": baseline, "peak": status_bytes("VmHWM"), "resident": status_bytes("VmRSS")}))
"""


def test_peak_memory_holds_one_copy_of_the_shard(tmp_path, tokenizer_path, vocab):
    """Loading a ~100 MB bf16 shard raises peak RSS by about one shard, not two."""
    params = tiny_params(vocab, dim=768, n_layers=8, n_heads=12, n_kv_heads=4, multiple_of=256)
    write_checkpoint(tmp_path, params, random_state_dict(ModelArgs(**params)), dtype=torch.bfloat16)
    shard_bytes = (tmp_path / "consolidated.00.pth").stat().st_size
    assert shard_bytes > 90 * 2**20
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", _MEASURE_RSS, str(tmp_path), str(tokenizer_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    usage = json.loads(proc.stdout.strip().splitlines()[-1])
    grown, held = usage["peak"] - usage["baseline"], usage["resident"] - usage["baseline"]
    mib = 2**20
    # The weights really are in memory (the forward pass touched them)...
    assert (
        held > 0.8 * shard_bytes
    ), f"only {held / mib:.0f} MiB resident for a {shard_bytes / mib:.0f} MiB shard"
    # ...once: a second copy would take the peak past 2x the shard (the KV cache here is < 1 MiB).
    assert (
        grown < 1.5 * shard_bytes
    ), f"peak grew {grown / mib:.0f} MiB for a {shard_bytes / mib:.0f} MiB shard"
