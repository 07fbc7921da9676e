"""Do two bundles, each run by its own star_runtime, reply alike on ESConv? (greedy, token for token)

    python benchmarks/bundle_agreement.py --old ~/star-runs/default-v1-bundle --old-runtime /tmp/oldrt \\
        --new star_runtime/data/default_bundle --split test --limit 1000

Made for the rebuilt default bundle: the shipped format-1 bundle can only be read by the
star_runtime of its time (`git archive bc4fd66 star_runtime | tar -x -C /tmp/oldrt`), the rebuilt
one only by today's, so each side decodes in its own process with its own PYTHONPATH. Every
example's encoder input is star-eval's (training/data.py, last 160 tokens); decoding is greedy
with the bundle's repetition penalty, up to 40 tokens, stopping at __end__. Prints the share of
examples with the same strategy, with the same strategy and reply, and the time each side took.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHILD = """
import json, sys
from star_runtime import Runtime
bundle, inputs, out = sys.argv[1:4]
rt = Runtime.load(bundle, threads=2)
runs = [rt.generate(ids, max_new_tokens=40) for ids in json.load(open(inputs))]  # greedy, the bundle's penalty
json.dump([[g.strategy_id, g.tokens] for g in runs], open(out, "w"))
"""


def decode(bundle: Path, runtime_root: Path, inputs: Path, out: Path) -> tuple[list, float]:
    """Greedy replies of `bundle` with the star_runtime under `runtime_root`, and the seconds taken."""
    env = {**os.environ, "PYTHONPATH": str(runtime_root)}
    start = time.perf_counter()
    # cwd: `python -c` puts the working folder first on sys.path, which must not shadow runtime_root
    subprocess.run([sys.executable, "-c", CHILD, str(bundle), str(inputs), str(out)], check=True, env=env,
                   cwd=inputs.parent)
    return json.loads(out.read_text()), time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old", type=Path, required=True, help="the reference bundle")
    p.add_argument("--old-runtime", type=Path, required=True, help="folder holding the star_runtime that reads it")
    p.add_argument("--new", type=Path, required=True)
    p.add_argument("--new-runtime", type=Path, default=REPO / ".pypath" if (REPO / ".pypath").is_dir() else REPO)
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "esconv")
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int, default=1000)
    args = p.parse_args(argv)

    from star_runtime.tokenizer import Tokenizer
    from star_training.data import build_examples, load_conversations

    tok = Tokenizer.from_dir(args.new)
    examples = build_examples(load_conversations(args.data, args.split), tok)[: args.limit]
    with tempfile.TemporaryDirectory() as tmp:
        inputs = Path(tmp) / "inputs.json"
        inputs.write_text(json.dumps([list(e.input_ids) for e in examples]))
        old, old_s = decode(args.old, args.old_runtime, inputs, Path(tmp) / "old.json")
        new, new_s = decode(args.new, args.new_runtime, inputs, Path(tmp) / "new.json")
    n = len(examples)
    same_strategy = sum(a[0] == b[0] for a, b in zip(old, new))
    same_reply = sum(a == b for a, b in zip(old, new))
    print(f"{n} {args.split} examples: same strategy {same_strategy}/{n} = {100 * same_strategy / n:.1f}%, "
          f"same strategy and reply {same_reply}/{n} = {100 * same_reply / n:.1f}%; "
          f"old {old_s:.1f} s, new {new_s:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
