"""A bundle on many onnxruntime releases, each in its own venv: self-check, greedy reply, one table.

    python benchmarks/platforms.py                     # every release from pyproject's minimum to the newest
    python benchmarks/platforms.py --releases 1.22.0 1.32.0 --bundle BUNDLE
    python benchmarks/platforms.py --from 1.17.0       # older releases too (to see how they fail)
    python benchmarks/platforms.py --numpy 'numpy==1.26.4' --releases 1.23.0
    python benchmarks/platforms.py --arch aarch64      # linux/aarch64 under qemu (benchmarks/arm64.py)
    python benchmarks/platforms.py --ops               # MatMulNBits 8-bit block sizes, release by release
    python benchmarks/platforms.py --esconv 200        # also greedy replies to 200 ESConv test contexts

Each release gets a venv under ~/.cache/star-platforms/ (`python -m venv --without-pip`, then
`pip --python VENV install onnxruntime==X numpy`), reused by later runs. In it a child process
imports the repository's star_runtime (and nothing else of the project: it needs only numpy and
onnxruntime) and, for the bundle (default: the shipped one):

    load      Runtime.load(bundle): "pass", or "refused" with the BundleError's first words
    Δlogit    the self-check's max |logit difference| against the exporter's values (measured
              with verify=False, so a refused release shows by how much it is off)
    reply     the greedy reply to a fixed message, and whether its strategy and tokens equal the
              newest release's
    ESConv    with --esconv N: greedy replies (strategy and tokens, up to 40) to the first N ESConv
              test contexts (star-eval's encoder inputs), and how many equal the newest release's

and prints one JSON line; the parent prints a markdown table (docs/platforms.md holds the result).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("STAR_PLATFORMS_CACHE", Path.home() / ".cache" / "star-platforms"))
DEFAULT_BUNDLE = REPO / "star_runtime" / "data" / "default_bundle"
MESSAGE = "I have been feeling so lonely since I moved to a new city for my job."

CHILD = r"""
import json, platform, sys, time
import numpy as np, onnxruntime as ort
from star_runtime import BundleError, Runtime
from star_runtime.selfcheck import measure
bundle, message = sys.argv[1], sys.argv[2]
contexts = json.load(open(sys.argv[3])) if len(sys.argv) > 3 else []
out = {"onnxruntime": ort.__version__, "numpy": np.__version__, "machine": platform.machine()}
try:
    start = time.perf_counter()
    Runtime.load(bundle)
    out["load_ms"] = (time.perf_counter() - start) * 1e3
    out["status"], out["message"] = "pass", ""
except BundleError as err:
    out["status"], out["message"] = "refused", str(err)
try:
    rt = Runtime.load(bundle, verify=False)
    out["max_diff"], out["problems"] = measure(rt.engine, rt.manifest)
    start = time.perf_counter()
    reply = rt.conversation(seed=0, do_sample=False).reply(message)
    out["reply_ms"] = (time.perf_counter() - start) * 1e3
    out.update(strategy=reply.strategy, tokens=list(reply.tokens), text=reply.text,
               strategy_probs=list(reply.strategy_probs.values()))
    out["contexts"] = [[g.strategy_id, g.tokens] for g in (rt.generate(ids, max_new_tokens=40) for ids in contexts)]
except Exception as err:  # a release that cannot even run the graphs
    out.setdefault("status", "error")
    out["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
print(json.dumps(out))
"""


def index_versions(package: str = "onnxruntime") -> list[str]:
    """Every release of `package` on the package index, oldest first (`pip index versions`)."""
    done = subprocess.run([sys.executable, "-m", "pip", "index", "versions", package], capture_output=True,
                          text=True, check=True, timeout=300)
    line = next(l for l in done.stdout.splitlines() if l.startswith("Available versions:"))
    return sorted((v.strip() for v in line.split(":", 1)[1].split(",")), key=version_key)


def version_key(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version)[:3])


def declared_minimum(name: str = "onnxruntime") -> str:
    """The minimum pyproject.toml declares for `name` (its `name>=X` requirement)."""
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    return re.search(rf'"{re.escape(name)}>=([0-9.]+)', text).group(1)


def venv_python(version: str, numpy: str = "numpy", cache: Path = CACHE) -> Path:
    """The python of a venv holding onnxruntime==version and `numpy` (a pip requirement), built once."""
    tag = re.sub(r"[^A-Za-z0-9.]+", "", numpy.removeprefix("numpy")) or "newest"
    folder = cache / f"ort-{version}-np-{tag}"
    python = folder / "bin" / "python"
    if not (folder / ".complete").is_file():
        subprocess.run([sys.executable, "-m", "venv", "--clear", "--without-pip", str(folder)], check=True)
        subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q",
                        "--disable-pip-version-check", f"onnxruntime=={version}", numpy],
                       check=True, capture_output=True, timeout=900)
        (folder / ".complete").write_text("")
    return python


def run_child(command: list[str], env: dict[str, str], bundle: Path, contexts: Path | None = None,
              timeout: float = 600) -> dict:
    """Run CHILD with `command` (a python), returning its JSON line (or the failure as a record)."""
    with tempfile.TemporaryDirectory() as cwd:  # `-c` puts the cwd first on sys.path: an empty one
        start = time.perf_counter()
        extra = [str(contexts)] if contexts else []
        done = subprocess.run([*command, "-c", CHILD, str(bundle), MESSAGE, *extra], capture_output=True, text=True,
                              env=env, cwd=cwd, timeout=timeout)
    lines = [l for l in done.stdout.splitlines() if l.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:200]
        return {"status": "crash", "error": f"exit {done.returncode}: {tail}"}
    record = json.loads(lines[-1])
    record["wall_s"] = time.perf_counter() - start
    return record


def run_release(version: str, bundle: Path, numpy: str = "numpy", contexts: Path | None = None) -> dict:
    """One release in its venv (module docstring)."""
    python = venv_python(version, numpy)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONPATH"] = str(REPO)
    record = run_child([str(python)], env, bundle, contexts)
    record.setdefault("onnxruntime", version)
    return record


def table(records: list[dict], reference: dict) -> str:
    """Markdown: one row per record; "same" compares strategy and tokens with `reference`'s."""
    lines = ["| onnxruntime | numpy | machine | load | max \\|Δlogit\\| | greedy reply | ESConv replies | strategy, reply |",
             "|---|---|---|---|---|---|---|---|"]
    for r in records:
        if "tokens" not in r:  # nothing ran: show why
            load = f"{r['status']}: {_short_reason(r.get('message') or r.get('error', ''))}"
            lines.append(f"| {r.get('onnxruntime', '?')} | {r.get('numpy', '')} | {r.get('machine', '')} | "
                         f"{load} | | | | |")
            continue
        load = "pass" if r["status"] == "pass" else "refused: " + _short_reason(r["message"])
        same = (r.get("strategy"), r.get("tokens")) == (reference.get("strategy"), reference.get("tokens"))
        diff = "" if r.get("max_diff") is None else f"{r['max_diff']:.1e}"
        text = (r.get("text") or "")[:60].replace("|", "/")
        ours, theirs = r.get("contexts") or [], reference.get("contexts") or []
        esconv = f"{sum(a == b for a, b in zip(ours, theirs))}/{len(theirs)} same" if theirs else ""
        lines.append(f"| {r['onnxruntime']} | {r['numpy']} | {r['machine']} | {load} | "
                     f"{diff} | {'same as newest' if same else 'DIFFERS'} | {esconv} | {r.get('strategy')}: \"{text}\" |")
    return "\n".join(lines)


def _short_reason(message: str) -> str:
    """The gist of a BundleError or a crash, for a table cell."""
    if "self-check failed" in message:
        match = re.search(r"max \|logit difference\| (\S+)", message)
        if match:
            return f"self-check (Δ {match.group(1)})"
        return "self-check: cannot run the graphs"
    for marker, gist in (("cannot load", "onnxruntime cannot load the graphs"), ("older than", "format version")):
        if marker in message:
            return gist
    return message.split(": ", 1)[-1][:80].replace("|", "/")


# --------------------------------------------------------------------------------------------
# --ops: which MatMulNBits block sizes each release computes correctly
# --------------------------------------------------------------------------------------------

OPS_CHILD = r"""
import json, sys
import numpy as np, onnxruntime as ort
folder = sys.argv[1]
cases = json.load(open(f"{folder}/cases.json"))
x = np.load(f"{folder}/x.npy")
out = {"onnxruntime": ort.__version__}
for name, ref in cases.items():
    so = ort.SessionOptions(); so.log_severity_level = 4
    try:
        y = ort.InferenceSession(f"{folder}/{name}.onnx", so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        ref = np.asarray(ref)
        err = float(np.abs(y - ref).max() / np.abs(ref).max())
        out[name] = "ok" if err < 0.02 else "WRONG"
    except Exception:
        out[name] = "refused"
print(json.dumps(out))
"""
BLOCKS = (16, 32, 64, 128, 256, 512)


def write_op_cases(folder: Path, k: int = 1024, n: int = 256) -> None:
    """MatMulNBits graphs, bits 8, accuracy level 4 (the bundle's), one per block size, and the
    numpy reference x @ W of the dequantized weights (a relative error over 2% is WRONG)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.standard_normal((k, n)).astype(np.float32) * 0.05
    x = rng.standard_normal((1, k)).astype(np.float32)
    np.save(folder / "x.npy", x)
    cases = {}
    for size in BLOCKS:
        blocks = w.T.reshape(n, k // size, size)
        scale = (np.abs(blocks).max(axis=2) / 127).astype(np.float32)
        q = (np.clip(np.rint(blocks / scale[..., None]), -127, 127) + 128).astype(np.uint8)
        ref = x @ ((q.astype(np.float32) - 128) * scale[..., None]).reshape(n, k).T
        node = helper.make_node("MatMulNBits", ["x", "w", "s"], ["y"], domain="com.microsoft", K=k, N=n, bits=8,
                                block_size=size, accuracy_level=4)
        graph = helper.make_graph([node], f"b{size}", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
                                  initializer=[numpy_helper.from_array(q, "w"), numpy_helper.from_array(scale, "s")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                        helper.make_opsetid("com.microsoft", 1)])
        model.ir_version = 8
        onnx.save(model, str(folder / f"block{size}.onnx"))
        cases[f"block{size}"] = ref.tolist()
    (folder / "cases.json").write_text(json.dumps(cases))


def ops_table(versions: list[str], numpy: str) -> str:
    lines = ["| onnxruntime | " + " | ".join(f"B={b}" for b in BLOCKS) + " |", "|---" * (len(BLOCKS) + 1) + "|"]
    with tempfile.TemporaryDirectory() as tmp:
        write_op_cases(Path(tmp))
        for version in versions:
            done = subprocess.run([str(venv_python(version, numpy)), "-c", OPS_CHILD, tmp], capture_output=True,
                                  text=True, timeout=300, cwd=tmp)
            row = json.loads(done.stdout.splitlines()[-1]) if done.returncode == 0 else {}
            lines.append(f"| {version} | " + " | ".join(row.get(f"block{b}", "crash") for b in BLOCKS) + " |")
            print(lines[-1], file=sys.stderr)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    p.add_argument("--releases", nargs="+", help="onnxruntime versions (default: every one from --from on the index)")
    p.add_argument("--from", dest="first", default=None, help="the oldest release (default: pyproject's minimum)")
    p.add_argument("--numpy", default="numpy", help="numpy requirement for the venvs (default: the newest)")
    p.add_argument("--arch", choices=("x86_64", "aarch64"), default="x86_64",
                   help="aarch64: the newest release under qemu, compared with this machine's (benchmarks/arm64.py)")
    p.add_argument("--ops", action="store_true", help="print MatMulNBits' block-size table instead")
    p.add_argument("--esconv", type=int, default=0, metavar="N", help="also decode the first N ESConv test contexts")
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "esconv", help="ESConv folder")
    args = p.parse_args(argv)

    if args.releases:
        versions = sorted(args.releases, key=version_key)
    else:
        first = args.first or declared_minimum()
        versions = [v for v in index_versions() if version_key(v) >= version_key(first)]
    if args.ops:
        print(ops_table(versions, args.numpy))
        return 0
    contexts = None
    if args.esconv:
        from star_runtime.tokenizer import Tokenizer
        from star_training.data import build_examples, load_conversations

        examples = build_examples(load_conversations(args.data, "test"), Tokenizer.from_dir(args.bundle))
        contexts = Path(tempfile.mkdtemp()) / "contexts.json"
        contexts.write_text(json.dumps([list(e.input_ids) for e in examples[: args.esconv]]))
    records = []
    for version in versions:
        records.append(run_release(version, args.bundle, args.numpy, contexts))
        r = records[-1]
        print(f"{version}: {r['status']} Δ={r.get('max_diff')} {r.get('strategy')} {r.get('text', r.get('error'))!r}",
              file=sys.stderr)
    if args.arch == "aarch64":
        from arm64 import run_emulated  # benchmarks/arm64.py, beside this file

        records.append(run_emulated(args.bundle, CHILD, [str(args.bundle), MESSAGE, *([str(contexts)] if contexts else [])]))
    replied = [r for r in records if r.get("machine", "x86_64") == "x86_64" and "tokens" in r]
    reference = max(replied, key=lambda r: version_key(r["onnxruntime"])) if replied else {}
    print(table(records, reference))
    return 0


if __name__ == "__main__":
    sys.exit(main())
