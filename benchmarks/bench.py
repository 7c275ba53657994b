"""Speed and memory of this engine next to Hugging Face transformers, on this machine.

Creates (or reuses, in a cache folder) random-weight Meta checkpoints, then measures the
engines in one run, alternating them case by case, and reports medians:

- decode tokens/s at batch 1 and 4 (prompt 128, greedy), prefill tokens/s of a 512-token
  prompt and its time to first token, an uneven batch (prompts 16, 64, 256, 512) end to end;
- load time and peak RSS, each engine in a fresh process;
- the machine's memory-read bandwidth and bf16 matmul throughput, and each result as a
  percentage of the bound they imply (the best bandwidth seen in the run); and, as the machine's
  speed drifts, batch-1 decode as a share of the read rate measured right before and after it
  (median of the rounds);
- with `--context`, prefill and decode tokens/s at batch 1 after prompts of the given lengths.

Engines: this one (bf16, compiled, over a paged cache, int8/int4), Hugging Face transformers, and llama.cpp
through `llama-cpp-python` on a GGUF conversion of the same checkpoint (bf16, and q8_0/q4_0
quantized by llama.cpp; see `llama_cpp_peer.py`), skipped with a message when not installed.

Writes a markdown table (default `benchmarks/RESULTS.md`). Needs the `bench` extra
(`pip install -e .[bench]`: transformers, psutil, llama-cpp-python, gguf, protobuf). Run
`python benchmarks/bench.py --help`.
"""

import argparse
import datetime
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import llama_cpp_peer  # noqa: E402
import torch  # noqa: E402

from llama import kernel_report  # noqa: E402
from llama.model import ModelArgs  # noqa: E402

VOCAB = 32016
EOS_ID = 2

# Geometries: TinyLlama-1.1B (the size the targets are stated for) and a small one for quick runs.
MODELS: Dict[str, dict] = {
    "tinyllama": dict(
        dim=2048,
        n_layers=22,
        n_heads=32,
        n_kv_heads=4,
        vocab_size=VOCAB,
        multiple_of=256,
        ffn_dim_multiplier=None,
        norm_eps=1e-5,
        rope_theta=1e6,
    ),
    "small": dict(
        dim=512,
        n_layers=8,
        n_heads=8,
        n_kv_heads=2,
        vocab_size=VOCAB,
        multiple_of=256,
        ffn_dim_multiplier=None,
        norm_eps=1e-5,
        rope_theta=1e6,
    ),
}
EXPECTED_FFN = {"tinyllama": 5632}

CASES = ("decode1", "decode4", "prefill", "uneven", "load")
UNEVEN_LENGTHS = (16, 64, 256, 512)
PREFILL_LEN = 512
DECODE_PROMPT = 128
MAX_SEQ_LEN = 1024
MAX_BATCH = 4


# ---------------------------------------------------------------------------------------------
# Checkpoint and tokenizer


def ensure_checkpoint(cache_dir: Path, model: str) -> Path:
    """A random bf16 Meta checkpoint of geometry `model` in `cache_dir/model` (made once)."""
    ckpt = cache_dir / model
    params = MODELS[model]
    if (ckpt / "consolidated.00.pth").exists() and (ckpt / "params.json").exists():
        if json.loads((ckpt / "params.json").read_text()) == params:
            ensure_tokenizer(ckpt)
            return ckpt
    ckpt.mkdir(parents=True, exist_ok=True)
    args = ModelArgs(**params)
    if model in EXPECTED_FFN and args.ffn_hidden_dim != EXPECTED_FFN[model]:
        raise ValueError(f"{model}: FFN size {args.ffn_hidden_dim} != {EXPECTED_FFN[model]}")
    print(f"creating a random {model} checkpoint in {ckpt} ...", file=sys.stderr)
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int, scale: Optional[float] = None) -> torch.Tensor:
        scale = shape[-1] ** -0.5 if scale is None else scale
        return (torch.randn(*shape, generator=gen) * scale).to(torch.bfloat16)

    hd, hidden, dim = args.head_dim, args.ffn_hidden_dim, args.dim
    sd = {"tok_embeddings.weight": rand(VOCAB, dim, scale=1.0)}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        sd[p + "attention.wq.weight"] = rand(args.n_heads * hd, dim)
        sd[p + "attention.wk.weight"] = rand(args.kv_heads * hd, dim)
        sd[p + "attention.wv.weight"] = rand(args.kv_heads * hd, dim)
        sd[p + "attention.wo.weight"] = rand(dim, args.n_heads * hd)
        sd[p + "feed_forward.w1.weight"] = rand(hidden, dim)
        sd[p + "feed_forward.w2.weight"] = rand(dim, hidden)
        sd[p + "feed_forward.w3.weight"] = rand(hidden, dim)
        sd[p + "attention_norm.weight"] = torch.ones(dim, dtype=torch.bfloat16)
        sd[p + "ffn_norm.weight"] = torch.ones(dim, dtype=torch.bfloat16)
    sd["norm.weight"] = torch.ones(dim, dtype=torch.bfloat16)
    output = rand(VOCAB, dim, scale=2 * dim**-0.5)
    output[EOS_ID] = 0  # EOS never wins the argmax: every run generates exactly the tokens asked for
    sd["output.weight"] = output
    tmp = ckpt / "consolidated.00.pth.tmp"
    torch.save(sd, tmp)
    tmp.rename(ckpt / "consolidated.00.pth")
    (ckpt / "params.json").write_text(json.dumps(params))
    ensure_tokenizer(ckpt)
    return ckpt


def ensure_tokenizer(ckpt: Path) -> Path:
    """A SentencePiece model with exactly VOCAB pieces (a few real ones, the rest placeholders).

    Generation works on token ids; the tokenizer only has to exist with the checkpoint's size.
    """
    path = ckpt / "tokenizer.model"
    if path.exists():
        return path
    import sentencepiece as spm

    corpus = ckpt / "corpus.txt"
    corpus.write_text(Path(__file__).read_text(encoding="utf-8"), encoding="utf-8")
    n_real = 400
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(ckpt / "tokenizer"),
        vocab_size=VOCAB,
        model_type="bpe",
        byte_fallback=True,
        user_defined_symbols=[f"<extra_{i}>" for i in range(VOCAB - 3 - 256 - n_real)],
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        hard_vocab_limit=False,
        minloglevel=2,
        num_threads=1,
    )
    size = spm.SentencePieceProcessor(model_file=str(path)).vocab_size()
    if size != VOCAB:
        path.unlink()
        raise RuntimeError(f"benchmark tokenizer has {size} pieces, expected {VOCAB}")
    return path


# ---------------------------------------------------------------------------------------------
# Engines


class Engine:
    """Greedy generation of exactly `new_tokens` tokens per prompt."""

    name = ""

    def generate(self, prompts: List[List[int]], new_tokens: int) -> List[List[int]]:
        raise NotImplementedError

    def timed_generate(self, prompt: List[int], new_tokens: int) -> Tuple[float, float]:
        """Greedy generation of `new_tokens` tokens after one prompt, prefilled cold; returns the
        seconds from the call to the first generated token and to the last one."""
        raise NotImplementedError


class CodeLlamaEngine(Engine):
    """This engine on the bf16 weights, or (`quantize`) on int8/int4 weights quantized while loading,
    then with the device's default activation dtype (fp32 on CPUs without bf16 instructions); with
    `kv_cache_tokens`, over a paged KV cache of that many positions."""

    def __init__(
        self,
        ckpt: Path,
        name: str = "codellama",
        compile: bool = False,
        quantize: Optional[str] = None,
        max_seq_len: int = MAX_SEQ_LEN,
        max_batch: int = MAX_BATCH,
        kv_cache_tokens: Optional[int] = None,
    ):
        from llama import Llama

        self.name = name
        kwargs = {"compile": True} if compile else {}
        if kv_cache_tokens is not None:
            kwargs["kv_cache_tokens"] = kv_cache_tokens
        if quantize is not None:
            kwargs.update(quantize=quantize, dtype=None)
        else:
            kwargs["dtype"] = "bfloat16"
        self.llama = Llama.build(str(ckpt), str(ckpt / "tokenizer.model"), max_seq_len, max_batch, **kwargs)

    def generate(self, prompts: List[List[int]], new_tokens: int) -> List[List[int]]:
        # Every call prefills cold, as in the other engines: the engine would otherwise reuse the
        # keys and values of a prompt it has just seen (every case runs its prompts twice).
        self.llama.engine.forget_prefixes()
        tokens, _ = self.llama.generate(prompts, max_gen_len=new_tokens, temperature=0.0)
        return tokens

    def timed_generate(self, prompt: List[int], new_tokens: int) -> Tuple[float, float]:
        from llama.sampling import SamplingParams

        self.llama.engine.forget_prefixes()
        start, first, count = time.perf_counter(), None, 0
        greedy = SamplingParams(temperature=0.0)
        for event in self.llama.engine.submit(prompt, max_tokens=new_tokens, sampling=greedy):
            count += len(event.token_ids)
            if first is None and count:
                first = time.perf_counter()
        if count != new_tokens or first is None:
            raise RuntimeError(f"{self.name} generated {count} tokens, expected {new_tokens}")
        return first - start, time.perf_counter() - start


def meta_to_hf_state_dict(sd: Dict[str, torch.Tensor], args: ModelArgs) -> Dict[str, torch.Tensor]:
    """Rename Meta keys to Hugging Face Llama keys; wq/wk rows go to the rotate-half layout."""

    def permute(w: torch.Tensor, heads: int) -> torch.Tensor:
        rows, cols = w.shape
        return w.view(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)

    out = {
        "model.embed_tokens.weight": sd["tok_embeddings.weight"],
        "model.norm.weight": sd["norm.weight"],
        "lm_head.weight": sd["output.weight"],
    }
    for i in range(args.n_layers):
        m, h = f"layers.{i}.", f"model.layers.{i}."
        out[h + "self_attn.q_proj.weight"] = permute(sd[m + "attention.wq.weight"], args.n_heads)
        out[h + "self_attn.k_proj.weight"] = permute(sd[m + "attention.wk.weight"], args.kv_heads)
        out[h + "self_attn.v_proj.weight"] = sd[m + "attention.wv.weight"]
        out[h + "self_attn.o_proj.weight"] = sd[m + "attention.wo.weight"]
        out[h + "mlp.gate_proj.weight"] = sd[m + "feed_forward.w1.weight"]
        out[h + "mlp.up_proj.weight"] = sd[m + "feed_forward.w3.weight"]
        out[h + "mlp.down_proj.weight"] = sd[m + "feed_forward.w2.weight"]
        out[h + "input_layernorm.weight"] = sd[m + "attention_norm.weight"]
        out[h + "post_attention_layernorm.weight"] = sd[m + "ffn_norm.weight"]
    return out


class TransformersEngine(Engine):
    """Hugging Face transformers' Llama on the same weights, in bf16 (`transformers`) or fp32
    (`transformers-fp32`: what it runs fastest in on a CPU without bf16 instructions)."""

    def __init__(self, ckpt: Path, max_seq_len: int = MAX_SEQ_LEN, dtype: torch.dtype = torch.bfloat16):
        from transformers import LlamaConfig, LlamaForCausalLM

        self.name = "transformers" if dtype == torch.bfloat16 else "transformers-fp32"

        params = json.loads((ckpt / "params.json").read_text())
        args = ModelArgs(**params)
        config = LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=args.dim,
            intermediate_size=args.ffn_hidden_dim,
            num_hidden_layers=args.n_layers,
            num_attention_heads=args.n_heads,
            num_key_value_heads=args.kv_heads,
            rms_norm_eps=args.norm_eps,
            rope_theta=args.rope_theta,
            max_position_embeddings=max_seq_len,
            tie_word_embeddings=False,
            bos_token_id=1,
            eos_token_id=EOS_ID,
            pad_token_id=0,
            attn_implementation="sdpa",
            dtype=dtype,
        )
        sd = torch.load(ckpt / "consolidated.00.pth", map_location="cpu", mmap=True, weights_only=True)
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
        model.load_state_dict(meta_to_hf_state_dict(sd, args), strict=False, assign=True)
        # Buffers (rotary inverse frequencies) are not in the state dict: recompute them on the CPU.
        with torch.device("cpu"):
            model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
        self.model = model.to(dtype).eval()
        self.model.generation_config.pad_token_id = 0

    def generate(self, prompts: List[List[int]], new_tokens: int) -> List[List[int]]:
        return self.run(prompts, new_tokens)

    def timed_generate(self, prompt: List[int], new_tokens: int) -> Tuple[float, float]:
        class FirstToken:  # generate's streamer: called with the prompt, then with each new token
            calls, at = 0, 0.0

            def put(self, value: torch.Tensor) -> None:
                self.calls += 1
                if self.calls == 2:
                    self.at = time.perf_counter()

            def end(self) -> None:
                pass

        clock = FirstToken()
        start = time.perf_counter()
        out = self.run([prompt], new_tokens, streamer=clock)
        total = time.perf_counter() - start
        if len(out[0]) != new_tokens or clock.calls < 2:
            raise RuntimeError(f"{self.name} generated {len(out[0])} tokens, expected {new_tokens}")
        return clock.at - start, total

    @torch.inference_mode()
    def run(
        self, prompts: List[List[int]], new_tokens: int, streamer: Optional[object] = None
    ) -> List[List[int]]:
        """Greedy generation through `generate`, left-padded, with an optional streamer."""
        longest = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), longest, dtype=torch.long)
        mask = torch.zeros(len(prompts), longest, dtype=torch.long)
        for row, prompt in enumerate(prompts):  # left padding, as generate expects
            ids[row, longest - len(prompt) :] = torch.tensor(prompt)
            mask[row, longest - len(prompt) :] = 1
        out = self.model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=EOS_ID,
            pad_token_id=0,
            streamer=streamer,
        )
        return out[:, longest:].tolist()


class LlamaCppEngine(Engine):
    """llama.cpp (the `llama-cpp-python` package) on a GGUF conversion of the checkpoint: bf16, or
    quantized by llama.cpp to q8_0 / q4_0; flash attention on, torch's thread count."""

    def __init__(self, ckpt: Path, kind: str, max_seq_len: int = MAX_SEQ_LEN, max_batch: int = MAX_BATCH):
        self.name = LLAMA_CPP if kind == "bf16" else f"{LLAMA_CPP}-{kind}"
        path = llama_cpp_peer.ensure_gguf(ckpt, kind)
        self.model = llama_cpp_peer.LlamaCppModel(path, max_seq_len, max_batch, torch.get_num_threads())

    def generate(self, prompts: List[List[int]], new_tokens: int) -> List[List[int]]:
        return self.model.generate(prompts, new_tokens)

    def timed_generate(self, prompt: List[int], new_tokens: int) -> Tuple[float, float]:
        start = time.perf_counter()
        out = self.model.generate([prompt], new_tokens)
        total = time.perf_counter() - start
        if len(out[0]) != new_tokens:
            raise RuntimeError(f"{self.name} generated {len(out[0])} tokens, expected {new_tokens}")
        return self.model.first_token_at - start, total


LLAMA_CPP = "llama.cpp"
ENGINES = (
    "codellama",
    "codellama-compile",
    "codellama-paged",
    "codellama-int8",
    "codellama-int4",
    "transformers",
    "transformers-fp32",
    LLAMA_CPP,
    f"{LLAMA_CPP}-q8_0",
    f"{LLAMA_CPP}-q4_0",
)
# Engines the report compares the first codellama engine with, one ratio column each.
PEERS = ("transformers", "transformers-fp32", LLAMA_CPP)


def llama_cpp_kind(name: str) -> Optional[str]:
    """The GGUF variant of a llama.cpp engine name (bf16 for plain `llama.cpp`), else None."""
    if name == LLAMA_CPP:
        return "bf16"
    return name.removeprefix(f"{LLAMA_CPP}-") if name.startswith(f"{LLAMA_CPP}-") else None


def make_engine(name: str, ckpt: Path, max_seq_len: int = MAX_SEQ_LEN, max_batch: int = MAX_BATCH) -> Engine:
    """The engine called `name` (one of ENGINES) on the checkpoint in `ckpt`, with KV room for
    `max_batch` sequences of `max_seq_len` tokens. Raises ValueError for an unknown name."""
    if name not in ENGINES:
        raise ValueError(f"unknown engine {name!r}; use one of {', '.join(ENGINES)}")
    if name in ("transformers", "transformers-fp32"):
        return TransformersEngine(
            ckpt, max_seq_len, torch.bfloat16 if name == "transformers" else torch.float32
        )
    kind = llama_cpp_kind(name)
    if kind is not None:
        return LlamaCppEngine(ckpt, kind, max_seq_len, max_batch)
    compile = name == "codellama-compile"
    quantize = name.removeprefix("codellama-") if name.startswith("codellama-int") else None
    # A paged cache of half the dense positions (at least one max_seq_len request).
    pool = max_seq_len * max(1, max_batch // 2) if name == "codellama-paged" else None
    return CodeLlamaEngine(ckpt, name, compile, quantize, max_seq_len, max_batch, kv_cache_tokens=pool)


# ---------------------------------------------------------------------------------------------
# Machine bounds


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def memory_read_bandwidth(repeats: int) -> float:
    """Bytes/s of summing a 1 GiB fp32 tensor (best of `repeats`): a plain streaming read."""
    x = torch.ones(2**28, dtype=torch.float32)
    x.sum()
    best = min(timed(x.sum) for _ in range(max(3, repeats)))
    return x.numel() * 4 / best


def bf16_matmul_flops(repeats: int, dim: int) -> float:
    """FLOP/s of a prefill-shaped bf16 matmul (512 x dim times dim x 4 dim, best of `repeats`)."""
    a = torch.randn(PREFILL_LEN, dim).to(torch.bfloat16)
    w = torch.randn(4 * dim, dim).to(torch.bfloat16)
    torch.nn.functional.linear(a, w)
    best = min(timed(lambda: torch.nn.functional.linear(a, w)) for _ in range(max(3, repeats)))
    return 2 * PREFILL_LEN * dim * 4 * dim / best


@dataclass
class Workload:
    """What one token costs on this model: bytes read while decoding, FLOPs while prefilling."""

    args: ModelArgs

    @property
    def matmul_params(self) -> int:
        a = self.args
        per_layer = a.dim * a.head_dim * (2 * a.n_heads + 2 * a.kv_heads) + 3 * a.dim * a.ffn_hidden_dim
        return a.n_layers * per_layer + a.vocab_size * a.dim

    def decode_bytes(self, batch: int, context: int) -> int:
        """Bytes read for one decode step: every matmul weight once, plus each row's KV cache."""
        a = self.args
        kv = 2 * a.n_layers * a.kv_heads * a.head_dim * context * 2
        return 2 * self.matmul_params + batch * kv

    def prefill_flops(self, tokens: int) -> int:
        return 2 * self.matmul_params * tokens


# ---------------------------------------------------------------------------------------------
# Measurements


def random_prompts(lengths: Sequence[int], seed: int) -> List[List[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(3, VOCAB, (n - 1,), generator=gen).tolist() for n in lengths]


def run_case(engine: Engine, prompts: List[List[int]], new_tokens: int) -> float:
    start = time.perf_counter()
    out = engine.generate(prompts, new_tokens)
    elapsed = time.perf_counter() - start
    lengths = [len(t) for t in out]
    if lengths != [new_tokens] * len(prompts):
        raise RuntimeError(f"{engine.name} generated {lengths} tokens, expected {new_tokens} per prompt")
    return elapsed


def measure_contexts(
    names: Sequence[str], ckpt: Path, lengths: Sequence[int], new_tokens: int, repeats: int
) -> Dict[int, Dict[str, Dict[str, float]]]:
    """Prefill and decode tokens/s at long contexts: for each length, the engines are built with
    room for one sequence of that length plus `new_tokens`, then each round generates
    `new_tokens` tokens after a prompt of that length (cold prefill), engines alternating.
    Prefill is timed to the first generated token and decode from there to the last, within the
    same call (at long contexts the prefill dwarfs the decode, so the difference of two calls
    would be mostly noise). Returns the medians as
    {length: {engine: {"prefill": tok/s, "decode": tok/s}}}."""
    out: Dict[int, Dict[str, Dict[str, float]]] = {}
    for length in lengths:
        live = [make_engine(name, ckpt, max_seq_len=length + new_tokens, max_batch=1) for name in names]
        for engine in live:  # warm-up on a short prompt: the long one is what is measured
            run_case(engine, random_prompts([min(length, DECODE_PROMPT)], 1), 4)
        samples: Dict[str, Dict[str, List[float]]] = {e.name: {"prefill": [], "decode": []} for e in live}
        for round_index in range(repeats):
            prompt = random_prompts([length], round_index)[0]
            for engine in live if round_index % 2 == 0 else live[::-1]:
                first, total = engine.timed_generate(prompt, new_tokens)
                prefill, decode = length / first, (new_tokens - 1) / max(total - first, 1e-9)
                samples[engine.name]["prefill"].append(prefill)
                samples[engine.name]["decode"].append(decode)
                print(
                    f"context {length} round {round_index} {engine.name} prefill {prefill:.1f} "
                    f"decode {decode:.2f}",
                    file=sys.stderr,
                )
        out[length] = {e: {k: statistics.median(v) for k, v in s.items()} for e, s in samples.items()}
        del live
        gc.collect()
    return out


def measure_round(engine: Engine, cases: Sequence[str], new_tokens: int, seed: int) -> Dict[str, float]:
    """One timing of every in-process case for one engine."""
    r: Dict[str, float] = {}
    if "decode1" in cases or "decode4" in cases:
        for batch in (1, 4):
            if f"decode{batch}" not in cases:
                continue
            prompts = random_prompts([DECODE_PROMPT] * batch, seed)
            first = run_case(engine, prompts, 1)
            read_before = memory_read_bandwidth(1) if batch == 1 else None
            total = run_case(engine, prompts, new_tokens)
            r[f"decode{batch}"] = batch * (new_tokens - 1) / max(total - first, 1e-9)
            if read_before is not None:
                # Tokens per byte the machine read per second right before and after: times the
                # bytes of a step, the share of the read rate of that moment (the machine drifts).
                beside = (read_before + memory_read_bandwidth(1)) / 2
                r["decode1_per_read"] = r["decode1"] / beside
    if "prefill" in cases:
        ttft = run_case(engine, random_prompts([PREFILL_LEN], seed), 1)
        r["ttft"] = ttft
        r["prefill"] = PREFILL_LEN / ttft
    if "uneven" in cases:
        # The longest prompt alone runs before and after the batch, so a drift of the machine's
        # speed during the round moves both sides of the ratio alike.
        longest = random_prompts([max(UNEVEN_LENGTHS)], seed)
        before = run_case(engine, longest, new_tokens)
        r["uneven"] = run_case(engine, random_prompts(UNEVEN_LENGTHS, seed), new_tokens)
        r["longest"] = (before + run_case(engine, longest, new_tokens)) / 2
        r["uneven_ratio"] = r["uneven"] / r["longest"]
    return r


def measure_cases(
    names: Sequence[str],
    ckpt: Path,
    cases: Sequence[str],
    new_tokens: int,
    repeats: int,
    bandwidth: float,
    flops: float,
) -> Tuple[Dict[str, Dict[str, float]], Optional[str], float, float]:
    """The in-process cases: all engines loaded at once, warmed up, then `repeats` rounds with the
    engines alternating, the machine's bounds measured again after each round. Returns the median
    of each case per engine, the greedy agreement line, and the best bandwidth and matmul FLOP/s
    seen (starting from `bandwidth` and `flops`)."""
    live = [make_engine(name, ckpt) for name in names]
    for engine in live:  # warm-up: page in the weights, build kernels, compile every batch shape
        for lengths in ([DECODE_PROMPT], [DECODE_PROMPT] * MAX_BATCH, UNEVEN_LENGTHS):
            run_case(engine, random_prompts(lengths, 1), 4)
    agree = agreement(live, seed=1)
    dim = ModelArgs(**json.loads((ckpt / "params.json").read_text())).dim
    samples: Dict[str, Dict[str, List[float]]] = {e.name: {} for e in live}
    bw_samples, flop_samples = [bandwidth], [flops]
    for round_index in range(repeats):
        for engine in live if round_index % 2 == 0 else live[::-1]:
            for key, value in measure_round(engine, cases, new_tokens, seed=round_index).items():
                samples[engine.name].setdefault(key, []).append(value)
                print(f"round {round_index} {engine.name} {key} {value:.3f}", file=sys.stderr)
        bw_samples.append(memory_read_bandwidth(1))
        flop_samples.append(bf16_matmul_flops(1, dim))
        gc.collect()
    results = {e: {k: statistics.median(v) for k, v in s.items()} for e, s in samples.items()}
    return results, agree, max(bw_samples), max(flop_samples)


def agreement(engines: List[Engine], seed: int, n: int = 16) -> Optional[str]:
    """How many of the first `n` greedy tokens each engine shares with the first one, averaged
    over MAX_BATCH prompts (a check of the conversions), e.g. "transformers 12.5/16,
    llama.cpp 14.0/16"; None for a single engine.

    Random weights put many logits within rounding of each other, so engines that compute the
    same model part ways at near ties; a wrong conversion parts at the first tokens everywhere.
    """
    if len(engines) < 2:
        return None
    prompts = random_prompts([DECODE_PROMPT] * MAX_BATCH, seed)
    first, *others = [e.generate(prompts, n) for e in engines]

    def shared(a: List[int], b: List[int]) -> int:
        return next((i for i in range(n) if a[i] != b[i]), n)

    means = [statistics.mean(shared(a, b) for a, b in zip(first, out)) for out in others]
    return ", ".join(f"{e.name} {m:.1f}/{n}" for e, m in zip(engines[1:], means))


LOAD_CHILD = "--load-child"


def resident_tensor_bytes(model: torch.nn.Module) -> int:
    """Bytes of the distinct tensor storages a loaded model holds: its parameters and buffers as
    loaded (quantized codes, packings and scales included) and its KV cache, wherever a module
    keeps them (a tensor attribute, or an attribute object holding tensors)."""
    seen: Dict[Tuple[int, int], int] = {}

    def add(value: object, depth: int = 0) -> None:
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            seen[(storage.data_ptr(), storage.nbytes())] = storage.nbytes()
        elif isinstance(value, (list, tuple)):
            for item in value:
                add(item, depth)
        elif depth == 0 and hasattr(value, "__dict__") and not isinstance(value, (torch.nn.Module, type)):
            for item in vars(value).values():
                add(item, depth + 1)

    for module in model.modules():
        for value in list(module._parameters.values()) + list(module._buffers.values()):
            add(value)
        for name, value in vars(module).items():
            if not name.startswith("_"):
                add(value)
    return sum(seen.values())


def reset_peak_rss() -> None:
    """Start this process's peak RSS afresh (Linux: its high-water mark set to the RSS now). A child
    inherits its parent's high-water mark across exec (getrusage's ru_maxrss keeps it too), so
    without this a child of a large parent reports the parent's peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_bytes() -> int:
    """This process's peak RSS since `reset_peak_rss` (VmHWM; ru_maxrss where /proc is absent)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def load_child(engine: str, ckpt: Path, threads: int) -> None:
    """In a fresh process: time the load, then one short generation; print JSON to stdout."""
    reset_peak_rss()
    torch.set_num_threads(threads)
    shard = ckpt / "consolidated.00.pth"
    buf = bytearray(1 << 24)
    start = time.perf_counter()
    with open(shard, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
    read_s = time.perf_counter() - start
    import psutil

    import llama  # noqa: F401  (imported libraries are not part of the load)

    if engine.startswith("transformers"):
        import transformers  # noqa: F401
    if llama_cpp_kind(engine) is not None:
        import llama_cpp  # noqa: F401
    rss_before = psutil.Process().memory_info().rss
    start = time.perf_counter()
    eng = make_engine(engine, ckpt)
    load_s = time.perf_counter() - start
    rss_load = psutil.Process().memory_info().rss
    resident = resident_tensor_bytes(eng.llama.model) if isinstance(eng, CodeLlamaEngine) else None
    start = time.perf_counter()
    run_case(eng, random_prompts([DECODE_PROMPT], 0), 8)
    first_gen_s = time.perf_counter() - start
    peak = peak_rss_bytes()
    print(
        json.dumps(
            dict(
                read_s=read_s,
                load_s=load_s,
                first_gen_s=first_gen_s,
                rss_before_load=rss_before,
                rss_after_load=rss_load,
                peak_rss=peak,
                peak_rss_growth=peak - rss_before,
                resident_bytes=resident,
            )
        )
    )


def measure_load(engine: str, ckpt: Path, threads: int) -> Dict[str, float]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(REPO))
    cmd = [sys.executable, __file__, LOAD_CHILD, engine, str(ckpt), str(threads)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"load measurement of {engine} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# Report


def times_better(mine: Optional[float], peer: Optional[float], higher_better: bool) -> str:
    """How many times better `mine` is than `peer` ("1.20x"), or "-" when either is missing."""
    if mine is None or peer is None:
        return "-"
    return f"{(mine / peer if higher_better else peer / mine):.2f}x"


def fmt(value: Optional[float], digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def pct(value: Optional[float], bound: Optional[float]) -> str:
    return "-" if value is None or not bound else f"{100 * value / bound:.0f}%"


def machine() -> str:
    model, cores = platform.processor() or "unknown CPU", os.cpu_count()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        info = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        model = info.get("Model name", model).strip()
        flags = info.get("Flags", "")
        model += " (avx512_bf16)" if "avx512_bf16" in flags else ""
    except OSError:
        pass
    return f"{model}, {cores} cores"


def versions() -> str:
    parts = [f"Python {platform.python_version()}", f"torch {torch.__version__}"]
    try:
        import transformers

        parts.append(f"transformers {transformers.__version__}")
    except ImportError:
        pass
    try:
        import llama_cpp

        parts.append(f"llama-cpp-python {llama_cpp.__version__}")
    except ImportError:
        pass
    return ", ".join(parts)


def report(
    argv: List[str],
    opts: argparse.Namespace,
    engines: List[str],
    results: Dict[str, Dict[str, float]],
    loads: Dict[str, Dict[str, float]],
    bandwidth: float,
    flops: float,
    work: Workload,
    weight_bytes: int,
    kv_bytes: int,
    agree: Optional[str],
    contexts: Dict[int, Dict[str, Dict[str, float]]],
    skipped: Optional[str],
) -> str:
    """The markdown report of one run (see the module docstring for what each part measures)."""
    mine = next((e for e in engines if e.startswith("codellama")), engines[0])
    peers = [p for p in PEERS if p in engines and p != mine]
    new = opts.new_tokens
    avg_context = DECODE_PROMPT + new // 2
    bounds = {
        "decode1": bandwidth / work.decode_bytes(1, avg_context),
        "decode4": 4 * bandwidth / work.decode_bytes(4, avg_context),
        "prefill": flops / work.prefill_flops(1),
        "ttft": work.prefill_flops(PREFILL_LEN) / flops,
    }
    rows = [
        ("decode tok/s, batch 1 (prompt 128)", "decode1", 1, True),
        ("decode tok/s, batch 4 (prompt 128)", "decode4", 1, True),
        (f"prefill tok/s ({PREFILL_LEN}-token prompt)", "prefill", 0, True),
        (f"time to first token, {PREFILL_LEN}-token prompt (s)", "ttft", 2, False),
        ("uneven batch 16/64/256/512 end to end (s)", "uneven", 2, False),
        ("longest prompt (512) alone end to end (s), mean of before and after", "longest", 2, False),
        ("uneven batch / longest alone", "uneven_ratio", 2, False),
    ]
    header = ["case"] + engines + [f"{mine} / {p}" for p in peers] + ["bound"]
    header += [f"{e} % of bound" for e in engines]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, key, digits, higher_better in rows:
        values = [results.get(e, {}).get(key) for e in engines]
        if all(v is None for v in values):
            continue
        cells = [label] + [fmt(v, digits) for v in values]
        for peer in peers:
            theirs = results.get(peer, {}).get(key)
            cells.append(times_better(results.get(mine, {}).get(key), theirs, higher_better))
        bound = bounds.get(key)
        cells.append(fmt(bound, digits))
        if key == "ttft":
            cells += [pct(bound, v) for v in values]
        else:
            cells += [pct(v, bound) for v in values]
        lines.append("| " + " | ".join(cells) + " |")
    if any("decode1_per_read" in results.get(e, {}) for e in engines):
        step_bytes = work.decode_bytes(1, avg_context)
        shares = [results.get(e, {}).get("decode1_per_read") for e in engines]
        cells = ["decode batch 1: bf16 bytes per step x tok/s / memory read measured right before and after"]
        cells += [pct(v * step_bytes, 1) if v is not None else "-" for v in shares]
        cells += ["-"] * (len(peers) + 1 + len(engines))
        lines.append("| " + " | ".join(cells) + " |")
    if loads:
        gib = 2**30
        for label, key, scale, digits in (
            ("load time (s)", "load_s", 1, 2),
            ("load + first 8 tokens (s)", "first_gen_s", 1, 2),
            ("RSS after load (GiB)", "rss_after_load", gib, 2),
            ("peak RSS (GiB)", "peak_rss", gib, 2),
            ("peak RSS - RSS before load (GiB)", "peak_rss_growth", gib, 2),
        ):
            values = [loads[e][key] / scale if e in loads else None for e in engines]
            if key == "first_gen_s":
                values = [None if e not in loads else (loads[e]["load_s"] + loads[e][key]) for e in engines]
            cells = [label] + [fmt(v, digits) for v in values] + ["-"] * len(peers)
            if key == "load_s":
                read = min(v["read_s"] for v in loads.values())
                cells.append(f"read shard {read:.2f}")
                cells += [f"{v / read:.1f}x read" if v is not None else "-" for v in values]
            elif key in ("peak_rss", "rss_after_load", "peak_rss_growth"):
                bound = (weight_bytes + kv_bytes) / gib
                cells.append(f"bf16 weights+KV {bound:.2f}")
                cells += [pct(v, bound) if v is not None else "-" for v in values]
                lines.append("| " + " | ".join(cells) + " |")
                if key != "peak_rss_growth":
                    continue
                # Against what each of this engine's variants holds once loaded (quantized weights
                # as loaded, the KV cache as allocated).
                own = [(loads.get(e, {}).get("resident_bytes") or 0) / gib or None for e in engines]
                cells = ["own weights as loaded + KV cache (GiB); % = peak RSS growth / it"]
                cells += [fmt(b, digits) for b in own] + ["-"] * len(peers) + ["-"]
                cells += [pct(v, b) if v is not None and b else "-" for v, b in zip(values, own)]
            else:
                cells += ["-"] * (1 + len(engines))
            lines.append("| " + " | ".join(cells) + " |")

    out = [
        "# Benchmark results",
        "",
        f"- Command: `python benchmarks/bench.py {' '.join(argv)}`",
        f"- Machine: {machine()}; {versions()}",
        f"- Date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Model: random-weight `{opts.model}` geometry ({work.matmul_params / 1e9:.2f}B matmul "
        f"parameters), bf16, {opts.threads} threads; greedy; {new} new tokens per prompt; median of "
        f"{opts.repeats} rounds, engines alternating within each round.",
        f"- Measured bounds: memory read {bandwidth / 1e9:.1f} GB/s (1 GiB fp32 sum); bf16 matmul "
        f"{flops / 1e9:.0f} GFLOP/s ({PREFILL_LEN}x{work.args.dim} by {work.args.dim}x{4 * work.args.dim}). "
        f"Decode bound = bandwidth / (bf16 weight bytes + KV bytes at the mean context of "
        f"{avg_context}) per step; prefill bound = matmul throughput / (2 x matmul params) per token.",
    ]
    out += [
        "- What this machine runs (`python -m llama.kernels`):",
        "",
        "```",
        kernel_report.report(),
        "```",
        "",
    ]
    if agree:
        out.append(
            f"- Greedy agreement (leading tokens of 16 shared with `{engines[0]}`, mean over "
            f"{MAX_BATCH} prompts of {DECODE_PROMPT} tokens): {agree}."
        )
    if skipped:
        out.append(f"- Not measured: {skipped}.")
    out += ["", *lines, ""]
    if contexts:
        out += context_table(engines, contexts, opts.new_tokens)
    for engine in (e for e in engines if e.startswith("codellama")):
        peer = "transformers" if "transformers" in engines else None
        targets = target_lines(engine, peer, results, loads, weight_bytes + kv_bytes)
        if targets:
            out += [f"## Targets: `{engine}`", "", *targets, ""]
    return "\n".join(out)


def context_table(
    engines: List[str], contexts: Dict[int, Dict[str, Dict[str, float]]], new_tokens: int
) -> List[str]:
    """The long-context section of the report: prefill and decode tokens/s per context length."""
    mine = next((e for e in engines if e.startswith("codellama")), engines[0])
    peers = [p for p in PEERS if p in engines and p != mine]
    header = ["case"] + engines + [f"{mine} / {p}" for p in peers]
    lines = [
        "## Long context",
        "",
        f"Batch 1, one random prompt of each length, {new_tokens} tokens generated after it; prefill "
        "cold (empty KV cache) and timed to the first generated token, decode timed from there to the "
        "last in the same call; medians over the rounds.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for length, by_engine in contexts.items():
        for label, key in (
            (f"prefill tok/s, {length}-token prompt", "prefill"),
            (f"decode tok/s after a {length}-token prompt", "decode"),
        ):
            values = [by_engine.get(e, {}).get(key) for e in engines]
            cells = [label] + [fmt(v, 1) for v in values]
            cells += [times_better(by_engine[mine][key], by_engine.get(p, {}).get(key), True) for p in peers]
            lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def target_lines(
    mine: str,
    peer: Optional[str],
    results: Dict[str, Dict[str, float]],
    loads: Dict[str, Dict[str, float]],
    resident_bound: int,
) -> List[str]:
    """One line per target of the engine, with the measured number and whether it is met."""
    lines = []

    def check(label: str, met: bool, detail: str) -> None:
        lines.append(f"- {'met' if met else 'NOT met'}: {label} ({detail})")

    ours, theirs = results.get(mine, {}), results.get(peer, {}) if peer else {}
    if "decode1" in ours and "decode1" in theirs:
        ratio = ours["decode1"] / theirs["decode1"]
        check("decode at batch 1 >= 2x transformers", ratio >= 2, f"{ratio:.2f}x")
    higher = ("decode1", "decode4", "prefill")
    compared = [k for k in higher + ("uneven", "longest") if k in ours and k in theirs]
    if compared:
        slower = [k for k in compared if (ours[k] < theirs[k] if k in higher else ours[k] > theirs[k])]
        check("faster than transformers in every row", not slower, f"slower in: {slower or 'none'}")
    if "prefill" in ours and "prefill" in theirs:
        ratio = ours["prefill"] / theirs["prefill"]
        check(
            f"prefill of {PREFILL_LEN} tokens at least as fast as transformers", ratio >= 1, f"{ratio:.2f}x"
        )
    if "uneven_ratio" in ours:
        ratio = ours["uneven_ratio"]
        check("uneven batch <= 1.3x the longest prompt alone", ratio <= 1.3, f"{ratio:.2f}x")
    if mine in loads:
        growth = loads[mine]["peak_rss_growth"] / (loads[mine].get("resident_bytes") or resident_bound)
        check(
            "peak RSS growth within 10% of its weights as loaded + KV cache",
            growth <= 1.1,
            f"{100 * growth:.0f}%",
        )
        load = loads[mine]["load_s"] / min(v["read_s"] for v in loads.values())
        check("load time within 2x of reading the shard file", load <= 2, f"{load:.1f}x")
    return lines


def main(argv: Optional[List[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == LOAD_CHILD:
        load_child(argv[1], Path(argv[2]), int(argv[3]))
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=sorted(MODELS), default="tinyllama", help="checkpoint geometry")
    parser.add_argument(
        "--engines",
        default="codellama,transformers",
        help=f"comma-separated: {', '.join(ENGINES)} (llama.cpp is bf16; default: %(default)s)",
    )
    parser.add_argument(
        "--cases",
        default=None,
        help=f"comma-separated subset of {', '.join(CASES)} (default: all of them, none with --context)",
    )
    parser.add_argument(
        "--context",
        default="",
        help="comma-separated prompt lengths, e.g. 1024,4096,16384: also measure prefill and decode "
        "tokens/s at batch 1 after a prompt of each length (off by default)",
    )
    parser.add_argument(
        "--quantize",
        default="",
        help="comma-separated int8, int4: also run this engine with weights quantized while loading",
    )
    parser.add_argument("--repeats", type=int, default=5, help="rounds; medians are reported")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens generated per prompt")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for every engine")
    parser.add_argument("--cache-dir", type=Path, default=REPO / "benchmarks" / ".cache")
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "RESULTS.md")
    opts = parser.parse_args(argv)
    engines = [e.strip() for e in opts.engines.split(",") if e.strip()]
    engines += [f"codellama-{mode.strip()}" for mode in opts.quantize.split(",") if mode.strip()]
    unknown = sorted(set(engines) - set(ENGINES))
    if unknown:
        parser.error(f"unknown engines {unknown}; choose from {', '.join(ENGINES)}")
    try:
        contexts_asked = [int(n) for n in opts.context.split(",") if n.strip()]
    except ValueError:
        parser.error(f"--context takes comma-separated token counts, not {opts.context!r}")
    if any(n < 2 for n in contexts_asked):
        parser.error("--context lengths must be >= 2 tokens")
    cases_text = opts.cases if opts.cases is not None else ("" if contexts_asked else ",".join(CASES))
    cases = [c.strip() for c in cases_text.split(",") if c.strip()]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        parser.error(f"unknown cases {unknown}; choose from {', '.join(CASES)}")
    if opts.repeats < 1 or opts.new_tokens < 2:
        parser.error("--repeats must be >= 1 and --new-tokens >= 2")
    skipped = None
    dropped = [e for e in engines if llama_cpp_kind(e) is not None]
    absent = llama_cpp_peer.missing() if dropped else None
    if absent and dropped:
        skipped = f"{', '.join(dropped)}: {absent}"
        print(f"skipping {skipped}", file=sys.stderr)
        engines = [e for e in engines if e not in dropped]
    if not engines:
        parser.error("no engine left to measure")

    torch.set_num_threads(opts.threads)
    ckpt = ensure_checkpoint(opts.cache_dir, opts.model)
    args = ModelArgs(**MODELS[opts.model])
    work = Workload(args)
    for name in engines:  # convert before anything is timed
        kind = llama_cpp_kind(name)
        if kind is not None:
            llama_cpp_peer.ensure_gguf(ckpt, kind)

    loads: Dict[str, Dict[str, float]] = {}
    if "load" in cases:
        for name in engines:
            loads[name] = measure_load(name, ckpt, opts.threads)
            print(f"load {name}: {loads[name]}", file=sys.stderr)

    bandwidth = memory_read_bandwidth(opts.repeats)
    flops = bf16_matmul_flops(opts.repeats, args.dim)
    in_process = [c for c in cases if c != "load"]
    results: Dict[str, Dict[str, float]] = {e: {} for e in engines}
    agree = None
    if in_process:
        results, agree, bandwidth, flops = measure_cases(
            engines, ckpt, in_process, opts.new_tokens, opts.repeats, bandwidth, flops
        )
        gc.collect()  # the engines are gone: free their memory before the next ones load
    contexts = measure_contexts(engines, ckpt, contexts_asked, opts.new_tokens, opts.repeats)

    weight_bytes = sum(
        t.numel() * 2
        for t in torch.load(
            ckpt / "consolidated.00.pth", map_location="cpu", mmap=True, weights_only=True
        ).values()
    )
    kv_bytes = 2 * args.n_layers * args.kv_heads * args.head_dim * MAX_BATCH * MAX_SEQ_LEN * 2
    text = report(
        argv,
        opts,
        engines,
        results,
        loads,
        bandwidth,
        flops,
        work,
        weight_bytes,
        kv_bytes,
        agree,
        contexts,
        skipped,
    )
    opts.output.parent.mkdir(parents=True, exist_ok=True)
    opts.output.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
