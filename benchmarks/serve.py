"""star-serve under concurrent clients, against the runtime called directly.

    python benchmarks/serve.py                                  # the shipped int8 bundle
    python benchmarks/serve.py --bundle model.onnx --bundle model-int8 --max-other-cpu 0.05 \\
        --out-json serve.json

For each bundle: the `Runtime` in this process answers one client's conversations (the baseline:
no HTTP, no queue), then a star-serve process answers 1, 4, 8 and 16 clients at once. Every client
holds one conversation of --turns user messages, streamed as server-sent events over httpx, its
history kept as OpenAI's clients keep it: role and content (with --send-strategy also each
reply's strategy, which spares the server predicting it again). OpenAI's own Python client parses
every chunk into objects, client time the server is not to blame for, so it is not the client
here (tests/test_serve.py checks that it works). Each
client samples with the bundle's settings and its own seed, the same seeds for every bundle.

Per level:

    reply_ms      request sent -> the stream's end, median and p95 over every turn of every client
    ttft_ms       request sent -> the first text of the reply (the safety screen releases text at a
                  clause end, so this is the time to the first screened clause, direct or served)
    tokens_per_s  response tokens of all clients / the level's wall time (first request -> last end)

The goal to measure: batch-1 reply time through the server within 10% of the runtime's
(`server_vs_direct` in the JSON: the 1-client median over the direct median).

Batching "off" runs star-serve with --batch 1 (one reply at a time), "on" with --batch equal to
the level's clients (continuous batching, star_runtime.batching); every row names its mode.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import machine_description, summarize, wait_for_quiet  # noqa: E402

from star_runtime.cli import EXIT_USAGE  # noqa: E402
from star_runtime.serve.ready import NotReady, wait_until_ready  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "star_runtime" / "data" / "default_bundle"
MODES = ("off", "on")  # batching: "off" = one reply at a time, "on" = every client's reply in one step
SITUATION = "I lost my job last month and I have been struggling since."
TURNS = [
    "I can't sleep at night, I keep thinking about money.",
    "My wife says I should just apply anywhere, but I feel stuck.",
    "I used to be good at my job. Now I feel useless.",
    "Maybe I should talk to my old manager about a reference.",
    "Thank you, I think I will try that tomorrow.",
    "I am still scared it will not work out.",
    "My friends don't really understand what I am going through.",
    "I guess I need to keep trying.",
]


def _clients(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, not {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", action="append", type=Path, help="bundle folder (repeatable; default the shipped one)")
    p.add_argument("--clients", type=_clients, default=[1, 4, 8, 16], help="concurrency levels (default 1,4,8,16)")
    p.add_argument("--turns", type=int, choices=range(1, len(TURNS) + 1), default=5, metavar="N",
                   help=f"user messages per conversation (1..{len(TURNS)}, default 5)")
    p.add_argument("--max-tokens", type=int, default=40, help="max_tokens of every request (default 40, the paper's)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="intra-op threads, the server's and the direct runtime's (default: one per core)")
    p.add_argument("--direct-repeats", type=int, default=3, help="baseline conversations, direct (default 3)")
    p.add_argument("--send-strategy", action="store_true", help="send each reply's strategy back in the history")
    p.add_argument("--max-other-cpu", type=float, default=None, metavar="SHARE",
                   help="before each level, wait until other processes use at most this share of the CPU")
    p.add_argument("--out-json", type=Path, default=None, help="write every measurement and the machine here")
    p.add_argument("--quick", action="store_true", help="a check that it runs: clients 1,2, 2 turns, 8 tokens")
    return p


def server_command(bundle: Path, args: argparse.Namespace, mode: str) -> list[str]:
    """The star-serve command line for `bundle` in batching `mode` ("off" or "on")."""
    assert mode in MODES
    batch = max(args.clients) if mode == "on" else 1
    return [sys.executable, "-m", "star_runtime.serve", "--model", str(bundle), "--port", "0",
            "--threads", str(args.threads), "--max-queue", str(4 * max(args.clients)), "--timeout", "600",
            "--batch", str(batch)]


class Server:
    """A star-serve process, ready (its /health is 200) when the constructor returns."""

    def __init__(self, command: list[str]) -> None:
        self.proc = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        for line in self.proc.stderr:
            if m := re.search(r"listening on (http://\S+)", line):
                self.url = m.group(1)
                break
        else:
            raise SystemExit(f"serve.py: star-serve did not start: {self.proc.wait()}")
        threading.Thread(target=lambda: [None for _ in self.proc.stderr], daemon=True).start()  # drain its log
        try:
            wait_until_ready(self.url, 300, self.proc)
        except NotReady as err:
            self.close()
            raise SystemExit(f"serve.py: {err}") from None

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def served_conversation(client: Any, url: str, k: int, args: argparse.Namespace) -> list[dict[str, float]]:
    """Client k's conversation, streamed; one record per turn (seconds and tokens)."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": SITUATION}]
    records = []
    for turn in TURNS[:args.turns]:
        messages.append({"role": "user", "content": turn})
        body = {"model": "star", "messages": messages, "seed": k, "stream": True, "max_tokens": args.max_tokens,
                "stream_options": {"include_usage": True}}
        start = time.perf_counter()
        first, text, tokens, strategy = None, [], None, None
        with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                raise SystemExit(f"serve.py: star-serve answered {response.status_code}: {response.read()[:300]!r}")
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise SystemExit(f"serve.py: star-serve failed mid-stream: {chunk['error']['message']}")
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    first = first or time.perf_counter()
                    text.append(chunk["choices"][0]["delta"]["content"])
                if "star" in chunk:
                    strategy = chunk["star"]["strategy"]
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
        end = time.perf_counter()
        records.append({"start": start, "end": end, "reply_s": end - start,
                        "ttft_s": (first or end) - start, "tokens": tokens or 0})
        reply = {"role": "assistant", "content": "".join(text)}
        messages.append(reply | ({"strategy": strategy} if args.send_strategy and strategy else {}))
    return records


def direct_conversation(rt: Any, k: int, args: argparse.Namespace) -> list[dict[str, float]]:
    """The same conversation on the runtime in this process: the baseline."""
    conv = rt.conversation(situation=SITUATION, seed=k, max_new_tokens=args.max_tokens)
    records = []
    for turn in TURNS[:args.turns]:
        first: list[float] = []
        start = time.perf_counter()
        reply = conv.reply(turn, on_token=lambda piece: first.append(time.perf_counter()) if not first else None)
        end = time.perf_counter()
        records.append({"start": start, "end": end, "reply_s": end - start,
                        "ttft_s": (first[0] if first else end) - start, "tokens": len(reply.tokens)})
    return records


def level(records: list[dict[str, float]], **labels: Any) -> dict[str, Any]:
    wall = max(r["end"] for r in records) - min(r["start"] for r in records)
    tokens = sum(r["tokens"] for r in records)
    ms = lambda key: {k: v * 1e3 for k, v in summarize([r[key] for r in records]).items()}  # noqa: E731
    return {**labels, "requests": len(records), "tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall if wall > 0 else None, "reply_ms": ms("reply_s"), "ttft_ms": ms("ttft_s")}


def bench_bundle(bundle: Path, args: argparse.Namespace, log: Any) -> list[dict[str, Any]]:
    import httpx

    from star_runtime import Runtime

    rt = Runtime.load(bundle, threads=args.threads)
    precision = rt.spec.precision
    rows = []
    direct_conversation(rt, 0, args)  # warm-up
    if args.max_other_cpu is not None:
        wait_for_quiet(args.max_other_cpu, 600, log)
    direct = [r for k in range(args.direct_repeats) for r in direct_conversation(rt, k, args)]
    rows.append(level(direct, bundle=str(bundle), precision=precision, batching="-", clients=1, path="direct"))
    log(f"{precision} direct: {rows[-1]['reply_ms']['median']:.0f} ms median reply")
    del rt
    for mode in MODES:
        server = Server(server_command(bundle, args, mode))
        try:
            client = httpx.Client(timeout=600, limits=httpx.Limits(max_connections=max(args.clients)))
            served_conversation(client, server.url, 0, args)  # warm-up
            for clients in args.clients:
                if args.max_other_cpu is not None:
                    wait_for_quiet(args.max_other_cpu, 600, log)
                with ThreadPoolExecutor(clients) as pool:
                    records = [r for rs in pool.map(lambda k: served_conversation(client, server.url, k, args),
                                                    range(clients)) for r in rs]
                rows.append(level(records, bundle=str(bundle), precision=precision, batching=mode,
                                  clients=clients, path="star-serve"))
                log(f"{precision} served, {clients} clients: {rows[-1]['tokens_per_s']:.0f} tokens/s")
        finally:
            server.close()
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| bundle | path | batching | clients | tokens/s | reply p50 / p95 ms | first text p50 / p95 ms |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['precision']} | {r['path']} | {r['batching']} | {r['clients']} | {r['tokens_per_s']:.0f} | "
                     f"{r['reply_ms']['median']:.0f} / {r['reply_ms']['p95']:.0f} | "
                     f"{r['ttft_ms']['median']:.0f} / {r['ttft_ms']['p95']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.clients, args.turns, args.max_tokens, args.direct_repeats = [1, 2], 2, 8, 1
    bundles = args.bundle or [SHIPPED]
    for bundle in bundles:
        if not (bundle / "manifest.json").is_file():
            print(f"serve.py: error: {bundle} is not a bundle folder (no manifest.json)", file=sys.stderr)
            return EXIT_USAGE
    log = lambda line: print(f"serve.py: {line}", file=sys.stderr, flush=True)  # noqa: E731
    started = datetime.now(timezone.utc)
    rows = [row for bundle in bundles for row in bench_bundle(bundle, args, log)]
    for r in rows:
        if r["path"] == "star-serve" and r["clients"] == 1:
            base = next(d for d in rows if d["path"] == "direct" and d["bundle"] == r["bundle"])
            r["server_vs_direct"] = r["reply_ms"]["median"] / base["reply_ms"]["median"]
    print(table(rows))
    if args.out_json:
        settings = {k: v for k, v in vars(args).items() if k not in ("out_json", "bundle")}
        args.out_json.write_text(json.dumps({
            "started": started.isoformat(), "finished": datetime.now(timezone.utc).isoformat(),
            "command": sys.argv, "settings": settings, "machine": machine_description(), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
