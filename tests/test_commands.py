"""The `codellama` command, run as a user runs it (`python -m llama ...` in a subprocess) on a tiny
checkpoint, checked against the Python API, an independent byte count and the causal rule."""

import ast
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

from llama import Llama, commands, distributed, memory_plan
from llama.attention_mask import CELL_PX, LABEL_PX
from llama.engine import Engine
from llama.model import ModelArgs
from llama.prompts import infilling_prompt_tokens
from llama.tokenizer import Tokenizer
from tests.tiny import random_state_dict, tiny_params, write_checkpoint

ROOT = Path(__file__).resolve().parents[1]
DEMO_TOKENIZER = ROOT / "models" / "demo" / "tokenizer.model"
GEN_LEN = 8
SEQ_LEN = 256


def run_cli(*args, stdin="", timeout=180):
    """`python -m llama ARGS` with `stdin` piped in: (exit status, stdout, stderr)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONIOENCODING="utf-8")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    done = subprocess.run(
        [sys.executable, "-m", "llama", *map(str, args)],
        input=stdin.encode("utf-8"),
        cwd=ROOT,
        env=env,
        capture_output=True,
        timeout=timeout,
    )
    return done.returncode, done.stdout.decode("utf-8"), done.stderr.decode("utf-8", "replace")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer_path):
    """The same tiny random weights as an MP=1 Instruct-named folder, a base-named one, and MP=2."""
    vocab = spm.SentencePieceProcessor(model_file=str(tokenizer_path)).vocab_size()
    root = tmp_path_factory.mktemp("cli_ckpts")
    params = tiny_params(vocab)
    weights = random_state_dict(ModelArgs(**params), seed=21)
    return {
        "instruct": write_checkpoint(root / "tiny-Instruct", params, weights, mp=1),
        "base": write_checkpoint(root / "tiny", params, weights, mp=1),
        "mp2": write_checkpoint(root / "tiny-mp2", params, weights, mp=2),
    }


@pytest.fixture(scope="module")
def generator(checkpoints, tokenizer_path):
    """The oracle: the Python API on the same weights, fp32, one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Llama.build(str(checkpoints["instruct"]), str(tokenizer_path), SEQ_LEN, 1, dtype="float32")
    torch.set_num_threads(threads)


def model_flags(checkpoints, tokenizer_path, name="instruct"):
    return [
        "--ckpt_dir",
        checkpoints[name],
        "--tokenizer_path",
        tokenizer_path,
        "--dtype",
        "float32",
        "--max_seq_len",
        SEQ_LEN,
        "--temperature",
        "0",
        "--max_gen_len",
        GEN_LEN,
    ]


def test_codellama_entry_point_is_declared():
    setup = ast.parse((ROOT / "setup.py").read_text())
    scripts = [
        ast.literal_eval(keyword.value)["console_scripts"]
        for node in ast.walk(setup)
        if isinstance(node, ast.Call)
        for keyword in node.keywords
        if keyword.arg == "entry_points"
    ]
    assert scripts == [["codellama = llama.commands:entry_point"]]
    assert callable(commands.entry_point)


# ----------------------------------------------------------------------------------- generation


def completion_in_context(generator, prompt):
    """text_completion's generation decoded together with its prompt (echo), the prompt cut off:
    the exact continuation, with the leading space a generation decoded alone would drop."""
    echoed = generator.text_completion([prompt], temperature=0.0, max_gen_len=GEN_LEN, echo=True)[0]
    assert echoed["generation"].startswith(prompt)
    return echoed["generation"][len(prompt) :]


def test_piped_prompt_completes_like_text_completion(checkpoints, tokenizer_path, generator):
    prompt = "def fibonacci(n):\n"
    status, out, err = run_cli("complete", *model_flags(checkpoints, tokenizer_path), stdin=prompt)
    assert status == 0, err
    expected = completion_in_context(generator, prompt)
    assert expected.strip()
    assert out == expected + "\n"
    assert "Loaded" in err and "Loaded" not in out  # stdout holds only the completion


def test_infill_from_file(checkpoints, tokenizer_path, generator, tmp_path):
    prompt = 'def add(a, b):\n    """<FILL_ME>"""\n    return a + b\n'
    path = tmp_path / "prompt.py"
    path.write_text(prompt, encoding="utf-8")
    flags = model_flags(checkpoints, tokenizer_path)
    status, out, err = run_cli("infill", "--file", path, "--json", *flags)
    assert status == 0, err
    expected = generator.text_infilling(prompts=[prompt], temperature=0.0, max_gen_len=GEN_LEN)[0]
    result = json.loads(out)
    assert (result["generation"], result["full_text"]) == (expected["generation"], expected["full_text"])
    assert expected["full_text"].startswith('def add(a, b):\n    """')


def chat_answer(generator, dialog):
    return generator.chat_completion([dialog], temperature=0.0, max_gen_len=GEN_LEN)[0]["generation"][
        "content"
    ]


def test_chat_two_turns_then_reset(checkpoints, tokenizer_path, generator):
    first, second = "Write a function that adds two numbers.", "Now make it multiply."
    status, out, err = run_cli(
        "chat", *model_flags(checkpoints, tokenizer_path), stdin=f"{first}\n{second}\n/reset\n{second}\n"
    )
    assert status == 0, err
    answer1 = chat_answer(generator, [{"role": "user", "content": first}])
    answer2 = chat_answer(
        generator,
        [
            {"role": "user", "content": first},
            {"role": "assistant", "content": answer1},
            {"role": "user", "content": second},
        ],
    )
    fresh = chat_answer(generator, [{"role": "user", "content": second}])
    assert answer2 != fresh  # the second turn really saw the first
    assert out == f"{answer1}\n{answer2}\n{fresh}\n"
    assert "(conversation reset)" in err


def test_chat_dialog_file_answers_once(checkpoints, tokenizer_path, generator, tmp_path, capsys):
    dialogs = [
        [{"role": "system", "content": "Answer in Python."}, {"role": "user", "content": "Sort a list."}],
        [{"role": "user", "content": "Reverse a string."}],
    ]
    path = tmp_path / "dialogs.json"
    path.write_text(json.dumps(dialogs))
    flags = [str(flag) for flag in model_flags(checkpoints, tokenizer_path)]
    assert commands.main(["chat", "--dialog", str(path), "--json", *flags]) == 0  # in this process
    out = capsys.readouterr().out
    expected = generator.chat_completion(dialogs, temperature=0.0, max_gen_len=GEN_LEN)
    assert [json.loads(line) for line in out.splitlines()] == expected


# ----------------------------------------------------------------------------------- speculation

# Code that repeats itself, so prompt lookup has something to propose; the tiny model's greedy
# loops make proposals that are accepted.
REPEATING = "def area(w, h):\n    return w * h\n\n\ndef area(w, h):\n    return w * h\n\n\ndef "
LOOKUP_GEN_LEN = 32


@pytest.fixture
def submitted(monkeypatch):
    """(engine, speculation) of every `Engine.submit` call made in this process."""
    calls = []
    submit = Engine.submit

    def spy(self, *args, **kwargs):
        calls.append((self, kwargs.get("speculation")))
        return submit(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "submit", spy)
    return calls


def run_in_process(capsys, *args) -> str:
    assert commands.main([str(arg) for arg in args]) == 0
    return capsys.readouterr().out


def test_complete_with_lookup_prints_the_greedy_completion(
    checkpoints, tokenizer_path, generator, capsys, submitted
):
    flags = [*model_flags(checkpoints, tokenizer_path), "--max_gen_len", LOOKUP_GEN_LEN]
    plain = run_in_process(capsys, "complete", REPEATING, *flags)
    fast = run_in_process(capsys, "complete", REPEATING, "--lookup", 4, *flags)
    assert fast == plain
    (_, off), (engine, on) = submitted
    assert off is None and (on.method, on.num_tokens) == ("lookup", 4)
    stats = engine.stats()
    assert stats["speculative_proposed"] > 0 and stats["speculative_accepted"] > 0  # it really speculated
    echoed = generator.text_completion([REPEATING], temperature=0.0, max_gen_len=LOOKUP_GEN_LEN, echo=True)
    assert plain == echoed[0]["generation"][len(REPEATING) :] + "\n"


def test_chat_with_lookup_gives_the_greedy_answers(
    checkpoints, tokenizer_path, generator, tmp_path, capsys, submitted
):
    dialogs = [[{"role": "user", "content": REPEATING}], [{"role": "user", "content": "Reverse a string."}]]
    path = tmp_path / "dialogs.json"
    path.write_text(json.dumps(dialogs))
    flags = [*model_flags(checkpoints, tokenizer_path), "--max_gen_len", LOOKUP_GEN_LEN]
    out = run_in_process(capsys, "chat", "--dialog", path, "--json", "--lookup", 4, *flags)
    assert [speculation.num_tokens for _, speculation in submitted] == [4, 4]
    assert submitted[-1][0].stats()["speculative_proposed"] > 0
    expected = generator.chat_completion(dialogs, temperature=0.0, max_gen_len=LOOKUP_GEN_LEN)
    assert [json.loads(line) for line in out.splitlines()] == expected


# ----------------------------------------------------------------------------------- bad input


def test_bad_input_is_one_line_and_exit_2(checkpoints, tokenizer_path):
    flags = model_flags(checkpoints, tokenizer_path)
    cases = {
        "no prompt": (["complete", *flags], "no prompt"),
        "two <FILL_ME>": (["infill", "a<FILL_ME>b<FILL_ME>c", *flags], "has 2 <FILL_ME> markers"),
        "unknown model size": (["plan", "--model", "8b"], "unknown model '8b'"),
        "lookup out of range": (["complete", "x", "--lookup", "8", *flags], "--lookup"),
        "chat without Instruct": (
            ["chat", *model_flags(checkpoints, tokenizer_path, "base")],
            "not an Instruct model",
        ),
    }
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONIOENCODING="utf-8")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    running = {  # all at once: each only starts Python and stops at its check
        name: subprocess.Popen(
            [sys.executable, "-m", "llama", *map(str, args)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=ROOT,
            env=env,
        )
        for name, (args, _) in cases.items()
    }
    for name, process in running.items():
        out, err = (stream.decode("utf-8") for stream in process.communicate(timeout=180))
        lines = err.strip().splitlines()
        assert process.returncode == 2 and out == "", (name, err)
        assert len(lines) == 1 and lines[0].startswith("codellama: error: "), (name, err)
        assert cases[name][1] in lines[0], (name, err)


# ----------------------------------------------------------------------------------- plan

# The published shapes (SPEC: model family table): dim, layers, heads, kv heads, FFN hidden, vocab, MP.
PUBLISHED = {
    "7b": (4096, 32, 32, 32, 11008, 32016, 1),
    "13b": (5120, 40, 40, 40, 13824, 32016, 2),
    "34b": (8192, 48, 64, 8, 22016, 32016, 4),
    "70b": (8192, 80, 64, 8, 28672, 32016, 8),
}


def independent_bytes(size, mp, mode, seq, batch, group=64):
    """Bytes per rank counted from the published shapes, bf16 activations and non-linear weights
    (the linear layers of the published models have multiples of 64 rows, except the output layer)."""
    dim, layers, heads, kv, ffn, vocab, _ = PUBLISHED[size]
    hd = dim // heads
    linear = 2 * dim * heads * hd + 2 * dim * kv * hd + 3 * dim * ffn  # wq, wo, wk, wv, w1, w2, w3
    out_channels = (heads * hd + 2 * kv * hd + 2 * ffn) // mp + 2 * dim  # column-parallel split, wo/w2 whole
    rest = 2 * (layers * 2 * dim + vocab * dim // mp + dim)  # norms, embeddings in bf16
    out_rows = vocab // mp  # the output layer, quantized like the others
    if mode == "bfloat16":
        weights = 2 * layers * linear // mp + 2 * out_rows * dim + rest
    elif mode == "int8":
        weights = layers * (linear // mp + 2 * out_channels) + out_rows * dim + 2 * out_rows + rest
    else:  # 4 bits per value, a bf16 scale and zero per group of a rank's share; rows padded to 64
        out_rows = -(-out_rows // 64) * 64
        output = out_rows * dim // 2 + 4 * out_rows * (dim // group)
        weights = layers * (linear // mp // 2 + 4 * (linear // mp // group)) + output + rest
    kv_cache = 2 * layers * kv * hd * seq * batch * 2 // mp
    chunk = min(512, seq)  # the engine prefills at most 512 prompt tokens per step
    ffn_buffers = 3 * chunk * ffn // mp * 2
    attention = chunk * (heads + 2 * kv) * hd // mp * 2 + heads // mp * 64 * seq * 4
    activations = 2 * chunk * dim * 2 + max(ffn_buffers, attention)
    logits = 2 * batch * vocab * 4
    return {
        "weights": weights,
        "kv_cache": kv_cache,
        "activations": activations,
        "logits": logits,
        "total": weights + kv_cache + activations + logits,
    }


def plan_json(capsys, *args):
    status = commands.main(["plan", "--json", *map(str, args)])
    return status, json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("size", sorted(PUBLISHED))
@pytest.mark.parametrize("mode", ["bfloat16", "int8", "int4"])
def test_plan_numbers_equal_an_independent_byte_count(capsys, size, mode):
    mp = PUBLISHED[size][-1]
    for ranks, seq, batch in ((1, 4096, 1), (mp, 16384, 4)):
        quantize = [] if mode == "bfloat16" else ["--quantize", mode]
        args = [
            "--model",
            size,
            "--model_parallel_size",
            ranks,
            "--max_seq_len",
            seq,
            "--max_batch_size",
            batch,
        ]
        _, plan = plan_json(capsys, *args, *quantize, "--gpu_memory", "1000GiB")
        assert plan["per_rank"] == independent_bytes(size, ranks, mode, seq, batch)
        assert plan["fits"] is True


def test_plan_counts_the_engines_prefill_chunk():
    default = inspect.signature(Engine).parameters["prefill_chunk"].default
    assert memory_plan.PREFILL_CHUNK == default


def test_plan_of_the_readme_memory_table(capsys):
    """The README's weights column (GiB, bf16, all ranks) is what the plan counts."""
    for size, gib in (("7b", 12.6), ("13b", 24.2), ("34b", 62.9), ("70b", 128.5)):
        _, plan = plan_json(capsys, "--model", size, "--model_parallel_size", 1, "--gpu_memory", "1000GiB")
        assert round(plan["per_rank"]["weights"] / 2**30, 1) == gib


def test_plan_34b_on_two_24gb_gpus_suggests_what_fits(capsys):
    asked = ["--model", "34b", "--model_parallel_size", 2, "--max_seq_len", 4096, "--gpu_memory", "24GB"]
    status, plan = plan_json(capsys, *asked, "--num_gpus", 2)
    assert status == 1 and plan["fits"] is False
    assert plan["per_rank"]["total"] > 24e9
    (suggestion,) = plan["suggestions"]  # two GPUs: more ranks cannot help, 8 bits can
    assert "--quantize int8" in suggestion["settings"] and "--model_parallel_size 2" in suggestion["settings"]
    assert suggestion["per_rank"]["total"] <= 24e9
    _, plan = plan_json(capsys, *asked)  # as many 24 GB GPUs as needed: 4 ranks in bf16
    assert "--model_parallel_size 4 --dtype bfloat16 --max_seq_len" in plan["suggestions"][0]["settings"]
    assert plan["suggestions"][0]["per_rank"]["total"] <= 24e9


@pytest.mark.parametrize("spare", [0, -1])
def test_plan_decision_agrees_with_build_refusal(checkpoints, tokenizer_path, capsys, monkeypatch, spare):
    """With exactly the planned bytes free the model loads; one byte less and both refuse."""
    sizes = ["--dtype", "float32", "--max_seq_len", 4096, "--max_batch_size", 8]
    _, plan = plan_json(
        capsys, "--model", checkpoints["base"], "--model_parallel_size", 1, *sizes, "--gpu_memory", 1
    )
    free = plan["per_rank"]["total"] + spare
    status, plan = plan_json(
        capsys, "--model", checkpoints["base"], "--model_parallel_size", 1, *sizes, "--gpu_memory", free
    )
    assert plan["fits"] is (spare == 0) and status == (0 if spare == 0 else 1)
    monkeypatch.setattr(distributed, "available_memory_bytes", lambda device: free)
    build = lambda: Llama.build(  # noqa: E731
        str(checkpoints["base"]), str(tokenizer_path), 4096, 8, dtype="float32"
    )
    if spare == 0:
        assert build().model.params.max_batch_size == 8
    else:
        with pytest.raises(ValueError, match="is free: lower max_seq_len or max_batch_size, quantize"):
            build()


def test_plan_runs_as_a_command():
    status, out, err = run_cli(
        "plan", "--model", "34b", "--model_parallel_size", 2, "--max_seq_len", 4096, "--gpu_memory", "24GB"
    )
    assert status == 1, err
    assert "weights         31.43 GiB" in out and "does not fit" in out and "--quantize int8" in out


# ----------------------------------------------------------------------------------- mask


def mask_rows(out):
    """(labels, cells) parsed from `codellama mask` output: one entry per query token."""
    labels, cells = [], []
    for line in out.splitlines():
        head, bar, grid = line.partition(" │ ")
        if bar and head.split() and head.split()[0].isdigit():
            labels.append(head.split()[-1])
            cells.append([{"■": True, "⬚": False}[c] for c in grid.split()])
    return labels, cells


def assert_causal_within_prompts(cells, prompt_lengths):
    owner = [p for p, n in enumerate(prompt_lengths) for _ in range(n)]
    start = [sum(prompt_lengths[:p]) for p in owner]
    assert len(cells) == len(owner)
    for i, row in enumerate(cells):
        assert len(row) == len(owner)
        for j, seen in enumerate(row):
            assert seen == (owner[i] == owner[j] and start[i] <= j <= i), (i, j)


def test_mask_of_a_three_token_prompt():
    tokenizer = Tokenizer(str(DEMO_TOKENIZER))
    ids = tokenizer.encode("def f", bos=True, eos=False)
    assert len(ids) == 3
    status, out, err = run_cli("mask", "def f")
    assert status == 0, err
    labels, cells = mask_rows(out)
    assert labels == [tokenizer.token_piece(t) for t in ids]
    assert cells == [[True, False, False], [True, True, False], [True, True, True]]


def test_mask_of_an_infilling_prompt(capsys):
    tokenizer = Tokenizer(str(DEMO_TOKENIZER))
    for order, suffix_first in (("PSM", False), ("SPM", True)):
        ids = infilling_prompt_tokens(tokenizer, "def f(", "):\n    pass", suffix_first=suffix_first)
        flags = ["--suffix_first"] if suffix_first else []
        assert commands.main(["mask", "--infill", "def f(<FILL_ME>):\n    pass", *flags]) == 0
        labels, cells = mask_rows(capsys.readouterr().out)
        assert labels == [tokenizer.token_piece(t).replace("\n", "\\n") for t in ids], order
        assert labels[1] == "▁<PRE>" and "▁<SUF>" in labels and "▁<MID>" in labels
        assert_causal_within_prompts(cells, [len(ids)])


def test_mask_of_two_packed_prompts_and_its_png(tmp_path, capsys):
    tokenizer = Tokenizer(str(DEMO_TOKENIZER))
    prompts = ["import os", "x = 1"]
    png = tmp_path / "mask.png"
    assert commands.main(["mask", *prompts, "--png", str(png)]) == 0
    out = capsys.readouterr().out
    lengths = [len(tokenizer.encode(p, bos=True, eos=False)) for p in prompts]
    _, cells = mask_rows(out)
    assert_causal_within_prompts(cells, lengths)
    assert "2 prompts packed into one prefill" in out

    image = pytest.importorskip("PIL.Image").open(png).convert("RGB")
    for i, row in enumerate(cells):
        for j, seen in enumerate(row):
            pixel = image.getpixel(
                (LABEL_PX + j * CELL_PX + CELL_PX // 2, LABEL_PX + i * CELL_PX + CELL_PX // 2)
            )
            assert (pixel == (40, 90, 200)) == seen, (i, j, pixel)


# ----------------------------------------------------------------------------------- tools


def test_reshard_runs_under_codellama(checkpoints, tmp_path, capsys):
    out_dir = tmp_path / "resharded"
    status = commands.main(
        ["reshard", "--ckpt_dir", str(checkpoints["base"]), "--out_dir", str(out_dir), "--mp", "2"]
    )
    assert status == 0
    assert sorted(p.name for p in out_dir.glob("consolidated.*.pth")) == [
        "consolidated.00.pth",
        "consolidated.01.pth",
    ]
    a = torch.load(out_dir / "consolidated.01.pth", weights_only=True)
    b = torch.load(checkpoints["mp2"] / "consolidated.01.pth", weights_only=True)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


@pytest.mark.parametrize("tool", ["quantize", "serve"])
def test_missing_tool_is_a_clear_error(tool, capsys):
    module = commands.DELEGATED[tool]
    import importlib.util

    if importlib.util.find_spec(module) is not None:
        pytest.skip(f"{module} is installed")
    assert commands.main([tool, "--help"]) == 2
    assert f"needs {module}, which this installation does not have" in capsys.readouterr().err


def test_unknown_option_is_a_usage_error(capsys):
    assert commands.main(["complete", "--temprature", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unrecognized arguments: --temprature" in err[0]


# ----------------------------------------------------------------------------------- chat loop


def test_ctrl_c_stops_the_answer_and_keeps_the_conversation(capsys):
    """Ctrl-C during an answer closes its stream (which cancels the request) and keeps nothing;
    /system sets the system message of the next dialogs."""
    import io

    from llama.chat_repl import ChatSession, run_chat

    asked, closed = [], []

    def answer(dialog):
        asked.append(dialog)
        try:
            yield "partial"
            if dialog[-1]["content"] == "interrupt me":
                raise KeyboardInterrupt
            yield " answer"
        finally:
            closed.append(dialog[-1]["content"])

    lines = iter(["first", "interrupt me", "/system Be brief", "second", "/exit", "never read"])
    session = ChatSession(answer)
    out = io.StringIO()
    run_chat(session, lambda: next(lines), out=out)
    assert out.getvalue() == "partial answer\npartial\npartial answer\n"
    assert closed == ["first", "interrupt me", "second"]
    assert asked[1] == [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "partial answer"},
        {"role": "user", "content": "interrupt me"},
    ]
    assert asked[2] == [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "second"}]
    assert session.turns == [
        {"role": "user", "content": "second"},
        {"role": "assistant", "content": "partial answer"},
    ]
    assert "(answer stopped)" in capsys.readouterr().err


def test_serve_takes_the_server_lookup_flag(capsys):
    assert commands.main(["serve", "--lookup", "8"]) == 2  # refused by the server's own parser
    assert "--lookup must be in [0, 7]" in capsys.readouterr().err
    from llama.server.__main__ import default_speculation, parse_args

    assert parse_args(["--lookup", "4"]).lookup == 4 and parse_args([]).lookup == 0
    assert default_speculation(0) is None and default_speculation(4).num_tokens == 4
