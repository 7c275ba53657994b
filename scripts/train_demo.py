"""Train the bundled demo model: a few-million-parameter Code Llama on the CPython standard library.

Trains a SentencePiece tokenizer with the Code Llama infilling pieces, then the engine's own
`llama.model.Transformer` (MP=1, CPU, fp32) on three objectives mixed in every batch: next-token
prediction on source files, fill-in-the-middle in both the prefix-suffix-middle and the
suffix-prefix-middle formats (built with `llama.prompts.infilling_prompt_tokens`, so they match
`text_infilling` byte for byte), and Instruct chat pairs (docstring request -> function code,
built with `llama.prompts.instruct_prompt_tokens`). Writes a Meta-format checkpoint directory.

    python scripts/train_demo.py --out models/demo --minutes 40

With `--minutes` the number of steps is chosen from the speed of the first steps and printed;
rerun with `--steps N` (same seed) to repeat a run exactly. `--init_from DIR` continues from a
checkpoint folder this script wrote (same tokenizer and shapes, fresh optimizer and schedule).
"""

import argparse
import hashlib
import json
import math
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import sentencepiece as spm
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama.distributed import init_model_parallel  # noqa: E402
from llama.model import ModelArgs, Transformer, apply_rotary, rotary_angles  # noqa: E402
from llama.prompts import infilling_prompt_tokens, instruct_prompt_tokens  # noqa: E402
from llama.tokenizer import EOT_PIECE, MIDDLE_PIECE, PREFIX_PIECE, SUFFIX_PIECE, Tokenizer  # noqa: E402
from scripts.demo_data import (  # noqa: E402
    Function,
    dedent_lines,
    find_functions,
    head_lines,
    instruction_request,
    read_source,
    split_corpus,
    stdlib_dir,
    tail_lines,
)

CHECKPOINT_FILES = ["params.json", "consolidated.00.pth", "tokenizer.model"]


def train_tokenizer(texts: List[str], out_path: Path, vocab_size: int) -> None:
    """A Llama-style SentencePiece BPE model (unk=0, bos=1, eos=2, no pad, byte fallback,
    identity normalisation so indentation and newlines survive) with the infilling pieces."""
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text("\n".join(texts), encoding="utf-8")
        spm.SentencePieceTrainer.train(
            input=str(corpus),
            model_prefix=str(Path(tmp) / "tokenizer"),
            vocab_size=vocab_size,
            model_type="bpe",
            byte_fallback=True,
            user_defined_symbols=[PREFIX_PIECE, SUFFIX_PIECE, MIDDLE_PIECE, EOT_PIECE],
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            character_coverage=0.9999,
            max_sentence_length=1 << 16,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            num_threads=2,
            minloglevel=2,
        )
        shutil.copyfile(Path(tmp) / "tokenizer.model", out_path)


class Batches:
    """Rows of `seq_len + 1` tokens mixing the three objectives, from one seeded generator.

    Half of the rows are a window of one source file (files in a seeded shuffled order,
    cycled); the others are packed with infilling samples (60%) and instruction pairs (40%).
    """

    def __init__(self, tokenizer: Tokenizer, texts: List[str], seq_len: int, seed: int):
        self.tok = tokenizer
        self.texts = texts
        self.seq_len = seq_len
        self.rng = random.Random(seed)
        self.windows: List[List[int]] = []
        for text in texts:
            ids = tokenizer.encode(text, bos=True, eos=True)
            self.windows += [ids[i : i + seq_len + 1] for i in range(0, len(ids) - 16, seq_len + 1)]
        self.rng.shuffle(self.windows)
        self.next_window = 0
        self.functions: List[Tuple[int, Function]] = []
        for index, text in enumerate(texts):
            self.functions += [(index, function) for function in find_functions(text)]
        self.documented = [(i, f) for i, f in self.functions if f.docstring]
        self.lines = [text.splitlines(keepends=True) for text in texts]
        self.file_weights = [len(text) for text in texts]

    def rows(self, batch_size: int) -> torch.Tensor:
        return torch.tensor([self._row() for _ in range(batch_size)], dtype=torch.long)

    def _row(self) -> List[int]:
        if self.rng.random() < 0.5:
            row = self.windows[self.next_window % len(self.windows)]
            self.next_window += 1
            if len(row) == self.seq_len + 1:
                return row
        else:
            row = []
        while len(row) < self.seq_len + 1:
            row += self.infilling_sample() if self.rng.random() < 0.6 else self.instruction_sample()
        return row[: self.seq_len + 1]

    def infilling_sample(self) -> List[int]:
        """`[BOS, PRE] prefix [SUF] suffix [MID] middle [EOT]` (or the SPM order), middle being a
        function body, a span of lines or (sometimes) a span of characters."""
        for _ in range(20):
            kind = self.rng.random()
            if kind < 0.5:
                index, function = self.rng.choice(self.functions)
                lines = self.lines[index]
                start = sum(len(line) for line in lines[: function.body_start])
                end = start + len(function.body(lines))
            else:
                (index,) = self.rng.choices(range(len(self.texts)), weights=self.file_weights)
                lines = self.lines[index]
                first = self.rng.randrange(len(lines))
                last = min(len(lines), first + self.rng.randint(1, 12))
                start = sum(len(line) for line in lines[:first])
                end = start + sum(len(line) for line in lines[first:last])
                if kind > 0.85:  # mid-line split points
                    start = self.rng.randint(start, max(start, end - 1))
                    end = self.rng.randint(start + 1, max(start + 1, end))
            text = self.texts[index]
            middle = text[start:end]
            prefix_budget, suffix_budget = self.rng.randint(0, 1200), self.rng.randint(0, 700)
            for _attempt in range(4):
                prefix = tail_lines(text[:start], prefix_budget)
                suffix = head_lines(text[end:], suffix_budget)
                suffix_first = self.rng.random() < 0.5
                tokens = (
                    infilling_prompt_tokens(self.tok, prefix, suffix, suffix_first=suffix_first)
                    + self.tok.encode_infilling(middle)
                    + [self.tok.eot_id]
                )
                if len(tokens) <= self.seq_len + 1:
                    return tokens
                prefix_budget, suffix_budget = prefix_budget // 2, suffix_budget // 2
        return [self.tok.bos_id, self.tok.eos_id]

    def instruction_sample(self) -> List[int]:
        """A finished Instruct pair: `BOS [INST] request [/INST] code EOS`."""
        for _ in range(20):
            index, function = self.rng.choice(self.documented)
            lines = self.lines[index]
            code = dedent_lines("".join(lines[function.def_line : function.end]), function.indent)
            if code is None:
                continue
            tokens = instruction_pair_tokens(self.tok, instruction_request(function), code)
            if len(tokens) <= self.seq_len + 1:
                return tokens
        return [self.tok.bos_id, self.tok.eos_id]


def instruction_pair_tokens(tokenizer: Tokenizer, request: str, answer: str) -> List[int]:
    """`BOS + enc("[INST] request [/INST] answer ") + EOS`, taken from the engine's own prompt
    builder: a dialog with one more user turn, minus that last turn's tokens."""
    probe = "x"
    dialog = [
        {"role": "user", "content": request},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": probe},
    ]
    tokens = instruct_prompt_tokens(tokenizer, dialog)
    last_turn = instruct_prompt_tokens(tokenizer, [{"role": "user", "content": probe}])
    if tokens[-len(last_turn) :] != last_turn:
        raise RuntimeError("unexpected Instruct prompt layout")
    return tokens[: -len(last_turn)]


def init_weights(model: Transformer, n_layers: int) -> None:
    """GPT-2 style: normal(0, 0.02), residual output projections scaled by 1/sqrt(2 * layers).

    fairscale's layers were built without initialisation (the engine loads weights), so every
    matrix is set here; the RMSNorm weights start at one.
    """
    for name, param in model.named_parameters():
        if param.dim() < 2:
            torch.nn.init.ones_(param)
        elif name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
            torch.nn.init.normal_(param, 0.0, 0.02 / math.sqrt(2 * n_layers))
        else:
            torch.nn.init.normal_(param, 0.0, 0.02)


def training_forward(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    """Logits [B, L, vocab] of the full causal sequence through the model's own modules, without
    the KV cache (whose in-place writes are for inference)."""
    params = model.params
    bsz, seqlen = tokens.shape
    angles = rotary_angles(torch.arange(seqlen), params.head_dim, params.rope_theta)
    cos, sin = angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]
    h = model.tok_embeddings(tokens)
    for layer in model.layers:
        attention = layer.attention
        x = layer.attention_norm(h)
        q = attention.wq(x).view(bsz, seqlen, attention.n_local_heads, attention.head_dim)
        k = attention.wk(x).view(bsz, seqlen, attention.n_local_kv_heads, attention.head_dim)
        v = attention.wv(x).view(bsz, seqlen, attention.n_local_kv_heads, attention.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        # Query head i uses kv head i // n_rep, as the engine's stacked-GQA attention does.
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
        )
        h = h + attention.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))
        h = h + layer.feed_forward(layer.ffn_norm(h))
    return model.output(model.norm(h))


def learning_rate(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak at `total` steps."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def save_checkpoint(model: Transformer, params: Dict, out_dir: Path) -> None:
    """params.json, consolidated.00.pth (bf16) and checklist.chk (md5 of each file)."""
    (out_dir / "params.json").write_text(json.dumps(params, indent=2) + "\n")
    state = {name: tensor.detach().to(torch.bfloat16).clone() for name, tensor in model.state_dict().items()}
    tmp = out_dir / "consolidated.00.pth.tmp"
    torch.save(state, tmp)
    tmp.replace(out_dir / "consolidated.00.pth")
    sums = [f"{hashlib.md5((out_dir / n).read_bytes()).hexdigest()}  {n}" for n in CHECKPOINT_FILES]
    (out_dir / "checklist.chk").write_text("\n".join(sums) + "\n")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="models/demo", help="checkpoint folder to write")
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--steps", type=int, help="number of optimizer steps")
    budget.add_argument("--minutes", type=float, help="wall-time budget; steps are set from measured speed")
    parser.add_argument(
        "--init_from",
        default=None,
        help="start from this checkpoint folder (its params.json, weights and tokenizer) instead of scratch",
    )
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--vocab_size", type=int, default=3000)
    parser.add_argument("--dim", type=int, default=192)
    parser.add_argument("--n_layers", type=int, default=4)
    parser.add_argument("--n_heads", type=int, default=6)
    parser.add_argument("--n_kv_heads", type=int, default=2)
    parser.add_argument("--seq_len", type=int, default=320)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2.5e-3)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--save_every", type=int, default=100, help="also save every N steps")
    args = parser.parse_args(argv)
    if (args.steps is not None and args.steps < 1) or (args.minutes is not None and args.minutes <= 0):
        parser.error("--steps and --minutes must be positive")
    return args


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    started = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    root = stdlib_dir()
    train_files, held_out = split_corpus(root)
    texts = [text for text in (read_source(root, path) for path in train_files) if text is not None]
    print(
        f"corpus: {len(texts)} training files ({sum(map(len, texts)) / 1e6:.1f} M chars) from {root}, "
        f"{len(held_out)} held out",
        flush=True,
    )
    init_dir = None if args.init_from is None else Path(args.init_from)
    if init_dir is None:
        train_tokenizer(texts, out_dir / "tokenizer.model", args.vocab_size)
    elif init_dir.resolve() != out_dir.resolve():
        shutil.copyfile(init_dir / "tokenizer.model", out_dir / "tokenizer.model")
    tokenizer = Tokenizer(str(out_dir / "tokenizer.model"))
    batches = Batches(tokenizer, texts, args.seq_len, args.seed)
    n_tokens = sum(map(len, batches.windows))
    print(
        f"tokenizer: {tokenizer.n_words} pieces; corpus {n_tokens / 1e6:.2f} M tokens; "
        f"{len(batches.functions)} functions ({len(batches.documented)} documented)",
        flush=True,
    )

    init_model_parallel(1)
    if init_dir is not None:
        params = json.loads((init_dir / "params.json").read_text())
    else:
        params = {
            "dim": args.dim,
            "n_layers": args.n_layers,
            "n_heads": args.n_heads,
            "n_kv_heads": args.n_kv_heads,
            "vocab_size": tokenizer.n_words,
            "multiple_of": 32,
            "ffn_dim_multiplier": None,
            "norm_eps": 1e-5,
            "rope_theta": 1000000.0,
        }
    model = Transformer(ModelArgs(**params, max_batch_size=1, max_seq_len=1))
    if init_dir is None:
        init_weights(model, params["n_layers"])
    else:
        state = torch.load(init_dir / "consolidated.00.pth", map_location="cpu", weights_only=True)
        model.load_state_dict({name: tensor.float() for name, tensor in state.items()})
        print(f"continuing from the weights in {init_dir}", flush=True)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f} M parameters {params}", flush=True)

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    total_steps = args.steps if args.steps is not None else 10**9
    deadline = None if args.minutes is None else time.time() + args.minutes * 60
    train_started = time.time()
    step, loss_sum, loss_count = 0, 0.0, 0
    while step < total_steps:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, total_steps, args.lr, args.warmup)
        rows = batches.rows(args.batch_size)
        logits = training_forward(model, rows[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), rows[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        loss_sum, loss_count = loss_sum + loss.item(), loss_count + 1

        elapsed = time.time() - train_started
        if deadline is not None and step == 30:
            # Steps that fit in the budget at the measured speed (with 10% slack for contention).
            total_steps = max(step + 1, int((deadline - time.time()) / (elapsed / step) / 1.1) + step)
            print(f"measured {elapsed / step:.2f} s/step: training for {total_steps} steps", flush=True)
        if step % 20 == 0 or step == total_steps:
            tokens_per_s = step * args.batch_size * args.seq_len / elapsed
            print(
                f"step {step}/{total_steps} loss {loss_sum / loss_count:.3f} lr {group['lr']:.2e} "
                f"{tokens_per_s:.0f} tok/s {elapsed / 60:.1f} min",
                flush=True,
            )
            loss_sum, loss_count = 0.0, 0
        if step % args.save_every == 0:
            save_checkpoint(model, params, out_dir)
        if deadline is not None and time.time() > deadline + 0.25 * args.minutes * 60:
            print(f"over the time budget: stopping at step {step}", flush=True)
            break
    save_checkpoint(model, params, out_dir)
    print(
        f"done: {step} steps, {step * args.batch_size * args.seq_len / 1e6:.2f} M tokens, "
        f"{(time.time() - started) / 60:.1f} min wall time; wrote {out_dir}",
        flush=True,
    )


if __name__ == "__main__":
    main()
