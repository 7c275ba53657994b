"""Tiny SentencePiece models and random Meta-format checkpoints, made in temporary folders."""

import hashlib
import json
import os
import sysconfig
from pathlib import Path
from typing import Dict, List, Optional

import sentencepiece as spm
import torch

from llama.model import ModelArgs

INFILL_PIECES = ["▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>"]

# A small fixed slice of the standard library's source: on every machine that runs Python.
_CORPUS_MODULES = ["argparse.py", "json/decoder.py", "textwrap.py", "functools.py", "string.py"]


def corpus_text() -> str:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return "\n".join((stdlib / name).read_text(encoding="utf-8") for name in _CORPUS_MODULES)


def train_tokenizer(
    out_dir: Path, vocab_size: int = 600, special_pieces: Optional[List[str]] = None, name: str = "tokenizer"
) -> Path:
    """Train a BPE SentencePiece model laid out like Llama's (unk=0, bos=1, eos=2, no pad,
    byte fallback, identity normalisation) with `special_pieces` as user-defined symbols."""
    out_dir.mkdir(parents=True, exist_ok=True)
    corpus = out_dir / f"{name}_corpus.txt"
    corpus.write_text(corpus_text(), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(out_dir / name),
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        user_defined_symbols=list(INFILL_PIECES if special_pieces is None else special_pieces),
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        max_sentence_length=1 << 20,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
        num_threads=1,
    )
    return out_dir / f"{name}.model"


# Tensors fairscale splits, and along which dim; everything else is replicated.
SPLIT_DIM = {
    "tok_embeddings.weight": 1,
    "attention.wq.weight": 0,
    "attention.wk.weight": 0,
    "attention.wv.weight": 0,
    "attention.wo.weight": 1,
    "feed_forward.w1.weight": 0,
    "feed_forward.w3.weight": 0,
    "feed_forward.w2.weight": 1,
    "output.weight": 0,
}


def split_dim(key: str) -> Optional[int]:
    for suffix, dim in SPLIT_DIM.items():
        if key == suffix or key.endswith("." + suffix):
            return dim
    return None


def random_state_dict(args: ModelArgs, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Full (unsharded) fp32 weights with a scale that keeps activations and logits tame."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=None):
        scale = scale if scale is not None else shape[-1] ** -0.5
        return torch.randn(*shape, generator=g) * scale

    hd, hidden = args.head_dim, args.ffn_hidden_dim
    sd = {"tok_embeddings.weight": rand(args.vocab_size, args.dim, scale=1.0)}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        sd[p + "attention.wq.weight"] = rand(args.n_heads * hd, args.dim)
        sd[p + "attention.wk.weight"] = rand(args.kv_heads * hd, args.dim)
        sd[p + "attention.wv.weight"] = rand(args.kv_heads * hd, args.dim)
        sd[p + "attention.wo.weight"] = rand(args.dim, args.n_heads * hd)
        sd[p + "feed_forward.w1.weight"] = rand(hidden, args.dim)
        sd[p + "feed_forward.w2.weight"] = rand(args.dim, hidden)
        sd[p + "feed_forward.w3.weight"] = rand(hidden, args.dim)
        sd[p + "attention_norm.weight"] = 1 + 0.1 * rand(args.dim, scale=1.0)
        sd[p + "ffn_norm.weight"] = 1 + 0.1 * rand(args.dim, scale=1.0)
    sd["norm.weight"] = 1 + 0.1 * rand(args.dim, scale=1.0)
    sd["output.weight"] = rand(args.vocab_size, args.dim, scale=2 * args.dim**-0.5)
    return sd


def shard_state_dict(sd: Dict[str, torch.Tensor], mp: int) -> List[Dict[str, torch.Tensor]]:
    """Split a full state dict into `mp` fairscale shards, contiguously, as the released checkpoints are."""
    shards: List[Dict[str, torch.Tensor]] = [{} for _ in range(mp)]
    for key, tensor in sd.items():
        dim = split_dim(key)
        for rank in range(mp):
            if dim is None:
                shards[rank][key] = tensor.clone()
            else:
                size = tensor.shape[dim] // mp
                shards[rank][key] = tensor.narrow(dim, rank * size, size).clone()
    return shards


def write_checkpoint(
    ckpt_dir: Path,
    params: dict,
    sd: Dict[str, torch.Tensor],
    mp: int = 1,
    dtype: torch.dtype = torch.float32,
    with_rope_freqs: bool = True,
) -> Path:
    """Write params.json, consolidated.NN.pth (sharded for `mp`) and checklist.chk."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    (ckpt_dir / "params.json").write_text(json.dumps(params))
    for rank, shard in enumerate(shard_state_dict(sd, mp)):
        shard = {k: v.to(dtype) for k, v in shard.items()}
        if with_rope_freqs:
            shard["rope.freqs"] = torch.zeros(params["dim"] // params["n_heads"] // 2)
        torch.save(shard, ckpt_dir / f"consolidated.{rank:02d}.pth")
    lines = []
    for name in sorted(os.listdir(ckpt_dir)):
        if name != "checklist.chk":
            digest = hashlib.md5((ckpt_dir / name).read_bytes()).hexdigest()
            lines.append(f"{digest}  {name}\n")
    (ckpt_dir / "checklist.chk").write_text("".join(lines))
    return ckpt_dir


def tiny_params(vocab_size: int, **overrides) -> dict:
    """params.json of a tiny GQA model with Code Llama's rope_theta."""
    params = dict(
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=vocab_size,
        multiple_of=32,
        ffn_dim_multiplier=None,
        norm_eps=1e-5,
        rope_theta=1e6,
    )
    params.update(overrides)
    return params


def make_checkpoint(ckpt_dir: Path, vocab_size: int, mp: int = 1, seed: int = 0, **overrides) -> Path:
    params = tiny_params(vocab_size, **overrides)
    return write_checkpoint(ckpt_dir, params, random_state_dict(ModelArgs(**params), seed), mp=mp)
