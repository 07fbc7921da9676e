"""The project's runtime against eager PyTorch, optimum and CTranslate2, side by side, on the same inputs.

    python benchmarks/latency.py                                  # the full comparison, minutes
    python benchmarks/latency.py --quick --out-json q.json        # tiny model, seconds (CI)
    python benchmarks/latency.py --backends eager,runtime-int8 --threads 1 --work-dir ~/.cache/star-bench

Every backend decodes the same context ids (random ordinary tokens, fixed seed; 160 by default;
with --contexts-from, star-eval's encoder inputs of ESConv test examples, which read fewer and
more common embedding rows: peak RSS of a mapped embedding depends on it),
greedily (repetition penalty 1.03, the project's), exactly --reply-len response tokens (the end of
sequence is banned, so every backend does the same work), in a process of its own: warm-up
replies, then --repeats timed ones. Per backend: time to the strategy, to the first response
token, per token and for the whole reply (median and p95), peak RSS of its process (loading
included), size on disk, and each as a ratio to eager PyTorch. See backends.py for what each
backend runs (optimum's and CTranslate2's have no STAR), harness.py for the timing points, floor.py for the
floor estimate shown under the table, and artifacts.py for where the model comes from (the
default bundle if one is installed, else, or with --random-base, random weights of the real
BlenderBot-Small-90M configuration) and how the work folder is cached.

Outputs: a table on the terminal, --out-json (everything, with the machine description, the load
average before and after, and the share of the CPU other processes used while each backend ran),
--out-png (a chart). On a shared machine, --max-other-cpu 0.05 waits for quiet before each backend
and times a backend again when other processes were busy (docs/performance.md was run so).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (REPETITION_PENALTY, TIMINGS, BenchmarkError, BenchmarkUsageError, WorkerSpec,  # noqa: E402
                     folder_bytes, machine_description, run_json_script, run_worker, summarize, wait_for_quiet)

from star_runtime.cli import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE  # noqa: E402

FLOOR_SCRIPT = Path(__file__).with_name("floor.py")


@dataclass(frozen=True)
class Backend:
    label: str
    precision: str | None = None  # the bundle's, for runtime backends
    star: bool = True
    devices: tuple[str, ...] = ("cpu", "cuda")
    notes: str = ""
    ctranslate2: str | None = None  # the weights' quantization, for CTranslate2 backends


def _ctranslate2_version() -> str:
    try:
        return metadata.version("ctranslate2")
    except metadata.PackageNotFoundError:
        return "(not installed)"


CTRANSLATE2_NOTES = ("CTranslate2's Translator on its conversion of the base model (ctranslate2_convert.py), without "
                     "STAR or strategy head; like optimum it generates reply-len + 1 tokens, the first standing in "
                     "for the strategy")


BACKENDS = {
    "eager": Backend("PyTorch eager (star_training.generate)"),
    "optimum": Backend("optimum ORTModelForSeq2SeqLM, NO STAR",
                       notes="the base model without STAR or strategy head (same weights, merged decoder); it "
                             "generates reply-len + 1 tokens, the first standing in for the strategy, so it runs "
                             "as many decoder positions as the others"),
    "runtime-fp32": Backend("star_runtime, float32 bundle", "float32"),
    "runtime-int8": Backend("star_runtime, int8 bundle", "int8", devices=("cpu",)),
    "runtime-fp16": Backend("star_runtime, float16 bundle", "float16", devices=("cuda",)),
    "runtime-fp32-nostar": Backend("star_runtime, float32 bundle exported with STAR bypassed (h' = h)", "float32",
                                   star=False),
    "runtime-int8-nostar": Backend("star_runtime, int8 bundle exported with STAR bypassed (h' = h)", "int8",
                                   star=False, devices=("cpu",)),
    "ctranslate2-fp32": Backend(f"CTranslate2 {_ctranslate2_version()} float32, NO STAR", devices=("cpu",),
                                notes=CTRANSLATE2_NOTES, ctranslate2="float32"),
    "ctranslate2-int8": Backend(f"CTranslate2 {_ctranslate2_version()} int8, NO STAR", devices=("cpu",),
                                notes=CTRANSLATE2_NOTES, ctranslate2="int8"),
}
DEFAULT_BACKENDS = {"cpu": "eager,optimum,runtime-fp32,runtime-int8", "cuda": "eager,optimum,runtime-fp32,runtime-fp16"}
# --quick: the "tiny" preset, and one thread, because CI shares its cores: two spinning threads on
# a core another process holds made a tiny eager reply 14x slower (0.64 s against 0.046 s, load 4.7).
QUICK = {"repeats": 3, "warmup": 1, "threads": 1, "floor_bytes": 64 * 2**20}
FULL = {"repeats": 10, "warmup": 2, "threads": os.cpu_count() or 1, "floor_bytes": 512 * 2**20}
TRIES = 3  # per backend, with --max-other-cpu


def at_least(minimum: int) -> Any:
    """An argparse type: an integer >= minimum, or a one-line usage error."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {minimum} or more, not {text}")
        return value

    return parse


def share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, not {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="latency.py", description="Latency, memory and size of STAR's runtime against "
                                "eager PyTorch, optimum and CTranslate2, on the same inputs (module docstring for "
                                "details).")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=at_least(1), default=None,
                   help=f"intra-op threads of every backend (default: all {FULL['threads']} cores; --quick 1)")
    p.add_argument("--context-len", type=at_least(1), default=160, help="context tokens (default %(default)s)")
    p.add_argument("--reply-len", type=at_least(1), default=40, help="response tokens (default %(default)s)")
    p.add_argument("--batch", type=at_least(1), default=1, help="contexts per call (default %(default)s)")
    p.add_argument("--repeats", type=at_least(1), default=None,
                   help=f"timed replies per backend (default {FULL['repeats']}, --quick {QUICK['repeats']})")
    p.add_argument("--warmup", type=at_least(0), default=None,
                   help=f"untimed replies first (default {FULL['warmup']}, --quick {QUICK['warmup']})")
    p.add_argument("--backends", default=None,
                   help=f"comma-separated, from {', '.join(BACKENDS)} (default cpu: {DEFAULT_BACKENDS['cpu']}; "
                        f"cuda: {DEFAULT_BACKENDS['cuda']})")
    p.add_argument("--out-json", type=Path, help="write the full result here")
    p.add_argument("--out-png", type=Path, help="write the chart here")
    p.add_argument("--quick", action="store_true", help="the tiny preset and few repeats: seconds, for CI")
    p.add_argument("--work-dir", type=Path,
                   help="keep the checkpoint, bundles, optimum export and CTranslate2 models here and reuse them "
                        "next time (default: a temporary folder, deleted at the end)")
    p.add_argument("--checkpoint", type=Path, help="benchmark this STAR checkpoint instead of the default model")
    p.add_argument("--random-base", action="store_true",
                   help="random weights of the real BlenderBot-Small-90M configuration, even where a default bundle "
                        "is installed (which is otherwise the model, at its own size)")
    p.add_argument("--tokenizer", type=Path, help="tokenizer folder for the random model (default: the shared data)")
    p.add_argument("--trim-vocab", type=Path, default=None, metavar="ESCONV_DIR",
                   help="export the runtime's bundles with the LM head trimmed to the tokens of this ESConv "
                        "folder's train responses, as the shipped default is (star-export --trim-vocab); the "
                        "other engines compute the whole vocabulary")
    p.add_argument("--contexts-from", type=Path, default=None, metavar="ESCONV_DIR",
                   help="contexts from this ESConv folder's test examples (star-eval's encoder inputs of "
                        "--context-len tokens) instead of random tokens")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and contexts")
    p.add_argument("--timeout", type=at_least(1), default=1800, help="seconds allowed per backend")
    p.add_argument("--max-other-cpu", type=share, default=None, metavar="FRACTION",
                   help="on a shared machine: before each backend, wait (up to 10 minutes) until other processes "
                        "use at most this share of the CPU, and time a backend again (up to "
                        f"{TRIES} tries) when they used more while it ran")
    return p


def parse_backends(text: str, device: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in BACKENDS]
    if unknown or not names:
        raise BenchmarkUsageError(f"unknown backend(s) {', '.join(unknown) or '(none given)'}; "
                             f"choose from {', '.join(BACKENDS)}")
    if len(set(names)) != len(names):
        raise BenchmarkUsageError(f"a backend is named twice in --backends {text}")
    wrong = [n for n in names if device not in BACKENDS[n].devices]
    if wrong:
        raise BenchmarkUsageError(f"{', '.join(wrong)} cannot run on {device}: "
                             + "; ".join(f"{n} runs on {' or '.join(BACKENDS[n].devices)}" for n in wrong))
    return names


def context_ids(tokenizer_dir: Path, batch: int, length: int, seed: int,
                esconv: Path | None = None) -> tuple[list[list[int]], dict[str, int]]:
    """`batch` contexts of `length` tokens and the special ids: random ordinary tokens (no special
    or strategy token), or with `esconv` star-eval's encoder inputs (star_training.data: the
    situation and the turns, with their separators and strategy tokens) of the first test examples
    whose context fills `length` tokens."""
    import numpy as np

    from star_runtime.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(tokenizer_dir)
    special_ids = {"pad": tok.pad_id, "start": tok.bos_id, "eos": tok.eos_id}
    if esconv is not None:
        from star_training.data import DataError, build_examples, load_conversations

        try:
            examples = build_examples(load_conversations(esconv, "test"), tok, max_source=length)
        except (DataError, OSError) as err:
            raise BenchmarkUsageError(f"--contexts-from {esconv}: {err}") from None
        contexts = [list(e.input_ids) for e in examples if len(e.input_ids) == length][:batch]
        if len(contexts) < batch:
            raise BenchmarkUsageError(f"--contexts-from {esconv}: {len(contexts)} test examples have "
                                      f"{length} context tokens, not {batch}")
        return contexts, special_ids
    special = {tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id, *tok.strategy_ids}
    ordinary = np.array([i for i in range(tok.vocab_size) if i not in special])
    ids = np.random.default_rng(seed).choice(ordinary, size=(batch, length))
    return ids.tolist(), special_ids


def model_config(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / "config.json").read_text())


# What eager PyTorch needs of a checkpoint folder (not a training run's trainer_state.pt beside them).
CHECKPOINT_FILES = ("config.json", "star_config.json", "model.safetensors", "vocab.json", "merges.txt",
                    "added_tokens.json", "special_tokens_map.json", "tokenizer_config.json")


def disk_bytes(name: str, path: Path) -> int:
    """Size of what the backend loads: the checkpoint's weights, configs and tokenizer; the whole
    bundle (tokenizer included), optimum folder (which has no tokenizer: 1.3 MB less) or
    CTranslate2 folder (model.bin, config.json and its vocabulary, one string per id)."""
    if name == "eager":
        return sum(folder_bytes(path / f) for f in CHECKPOINT_FILES if (path / f).is_file())
    return folder_bytes(path)


def ratios(backends: dict[str, dict[str, Any]]) -> None:
    """Add "ratio_to_eager" (backend / eager per metric; None without eager) to every backend."""
    eager = backends.get("eager")
    for b in backends.values():
        b["ratio_to_eager"] = {
            **{k: eager and b["timings"][k]["median"] / eager["timings"][k]["median"] for k in TIMINGS},
            **{k: eager and b[k] / eager[k] for k in ("peak_rss_bytes", "disk_bytes")},
        }
        b["tokens_match_eager"] = eager and b["tokens"] == eager["tokens"]


def time_backend(name: str, path: Path, spec: WorkerSpec, args: argparse.Namespace, log: Any) -> dict[str, Any]:
    """One backend's worker (again, up to TRIES times, while other processes were busy)."""
    for attempt in range(1, TRIES + 1):
        if args.max_other_cpu is not None:
            wait_for_quiet(args.max_other_cpu, 600, log)
        log(f"timing {name} ({spec.warmup} warm-up + {spec.repeats} replies)")
        r = run_worker(spec, args.timeout)
        busy = r["other_cpu_share"]
        if args.max_other_cpu is None or busy is None or busy <= args.max_other_cpu or attempt == TRIES:
            break
        log(f"other processes used {busy:.0%} of the CPU while {name} ran: timing it again")
    return {
        "label": BACKENDS[name].label, "notes": BACKENDS[name].notes, "path": str(path),
        "timings": {k: summarize(r["runs"][k]) for k in TIMINGS}, "runs": r["runs"],
        "peak_rss_bytes": r["peak_rss_bytes"], "disk_bytes": disk_bytes(name, path), "load_s": r["load_s"],
        "other_cpu_share": busy, "tries": attempt, "tokens": r["tokens"],
    }


def run(args: argparse.Namespace, command: list[str], log: Any) -> dict[str, Any]:
    from artifacts import Artifacts, resolve_source

    names = parse_backends(args.backends or DEFAULT_BACKENDS[args.device], args.device)
    runtimes = [n for n in names if BACKENDS[n].precision]
    if args.batch > 1 and runtimes:
        raise BenchmarkUsageError(f"{', '.join(runtimes)}: star_runtime decodes one conversation per call (no batch "
                             "API); use --batch 1, or --backends eager,optimum,ctranslate2-* for batches")
    if args.checkpoint is not None and args.random_base:
        raise BenchmarkUsageError("--checkpoint and --random-base choose the model twice: give one")
    defaults = QUICK if args.quick else FULL
    repeats = args.repeats or defaults["repeats"]
    args.threads = args.threads or defaults["threads"]
    warmup = defaults["warmup"] if args.warmup is None else args.warmup
    load_before = list(os.getloadavg())
    source = resolve_source(args.checkpoint, args.tokenizer, "tiny" if args.quick else "base",
                            default_bundle_first=not (args.quick or args.random_base))
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="star-bench-"))
    try:
        artifacts = Artifacts(work_dir, source, args.seed, log, validate=not args.quick, trim_vocab=args.trim_vocab)
        checkpoint = artifacts.checkpoint()
        config = model_config(checkpoint)
        positions = config["max_position_embeddings"]
        if args.context_len > positions or args.reply_len + 2 > positions:
            raise BenchmarkUsageError(f"the model has {positions} positions: --context-len "
                                 f"{args.context_len} / --reply-len {args.reply_len} do not fit")
        paths = {name: checkpoint if name == "eager" else artifacts.optimum() if name == "optimum"
                 else artifacts.ctranslate2(BACKENDS[name].ctranslate2) if BACKENDS[name].ctranslate2
                 else artifacts.bundle(BACKENDS[name].precision, star=BACKENDS[name].star) for name in names}
        for name in runtimes:  # the runtime keeps the last max_source_length tokens, as in training
            manifest = json.loads((paths[name] / "manifest.json").read_text())
            limit = manifest["generation"]["max_source_length"]
            # The floor of the runtime's own LM head (a trimmed one reads fewer rows).
            config["output_size"] = min(config.get("output_size", config["vocab_size"]), manifest["io"]["output_size"])
            if args.context_len > limit:
                raise BenchmarkUsageError(f"{name}: the bundle reads at most {limit} context tokens, not "
                                     f"--context-len {args.context_len}")
        ids, special = context_ids(checkpoint, args.batch, args.context_len, args.seed, args.contexts_from)
        backends = {name: time_backend(name, paths[name], WorkerSpec(
            name, str(paths[name]), args.device, args.threads, warmup, repeats, args.reply_len, ids, special),
            args, log) for name in names}
    finally:
        if args.work_dir is None:
            shutil.rmtree(work_dir, ignore_errors=True)
    ratios(backends)
    log("measuring memory bandwidth and matmul throughput for the floor")
    if args.max_other_cpu is not None:
        wait_for_quiet(args.max_other_cpu, 600, log)
    floor_spec = {"threads": args.threads, "s": args.context_len, "d": config["d_model"],
                  "f": config["encoder_ffn_dim"], "bytes": defaults["floor_bytes"]}
    measured = run_json_script(FLOOR_SCRIPT, floor_spec, args.threads, args.timeout, "floor")
    from floor import estimate

    machine = machine_description()
    machine["load_average_before"], machine["load_average_after"] = load_before, machine.pop("load_average_1_5_15")
    return {
        "command": " ".join(["python", "benchmarks/latency.py", *command]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "settings": {"device": args.device, "threads": args.threads, "context_len": args.context_len,
                     "reply_len": args.reply_len, "batch": args.batch, "repeats": repeats, "warmup": warmup,
                     "seed": args.seed, "decoding": f"greedy, repetition penalty {REPETITION_PENALTY}, fixed length",
                     "contexts": f"ESConv test examples ({args.contexts_from})" if args.contexts_from
                     else "random ordinary tokens"},
        "model": {"description": source.description, "config": {k: config[k] for k in (
            "d_model", "encoder_layers", "decoder_layers", "encoder_ffn_dim", "decoder_ffn_dim", "vocab_size",
            "max_position_embeddings")}, "lm_head_rows": config.get("output_size", config["vocab_size"]),
            "trim_vocab": str(args.trim_vocab) if args.trim_vocab else None},
        "backends": backends,
        "floor": {"measured": measured, **estimate(config, args.context_len, args.reply_len, measured)},
    }


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    args = build_parser().parse_args(argv)
    err = Console(stderr=True, highlight=False)
    started = time.perf_counter()
    try:
        def log(line: str) -> None:
            err.print(f"[dim]{time.perf_counter() - started:6.1f} s  {line}[/]")

        result = run(args, sys.argv[1:] if argv is None else argv, log)
        from render import print_table, write_json, write_png

        print_table(result, Console(highlight=False))
        if args.out_json:
            write_json(result, args.out_json)
        if args.out_png:
            write_png(result, args.out_png)
    except BenchmarkUsageError as e:
        err.print(f"latency.py: {e}", markup=False, soft_wrap=True)
        return EXIT_USAGE
    except (BenchmarkError, OSError) as e:
        err.print(f"latency.py: {e}", markup=False, soft_wrap=True)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
