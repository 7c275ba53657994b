"""The HTTP server under load: concurrent streaming clients next to the same requests one at a time.

Starts `python -m llama.server` on a free loopback port (the bundled demo model by default), then:

1. sends the request mix one at a time for `--sequential_seconds`;
2. runs `--clients` concurrent streaming clients for `--seconds`, each sending requests back to
   back from the same mix (infilling through `suffix` and through llama.cpp's `/infill`, chat,
   plain completion).

Every request streams. A request counts as failed on an HTTP error or an error event, and as lost
when its stream ends without a finish reason. Reports requests/s, generated tokens/s (from the
servers' usage counts), and p50/p99 time to first token and inter-token latency (client-side,
between consecutive text chunks), as markdown appended to `--out` (or printed with `--out -`).

Loopback only: the server binds 127.0.0.1. Bounded: a client starts no request after the
deadline, and the run stops waiting 120 s after it. Run `python benchmarks/load.py --help`.
"""

import argparse
import asyncio
import datetime
import json
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple

import httpx

REPO = Path(__file__).resolve().parents[1]
DRAIN_TIMEOUT_S = 120

PREFIXES = [
    'def remove_non_ascii(s: str) -> str:\n    """ ',
    "import json\n\n\ndef load_config(path):\n    ",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n        ",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    ",
]
SUFFIXES = [
    "\n    return result\n",
    "\n    return config\n",
    "\n\n    def pop(self):\n        return self.items.pop()\n",
    "\n",
]
QUESTIONS = [
    "Write a function that checks whether a string is a palindrome.",
    "How do I read a file line by line in Python?",
    "Explain what a list comprehension is.",
]
COMPLETIONS = ["import argparse\n\n\ndef main():\n", "def quicksort(xs):\n", "class LRUCache:\n"]


@dataclass
class Outcome:
    """What one streamed request measured."""

    kind: str
    ok: bool
    finish_reason: Optional[str] = None
    error: str = ""
    ttft: Optional[float] = None
    gaps: List[float] = field(default_factory=list)
    tokens: int = 0


def request_mix(max_tokens: int) -> List[Tuple[str, str, dict]]:
    """(kind, path, body) of the request cycle: infilling, chat and completion, interleaved."""
    mix = []
    for i in range(12):
        j = i % 4
        if i % 4 == 0:
            body = {"prompt": PREFIXES[j], "suffix": SUFFIXES[j], "max_tokens": max_tokens}
            mix.append(("infill (suffix)", "/v1/completions", body))
        elif i % 4 == 1:
            body = {"input_prefix": PREFIXES[j], "input_suffix": SUFFIXES[j], "n_predict": max_tokens}
            mix.append(("infill (/infill)", "/infill", body))
        elif i % 4 == 2:
            messages = [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]
            mix.append(("chat", "/v1/chat/completions", {"messages": messages, "max_tokens": max_tokens}))
        else:
            body = {"prompt": COMPLETIONS[i % len(COMPLETIONS)], "max_tokens": max_tokens}
            mix.append(("completion", "/v1/completions", body))
    for _, path, body in mix:
        body.update({"temperature": 0.2, "stream": True})
        if path != "/infill":
            body["top_p"] = 0.95
            body["stream_options"] = {"include_usage": True}
    return mix


async def run_one(client: httpx.AsyncClient, kind: str, path: str, body: dict) -> Outcome:
    """Send one streaming request and measure it."""
    outcome = Outcome(kind, ok=False)
    started = last = time.perf_counter()
    try:
        async with client.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                outcome.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return outcome
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    outcome.error = event["error"]["message"]
                    return outcome
                text, finish, tokens = _parse(path, event)
                now = time.perf_counter()
                if text:
                    if outcome.ttft is None:
                        outcome.ttft = now - started
                    else:
                        outcome.gaps.append(now - last)
                    last = now
                outcome.finish_reason = finish or outcome.finish_reason
                outcome.tokens = tokens if tokens is not None else outcome.tokens
    except httpx.HTTPError as error:
        outcome.error = f"{type(error).__name__}: {error}"
        return outcome
    outcome.ok = outcome.finish_reason is not None
    return outcome


def _parse(path: str, event: dict) -> Tuple[str, Optional[str], Optional[int]]:
    """(text, finish reason, generated tokens) of one streamed event of any endpoint."""
    if path == "/infill":
        finish = event.get("stop_type") if event.get("stop") else None
        return event.get("content", ""), finish, event.get("tokens_predicted")
    usage = event.get("usage") or {}
    tokens = usage.get("completion_tokens")
    if not event.get("choices"):
        return "", None, tokens
    choice = event["choices"][0]
    text = choice.get("text") if "text" in choice else (choice.get("delta") or {}).get("content")
    return text or "", choice.get("finish_reason"), tokens


async def run_phase(
    url: str, clients: int, seconds: float, mix: List[Tuple[str, str, dict]]
) -> Tuple[list, float]:
    """`clients` loops sending requests from `mix` until `seconds` pass; (outcomes, wall time)."""
    outcomes: List[Outcome] = []
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(
        base_url=url, timeout=httpx.Timeout(DRAIN_TIMEOUT_S), limits=limits
    ) as client:
        started = time.perf_counter()
        deadline = started + seconds

        async def loop(offset: int) -> None:
            i = offset
            while time.perf_counter() < deadline:
                kind, path, body = mix[i % len(mix)]
                outcomes.append(await run_one(client, kind, path, body))
                i += 1

        await asyncio.wait_for(asyncio.gather(*(loop(c) for c in range(clients))), seconds + DRAIN_TIMEOUT_S)
        return outcomes, time.perf_counter() - started


def percentile(values: List[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def summary(name: str, outcomes: List[Outcome], wall: float) -> dict:
    done = [o for o in outcomes if o.ok]
    ttfts = [o.ttft for o in done if o.ttft is not None]
    gaps = [g for o in done for g in o.gaps]
    return {
        "phase": name,
        "requests": len(outcomes),
        "failed": sum(1 for o in outcomes if not o.ok and o.error),
        "lost": sum(1 for o in outcomes if not o.ok and not o.error),
        "requests/s": len(done) / wall,
        "generated tokens/s": sum(o.tokens for o in done) / wall,
        "TTFT p50 (ms)": 1000 * percentile(ttfts, 50),
        "TTFT p99 (ms)": 1000 * percentile(ttfts, 99),
        "ITL p50 (ms)": 1000 * percentile(gaps, 50),
        "ITL p99 (ms)": 1000 * percentile(gaps, 99),
        "mean tokens/request": statistics.mean(o.tokens for o in done) if done else 0.0,
        "errors": sorted({o.error for o in outcomes if o.error})[:3],
    }


def start_server(args: argparse.Namespace) -> Tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "llama.server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log_level",
        "warning",
        "--max_batch_size",
        str(args.max_batch_size),
        "--max_queue",
        str(args.clients + 8),
        "--max_seq_len",
        str(args.max_seq_len),
    ]
    if args.ckpt_dir:
        cmd += ["--ckpt_dir", args.ckpt_dir]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the server exited with status {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    sys.exit("the server did not become ready within 120 s")


def markdown(args: argparse.Namespace, rows: List[dict]) -> str:
    keys = [
        "requests",
        "failed",
        "lost",
        "requests/s",
        "generated tokens/s",
        "TTFT p50 (ms)",
        "TTFT p99 (ms)",
        "ITL p50 (ms)",
        "ITL p99 (ms)",
        "mean tokens/request",
    ]
    lines = [
        "## HTTP server under load (`benchmarks/load.py`)",
        "",
        f"- Command: `python benchmarks/load.py {shlex.join(sys.argv[1:])}`",
        f"- Machine: {args.machine}; Python {platform.python_version()}; "
        f"date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- Server: `python -m llama.server` ({args.ckpt_dir or 'bundled demo model'}), --max_batch_size "
        f"{args.max_batch_size}, --max_seq_len {args.max_seq_len}; load generator in the same machine "
        "(httpx, asyncio, one process).",
        f"- Requests: streamed, a cycle of infilling (`suffix` and `/infill`), chat and completion, "
        f"max {args.max_tokens} new tokens, temperature 0.2. One at a time for "
        f"{args.sequential_seconds:g} s, "
        f"then {args.clients} concurrent clients for {args.seconds:g} s.",
        "",
        "| phase | " + " | ".join(keys) + " |",
        "|---" * (len(keys) + 1) + "|",
    ]
    for row in rows:
        cells = [f"{row[k]:.1f}" if isinstance(row[k], float) else str(row[k]) for k in keys]
        lines.append(f"| {row['phase']} | " + " | ".join(cells) + " |")
    for row in rows:
        if row["errors"]:
            lines.append(f"\nErrors in {row['phase']}: {row['errors']}")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt_dir", help="checkpoint to serve (default: the bundled demo model)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--sequential_seconds", type=float, default=30.0)
    parser.add_argument("--max_tokens", type=int, default=48)
    parser.add_argument("--max_batch_size", type=int, default=8)
    parser.add_argument("--max_seq_len", type=int, default=1024)
    parser.add_argument("--machine", default=platform.processor() or platform.machine())
    parser.add_argument(
        "--out", default=str(REPO / "benchmarks" / "RESULTS.md"), help="append here; '-' prints"
    )
    args = parser.parse_args()
    if args.clients < 1 or args.seconds <= 0 or args.sequential_seconds <= 0:
        parser.error("--clients, --seconds and --sequential_seconds must be positive")

    proc, url = start_server(args)
    try:
        mix = request_mix(args.max_tokens)
        rows = []
        for name, clients, seconds in (
            ("one at a time", 1, args.sequential_seconds),
            (f"{args.clients} concurrent", args.clients, args.seconds),
        ):
            outcomes, wall = asyncio.run(run_phase(url, clients, seconds, mix))
            rows.append(summary(name, outcomes, wall))
            print(json.dumps(rows[-1]), flush=True)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        status = proc.wait(60)
    report = markdown(args, rows)
    if args.out == "-":
        print(report)
    else:
        with open(args.out, "a", encoding="utf-8") as f:
            f.write("\n" + report)
        print(report)
    clean = all(r["failed"] == 0 and r["lost"] == 0 for r in rows) and status == 0
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
