"""llama.cpp as a peer engine of the benchmarks, through the `llama-cpp-python` package.

The benchmark's Meta checkpoint is written as a GGUF file with the `gguf` package (bf16), then
quantized to q8_0 / q4_0 with llama.cpp's own quantizer (`llama_cpp.llama_model_quantize`,
its default recipe for that file type). Generation drives llama.cpp's C API (`llama_decode`
on token batches, greedy argmax over the returned logits), so several prompts decode together
as one batch of sequences, as they do in the other engines.

Both packages are optional (`pip install -e .[bench]`); `missing()` says what is absent.
"""

import ctypes
import json
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from llama.model import ModelArgs

# GGUF file types of the variants: bf16 is written here, the others are quantized from it.
KINDS = ("bf16", "q8_0", "q4_0")
# Code Llama's training context: llama.cpp only warns when a context is longer.
TRAINED_CONTEXT = 16384


def missing() -> Optional[str]:
    """Why llama.cpp cannot run here (a message naming the missing packages), or None."""
    absent = []
    for module, package in (("llama_cpp", "llama-cpp-python"), ("gguf", "gguf")):
        try:
            __import__(module)
        except ImportError:
            absent.append(package)
    if not absent:
        return None
    return f"{' and '.join(absent)} not installed (pip install -e .[bench])"


def gguf_path(ckpt: Path, kind: str) -> Path:
    """Where the GGUF file of variant `kind` of the checkpoint in `ckpt` is cached."""
    if kind not in KINDS:
        raise ValueError(f"unknown llama.cpp variant {kind!r}; use one of {', '.join(KINDS)}")
    return ckpt / f"llama.cpp-{kind}.gguf"


def ensure_gguf(ckpt: Path, kind: str) -> Path:
    """The GGUF file of variant `kind` of the Meta checkpoint in `ckpt`, written once.

    A file older than the checkpoint's shard is rewritten. Raises ValueError for an unknown
    variant and RuntimeError when llama.cpp's quantizer fails.
    """
    path = gguf_path(ckpt, kind)
    shard = ckpt / "consolidated.00.pth"
    if path.exists() and path.stat().st_mtime >= shard.stat().st_mtime:
        return path
    print(f"writing {path} ...", file=sys.stderr)
    if kind == "bf16":
        write_gguf(ckpt, path)
    else:
        quantize_gguf(ensure_gguf(ckpt, "bf16"), path, kind)
    return path


def gguf_state_dict(sd: Dict[str, torch.Tensor], n_layers: int) -> Dict[str, torch.Tensor]:
    """Meta tensor names to GGUF llama names, in the order the file stores them.

    wq/wk keep Meta's row order: llama.cpp's llama architecture rotates adjacent pairs
    (2i, 2i+1) of each head ("normal" RoPE), as Meta's code does. (Converters from Hugging Face
    checkpoints permute q/k back from the rotate-half order to this one.)
    """
    import gguf

    def name(tensor: "gguf.MODEL_TENSOR", layer: Optional[int] = None) -> str:
        base = gguf.TENSOR_NAMES[tensor]
        return (base if layer is None else base.format(bid=layer)) + ".weight"

    T = gguf.MODEL_TENSOR
    out = {name(T.TOKEN_EMBD): sd["tok_embeddings.weight"]}
    for i in range(n_layers):
        m = f"layers.{i}."
        out[name(T.ATTN_NORM, i)] = sd[m + "attention_norm.weight"]
        out[name(T.ATTN_Q, i)] = sd[m + "attention.wq.weight"]
        out[name(T.ATTN_K, i)] = sd[m + "attention.wk.weight"]
        out[name(T.ATTN_V, i)] = sd[m + "attention.wv.weight"]
        out[name(T.ATTN_OUT, i)] = sd[m + "attention.wo.weight"]
        out[name(T.FFN_NORM, i)] = sd[m + "ffn_norm.weight"]
        out[name(T.FFN_GATE, i)] = sd[m + "feed_forward.w1.weight"]
        out[name(T.FFN_UP, i)] = sd[m + "feed_forward.w3.weight"]
        out[name(T.FFN_DOWN, i)] = sd[m + "feed_forward.w2.weight"]
    out[name(T.OUTPUT_NORM)] = sd["norm.weight"]
    out[name(T.OUTPUT)] = sd["output.weight"]
    return out


def write_gguf(ckpt: Path, path: Path) -> None:
    """Write the bf16 Meta checkpoint in `ckpt` (params.json, one shard, tokenizer.model) as a
    GGUF llama model at `path`: matrices bf16, norm weights f32, the SentencePiece vocabulary
    with its scores and piece types. Raises ValueError for a checkpoint of several shards."""
    import gguf
    from sentencepiece import sentencepiece_model_pb2

    args = ModelArgs(**json.loads((ckpt / "params.json").read_text()))
    shards = sorted(ckpt.glob("consolidated.*.pth"))
    if len(shards) != 1:
        raise ValueError(f"{ckpt}: expected one checkpoint shard, found {len(shards)}")
    sd = torch.load(shards[0], map_location="cpu", mmap=True, weights_only=True)
    vocab = sentencepiece_model_pb2.ModelProto.FromString((ckpt / "tokenizer.model").read_bytes())
    pieces = vocab.pieces
    if len(pieces) != args.vocab_size:
        raise ValueError(f"{ckpt}: tokenizer has {len(pieces)} pieces, the model {args.vocab_size}")
    special = {vocab.trainer_spec.bos_id, vocab.trainer_spec.eos_id, vocab.trainer_spec.unk_id}
    if min(special) < 0:
        raise ValueError(f"{ckpt}: the tokenizer lacks a BOS, EOS or UNK piece")

    tmp = path.with_name(path.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_name(ckpt.name)
    writer.add_vocab_size(args.vocab_size)
    writer.add_context_length(TRAINED_CONTEXT)
    writer.add_embedding_length(args.dim)
    writer.add_block_count(args.n_layers)
    writer.add_feed_forward_length(args.ffn_hidden_dim)
    writer.add_head_count(args.n_heads)
    writer.add_head_count_kv(args.kv_heads)
    writer.add_rope_dimension_count(args.head_dim)
    writer.add_rope_freq_base(args.rope_theta)
    writer.add_layer_norm_rms_eps(args.norm_eps)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_BF16)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    # SentencePiece's piece types are numbered as GGUF's token types (normal 1 ... byte 6).
    writer.add_tokenizer_model("llama")
    writer.add_token_list([p.piece.encode("utf-8") for p in pieces])
    writer.add_token_scores([p.score for p in pieces])
    writer.add_token_types([int(p.type) for p in pieces])
    writer.add_bos_token_id(vocab.trainer_spec.bos_id)
    writer.add_eos_token_id(vocab.trainer_spec.eos_id)
    writer.add_unk_token_id(vocab.trainer_spec.unk_id)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    for tensor_name, tensor in gguf_state_dict(sd, args.n_layers).items():
        if tensor.dim() == 1:
            writer.add_tensor(tensor_name, tensor.float().numpy())
        elif tensor.dtype == torch.bfloat16:
            # numpy has no bf16: hand over the raw 16-bit words, typed as BF16 in the file.
            bits = tensor.contiguous().view(torch.int16).numpy()
            writer.add_tensor(tensor_name, bits, raw_dtype=gguf.GGMLQuantizationType.BF16)
        else:
            raise ValueError(f"{tensor_name}: expected a bf16 checkpoint, found {tensor.dtype}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.rename(path)


def quantize_gguf(source: Path, path: Path, kind: str, threads: Optional[int] = None) -> None:
    """Quantize the GGUF model `source` to `kind` (q8_0 or q4_0) at `path` with llama.cpp's
    quantizer and its default recipe for that file type. Raises RuntimeError on failure."""
    import llama_cpp

    ftypes = {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0}
    if kind not in ftypes:
        raise ValueError(f"cannot quantize to {kind!r}; use one of {', '.join(ftypes)}")
    backend()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftypes[kind]
    params.nthread = threads or os.cpu_count() or 1
    tmp = path.with_name(path.name + ".tmp")
    if llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {source} to {kind}")
    tmp.rename(path)


_BACKEND: List[object] = []


def backend() -> None:
    """Initialise llama.cpp once per process, its log silenced (it reports every load)."""
    if _BACKEND:
        return
    import llama_cpp

    @llama_cpp.llama_log_callback
    def quiet(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        pass

    llama_cpp.llama_log_set(quiet, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()
    _BACKEND.append(quiet)  # the callback must outlive every call into the library


class LlamaCppModel:
    """A GGUF model in one llama.cpp context holding `max_batch` sequences of `max_seq_len`
    tokens each, with flash attention, `threads` threads for prefill and decode."""

    def __init__(self, path: Path, max_seq_len: int, max_batch: int, threads: int, n_batch: int = 2048):
        import llama_cpp

        backend()
        self.lib = llama_cpp
        self.max_seq_len, self.max_batch, self.n_batch = max_seq_len, max_batch, n_batch
        mparams = llama_cpp.llama_model_default_params()
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = max_seq_len * max_batch
        cparams.n_seq_max = max_batch
        cparams.n_batch = n_batch
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        cparams.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        cparams.no_perf = True
        self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            llama_cpp.llama_model_free(self.model)
            raise RuntimeError(f"llama.cpp could not create a context for {path}")
        if llama_cpp.llama_n_ctx(self.ctx) < cparams.n_ctx:
            raise RuntimeError(
                f"llama.cpp gave {llama_cpp.llama_n_ctx(self.ctx)} context slots, asked {cparams.n_ctx}"
            )
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self.first_token_at = 0.0

    def close(self) -> None:
        """Free the batch, the context and the model (the object is unusable afterwards)."""
        if getattr(self, "ctx", None):
            self.lib.llama_batch_free(self.batch)
            self.lib.llama_free(self.ctx)
            self.lib.llama_model_free(self.model)
            self.ctx = None

    def __del__(self) -> None:
        self.close()

    def _decode(self, items: List[tuple]) -> List[int]:
        """Run (token, position, sequence, wants_logits) items through the model in batches of
        at most n_batch; returns the greedy next token of each item that wants logits, in order."""
        out = []
        for start in range(0, len(items), self.n_batch):
            chunk = items[start : start + self.n_batch]
            b = self.batch
            for i, (token, pos, seq, logits) in enumerate(chunk):
                b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, logits
                b.seq_id[i][0] = seq
            b.n_tokens = len(chunk)
            status = self.lib.llama_decode(self.ctx, b)
            if status != 0:
                raise RuntimeError(f"llama_decode failed with status {status}")
            for i, item in enumerate(chunk):
                if item[3]:
                    row = self.lib.llama_get_logits_ith(self.ctx, i)
                    out.append(int(np.ctypeslib.as_array(row, shape=(self.n_vocab,)).argmax()))
        return out

    def generate(self, prompts: List[List[int]], new_tokens: int) -> List[List[int]]:
        """Greedy: exactly `new_tokens` tokens after each prompt, all prompts decoded as one batch
        of sequences; the KV cache starts empty (a cold prefill). `first_token_at` is then the
        `time.perf_counter()` at which the first tokens were known. Raises ValueError when the
        prompts do not fit the context."""
        if len(prompts) > self.max_batch:
            raise ValueError(f"{len(prompts)} prompts, the context holds {self.max_batch}")
        longest = max(len(p) for p in prompts) + new_tokens
        if longest > self.max_seq_len:
            raise ValueError(f"prompt + generation of {longest} tokens exceeds {self.max_seq_len}")
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)
        items = [
            (token, pos, seq, pos == len(prompt) - 1)
            for seq, prompt in enumerate(prompts)
            for pos, token in enumerate(prompt)
        ]
        nxt = self._decode(items)
        self.first_token_at = time.perf_counter()
        out = [[t] for t in nxt]
        for step in range(1, new_tokens):
            items = [(nxt[s], len(p) + step - 1, s, True) for s, p in enumerate(prompts)]
            nxt = self._decode(items)
            for row, token in zip(out, nxt):
                row.append(token)
        return out
