"""benchmarks/latency.py: the --quick run produces every field for every backend, and bad options
are one line and exit 1. No timing value is asserted: they depend on the machine and its load."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LATENCY = REPO / "benchmarks" / "latency.py"
DEFAULT_BACKENDS = ["eager", "optimum", "runtime-fp32", "runtime-int8"]
TIMINGS = ["strategy_ms", "first_token_ms", "per_token_ms", "reply_ms"]


def latency(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(LATENCY), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO)


def is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x  # not NaN


def test_quick_run_reports_every_field_for_every_backend(tmp_path: Path, tokenizer_dir: Path) -> None:
    out_json, out_png = tmp_path / "latency.json", tmp_path / "latency.png"
    proc = latency("--quick", "--tokenizer", str(tokenizer_dir), "--work-dir", str(tmp_path / "work"),
                   "--out-json", str(out_json), "--out-png", str(out_png))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out_json.read_text())
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert list(result["backends"]) == DEFAULT_BACKENDS
    settings = result["settings"]
    assert (settings["context_len"], settings["reply_len"], settings["batch"]) == (160, 40, 1)
    for name, b in result["backends"].items():
        for metric in TIMINGS:
            assert is_number(b["timings"][metric]["median"]) and is_number(b["timings"][metric]["p95"]), (name, metric)
            assert len(b["runs"][metric]) == settings["repeats"], (name, metric)
        assert is_number(b["peak_rss_bytes"]) and b["peak_rss_bytes"] > 0, name
        assert is_number(b["disk_bytes"]) and b["disk_bytes"] > 0, name
        assert is_number(b["load_s"]) and 0 <= b["other_cpu_share"] <= 1, name
        assert set(b["ratio_to_eager"]) == {*TIMINGS, "peak_rss_bytes", "disk_bytes"}, name
        assert all(is_number(r) for r in b["ratio_to_eager"].values()), name
        assert [len(reply) for reply in b["tokens"]] == [settings["reply_len"]], name  # fixed length, batch 1
        assert isinstance(b["tokens_match_eager"], bool), name
        assert b["label"] and Path(b["path"]).name, name
    eager_ratios = result["backends"]["eager"]["ratio_to_eager"]
    assert eager_ratios == dict.fromkeys(eager_ratios, 1.0)
    assert "NO STAR" in result["backends"]["optimum"]["label"]

    machine = result["machine"]
    for key in ("cpu_model", "logical_cores", "os", "python", "load_average_before", "load_average_after"):
        assert machine[key], key
    assert machine["libraries"]["onnxruntime"] and machine["libraries"]["torch"]
    for precision in ("float32", "int8"):
        assert all(is_number(result["floor"][precision][k]) for k in TIMINGS), precision
    for key in ("bandwidth_bytes_per_s", "float32_ops_per_s", "int8_ops_per_s"):
        assert is_number(result["floor"]["measured"][key]), key
    for name in DEFAULT_BACKENDS:
        assert name in proc.stdout  # the table


@pytest.mark.parametrize("args, message", [
    (["--backends", "eager,nope"], "unknown backend(s) nope"),
    (["--backends", "eager,eager"], "named twice"),
    (["--device", "cuda", "--backends", "runtime-int8"], "runtime-int8 cannot run on cuda"),
    (["--device", "cuda", "--backends", "ctranslate2-fp32"], "ctranslate2-fp32 cannot run on cuda"),
    (["--checkpoint", "/nonexistent/ckpt"], "not a STAR checkpoint folder"),
    (["--checkpoint", "/nonexistent/ckpt", "--random-base"], "choose the model twice"),
    (["--context-len", "0"], "must be 1 or more"),
    (["--batch", "2"], "star_runtime decodes one conversation per call"),
])
def test_bad_options_are_one_clear_line(args: list[str], message: str) -> None:
    proc = latency(*args, timeout=60)
    assert proc.returncode == 2  # each is a user error (star_runtime.cli)
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_contexts_from_esconv_are_star_evals_encoder_inputs(tmp_path: Path, tokenizer_dir: Path) -> None:
    from esconv_fixture import write_esconv

    sys.path.insert(0, str(REPO / "benchmarks"))
    from harness import BenchmarkUsageError
    from latency import context_ids

    from star_runtime.tokenizer import Tokenizer
    from star_training.data import build_examples, load_conversations

    folder = write_esconv(tmp_path / "esconv")
    ids, special = context_ids(tokenizer_dir, 2, 12, 0, folder)
    tok = Tokenizer.from_dir(tokenizer_dir)
    full = [list(e.input_ids) for e in build_examples(load_conversations(folder, "test"), tok, max_source=12)
            if len(e.input_ids) == 12]
    assert ids == full[:2] and all(len(c) == 12 for c in ids)
    assert any(i in tok.strategy_ids for c in ids for i in c) or any(tok.eos_id in c for c in ids)  # real inputs
    assert special == {"pad": tok.pad_id, "start": tok.bos_id, "eos": tok.eos_id}
    with pytest.raises(BenchmarkUsageError, match="test examples have 100000 context tokens"):
        context_ids(tokenizer_dir, 1, 100_000, 0, folder)
    with pytest.raises(BenchmarkUsageError, match="--contexts-from"):
        context_ids(tokenizer_dir, 1, 12, 0, tmp_path / "nothing")


def test_batch_step_times_every_part_and_the_bound(bundle_int8: Path) -> None:
    script = REPO / "benchmarks" / "batch_step.py"
    proc = subprocess.run([sys.executable, str(script), str(bundle_int8), "--rows", "2,3", "--repeats", "2"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert is_number(result["encoder_ms"]) and is_number(result["safety_ms"])
    assert set(result["step_ms"]) == {"1", "2", "3"} and all(is_number(v) for v in result["step_ms"].values())
    assert result["bound"]["clients"] == 3 and 0 < result["bound"]["gain"] < 3  # never more than the clients
    bad = subprocess.run([sys.executable, str(script), str(bundle_int8), "--rows", "1"], capture_output=True,
                         text=True, timeout=60, cwd=REPO)
    assert bad.returncode == 2 and "--rows" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("which", ["bundle", "bundle_int8"])
def test_kernel_bound_times_every_weight_matmul_and_attention(which: str, request: pytest.FixtureRequest) -> None:
    """benchmarks/kernel_bound.py builds its matmul-only and attention-only graphs from every such
    node of the bundle: as many as the configuration has (per decoder layer: self q|k|v, o, cross
    q, o, FFN 2; STAR's 5; the LM head; per encoder layer: q|k|v, o, FFN 2; each decoder layer's
    cross K|V), on both precisions' node types."""
    folder: Path = request.getfixturevalue(which)
    script = REPO / "benchmarks" / "kernel_bound.py"
    proc = subprocess.run([sys.executable, str(script), str(folder), "--repeats", "2", "--floor-mb", "8",
                           "--threads", "1"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    config = json.loads((folder / "manifest.json").read_text())["model_config"]
    enc, dec = config["encoder_layers"], config["decoder_layers"]
    assert result["matmuls"]["step_nodes"] == 6 * dec + 5 * config["star"]["use_star"] + 1
    assert result["matmuls"]["encoder_nodes"] in (4 * enc + 1, 4 * enc + dec)  # cross K|V packed or per layer
    assert result["attention"]["encoder_nodes"] == enc and result["attention"]["step_nodes"] == 2 * dec
    for part in ("graphs", "matmuls", "attention", "floor"):
        assert all(is_number(v) and v > 0 for k, v in result[part].items() if k.endswith("_ms")), part
    assert is_number(result["bound"]["to_floor"]) and is_number(result["reply_to_floor"])
    bad = subprocess.run([sys.executable, str(script), str(folder / "missing")], capture_output=True, text=True,
                         timeout=60, cwd=REPO)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr


SERVE_BENCH = REPO / "benchmarks" / "serve.py"


def test_serve_benchmark_quick_run_reports_every_level(tmp_path: Path, bundle_int8: Path) -> None:
    """benchmarks/serve.py --quick on the tiny int8 bundle: the direct baseline and each concurrency
    level through a real star-serve, every field there. No timing value is asserted."""
    pytest.importorskip("uvicorn")
    out = tmp_path / "serve.json"
    proc = subprocess.run([sys.executable, str(SERVE_BENCH), "--quick", "--bundle", str(bundle_int8), "--threads", "1",
                           "--out-json", str(out)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [(r["path"], r["batching"], r["clients"]) for r in rows] == [
        ("direct", "-", 1), ("star-serve", "off", 1), ("star-serve", "off", 2), ("star-serve", "on", 1),
        ("star-serve", "on", 2)]
    for r in rows:
        assert r["precision"] == "int8" and r["requests"] == 2 * r["clients"]  # 2 turns each (1 direct conversation)
        assert is_number(r["tokens_per_s"]) and r["tokens"] > 0
        for key in ("reply_ms", "ttft_ms"):
            assert is_number(r[key]["median"]) and is_number(r[key]["p95"]), (r, key)
    assert is_number(rows[1]["server_vs_direct"])
    assert result["machine"]["libraries"]["onnxruntime"] and result["settings"]["turns"] == 2
    assert "| int8 | star-serve | off | 2 |" in proc.stdout
    bad = subprocess.run([sys.executable, str(SERVE_BENCH), "--bundle", str(tmp_path)], capture_output=True,
                         text=True, timeout=60, cwd=REPO)
    assert bad.returncode == 2 and "not a bundle folder" in bad.stderr and "Traceback" not in bad.stderr


def test_written_conversations_go_to_every_bundle_greedy_and_sampled(tmp_path: Path, bundle: Path) -> None:
    written = [{"title": "Exams", "situation": "My exams are next week.", "turns": ["I can't sleep.", "I feel alone."]},
               {"title": "Crisis", "situation": None, "turns": ["hi", "I want to kill myself tonight"]}]
    (tmp_path / "c.json").write_text(json.dumps(written))
    out = tmp_path / "replies.md"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "conversations.py"), "--bundle", f"a={bundle}",
                           "--bundle", f"b={bundle}", "--conversations", str(tmp_path / "c.json"), "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    assert text.count("| a | ") == text.count("| b | ") == 4  # one row per user turn and bundle
    rows = [line for line in text.splitlines() if line.startswith("| a | ")]
    assert "the crisis reply" in rows[3] and "the crisis reply" not in rows[0]
    assert rows == [line.replace("| b | ", "| a | ") for line in text.splitlines() if line.startswith("| b | ")]
    bad = subprocess.run([sys.executable, str(REPO / "benchmarks" / "conversations.py"), "--bundle", "nofolder",
                          "--out", str(out)], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert bad.returncode == 2 and "NAME=FOLDER" in bad.stderr and "Traceback" not in bad.stderr


def test_lm_head_measures_the_trained_vocabulary_and_what_restricting_to_it_changes(
        tmp_path: Path, bundle_int8: Path, esconv_dir: Path) -> None:
    corpus = tmp_path / "chats.jsonl"
    corpus.write_text(json.dumps({"turns": [["a", "hello there"], ["b", "zebra crossings everywhere"]]}) + "\n")
    out = tmp_path / "lm.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "lm_head.py"), "--bundle", str(bundle_int8),
                           "--data", str(esconv_dir), "--corpus", str(corpus), "--limit", "3", "--repeats", "5",
                           "--threads", "1", "--out-json", str(out)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    counts = result["distinct_target_ids"]
    assert 0 < counts[f"{corpus} (stage 0)"] <= 12 < counts["esconv-train (stage 1 responses)"] <= result["kept"] < result["vocab"]
    assert is_number(result["head_ms_full"]) and is_number(result["head_ms_kept"])
    greedy = result["greedy"]
    assert greedy["contexts"] == 3 and greedy["tokens"] > 0
    # greedy: masking ids the full head never chose cannot change a reply
    if greedy["tokens_outside_kept"] == 0:
        assert greedy["same_reply"] == 3
    else:
        assert greedy["same_reply"] < 3
