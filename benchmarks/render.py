"""The benchmark's three outputs from one result dict: a rich table, a JSON file, a PNG chart.

The result dict (what the JSON holds) has "machine", "settings", "model", "backends" (per
backend: "timings" {metric: {"median", "p95"}}, "peak_rss_bytes", "disk_bytes", "ratio_to_eager",
...) and "floor" (floor.estimate plus the measured bandwidth and throughput).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from harness import TIMINGS

MB = 1e6
COLUMNS = {"strategy_ms": "strategy", "first_token_ms": "1st token", "per_token_ms": "per token",
           "reply_ms": "reply"}


def _num(v: float) -> str:
    return f"{v:.1f}" if v < 100 else f"{v:.0f}"


def _cell(value: float, p95: float | None, ratio: float | None) -> str:
    """Median, then p95 and the ratio to eager dimmed, one per line (narrow enough for 80 columns)."""
    lines = [_num(value)] + ([f"[dim]{_num(p95)}[/]"] if p95 is not None else [])
    return "\n".join(lines + ([f"[dim]x{ratio:.2f}[/]"] if ratio is not None else []))


def table(result: dict[str, Any]) -> Table:
    """One row per backend: median and p95 in ms, peak RSS and size in MB, each with its ratio to
    eager PyTorch below it (xR = backend / eager: below 1 is better); then the floor estimates."""
    s = result["settings"]
    t = Table(box=box.SIMPLE_HEAD, padding=0,
              title=f"{s['device']}, {s['threads']} threads, batch {s['batch']}, {s['context_len']}-token context "
                    f"({s.get('contexts', 'random ordinary tokens')}), {s['reply_len']}-token greedy reply, {s['repeats']} repeats; times in ms; each cell: "
                    "median, [dim]p95, x(backend / eager)[/]")
    t.add_column("backend", no_wrap=True, min_width=max(len(n) for n in [*result["backends"], "floor float32"]))
    for header in [*(COLUMNS[k] for k in TIMINGS), "RSS MB", "disk MB"]:
        t.add_column(header, justify="right", min_width=9)
    for name, b in result["backends"].items():
        r = b["ratio_to_eager"]
        t.add_row(name, *(_cell(b["timings"][k]["median"], b["timings"][k]["p95"], r[k]) for k in TIMINGS),
                  _cell(b["peak_rss_bytes"] / MB, None, r["peak_rss_bytes"]),
                  _cell(b["disk_bytes"] / MB, None, r["disk_bytes"]))
    for precision in ("float32", "int8"):
        f = result["floor"][precision]
        t.add_row(f"[italic]floor {precision}[/]", *(f"[italic]{_num(f[k])}[/]" for k in TIMINGS), "", "",
                  end_section=False)
    return t


def print_table(result: dict[str, Any], console: Console) -> None:
    console.print(f"[bold]model[/]: {result['model']['description']}")
    console.print(table(result))
    for name, b in result["backends"].items():
        console.print(f"[dim]{name}: {b['label']}" + (f"; {b['notes']}" if b["notes"] else "") + "[/]")
    console.print("[dim]floor: encoder flops / measured matmul throughput + (1 + reply) x decoder bytes / measured "
                  "bandwidth (benchmarks/floor.py)[/]")
    m = result["machine"]
    shares = ", ".join(f"{name} {b['other_cpu_share']:.0%}" for name, b in result["backends"].items()
                       if b["other_cpu_share"] is not None)
    console.print(f"[dim]{m['cpu_model']}, {m['logical_cores']} cores; load average "
                  f"{m['load_average_before'][0]:.2f} before, {m['load_average_after'][0]:.2f} after"
                  + (f"; CPU used by other processes while each backend ran: {shares}" if shares else "") + "[/]")


def write_json(result: dict[str, Any], path: Path) -> None:
    from star_runtime.atomic import write_text_atomically

    write_text_atomically(path, json.dumps(result, indent=2) + "\n")


def write_png(result: dict[str, Any], path: Path) -> None:
    """Left: the reply's median time (bar), its p95 (whisker), split into time to first token and
    the rest, with the float32 and int8 floors as lines. Right: peak RSS and size on disk."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["backends"])
    backends = [result["backends"][n] for n in names]
    y = range(len(names))
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 2.4 + 0.6 * len(names)), sharey=True)
    first = [b["timings"]["first_token_ms"]["median"] for b in backends]
    reply = [b["timings"]["reply_ms"]["median"] for b in backends]
    p95 = [b["timings"]["reply_ms"]["p95"] for b in backends]
    ax_t.barh(y, first, color="tab:orange", label="to first token")
    ax_t.barh(y, [r - f for r, f in zip(reply, first)], left=first, color="tab:blue", label="rest of the reply",
              xerr=[[0] * len(reply), [p - r for p, r in zip(p95, reply)]], capsize=3)
    for precision, style in (("float32", "--"), ("int8", ":")):
        ax_t.axvline(result["floor"][precision]["reply_ms"], color="black", linestyle=style,
                     label=f"floor {precision}")
    s = result["settings"]
    ax_t.set_xlabel(f"ms per reply ({s['context_len']}-token context, {s['reply_len']} tokens; median, p95 whisker)")
    ax_t.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=4, fontsize="small")
    h = 0.4
    ax_m.barh([i - h / 2 for i in y], [b["peak_rss_bytes"] / MB for b in backends], h, color="tab:green",
              label="peak RSS (process, loading included)")
    ax_m.barh([i + h / 2 for i in y], [b["disk_bytes"] / MB for b in backends], h, color="tab:gray",
              label="size on disk")
    ax_m.set_xlabel("MB")
    ax_m.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2, fontsize="small")
    ax_t.set_yticks(list(y), names)
    ax_t.invert_yaxis()
    m = result["machine"]
    fig.suptitle(f"STAR latency on {m['cpu_model']}, {s['threads']} threads ({s['device']}), {result['date'][:10]}")
    fig.tight_layout()
    from star_runtime.atomic import write_atomically

    try:
        write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=110))
    finally:
        plt.close(fig)
