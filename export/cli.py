"""star-export: turn a STAR checkpoint folder into a bundle folder for star_runtime.

    star-export --checkpoint ckpt/ --out model.onnx                  # float32 (CPU or CUDA); ckpt/ is a
                                                                     # star-train run (best/, else last/)
    star-export --checkpoint ckpt/ --out model-int8 --quantize int8  # int8 weights (CPU)
    star-export --checkpoint ckpt/ --out model-fp16 --fp16           # float16 (CUDA)

`--out` names the bundle FOLDER, even when it ends in ".onnx": a bundle is two graphs, one
weights file, the tokenizer and a manifest (docs/bundle.md). `--checkpoint` takes a star-train run
folder (its best/ is used, else last/, and the command says which) or a checkpoint folder. Errors
are one line on stderr, never a traceback; exit codes follow star_runtime.cli (2: fix the
command or its input, 1: the machine failed, e.g. a full disk, 130: Ctrl-C).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from star_runtime.cli import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, add_version
from star_runtime.terminal import printable


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="star-export",
        description="Export a STAR checkpoint (star-train's output folder) to an ONNX bundle folder that "
        "star_runtime and star-chat load. The exporter checks the bundle against the PyTorch model "
        "before it keeps anything.",
    )
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="a star-train run folder (its best/ is "
                   "used, else last/) or a checkpoint folder (config.json, star_config.json, model.safetensors "
                   "and the tokenizer files)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="bundle folder to write (a folder even if the name ends in .onnx); replaced only if it "
                   "is a bundle or empty")
    precision = p.add_mutually_exclusive_group()
    precision.add_argument("--quantize", choices=["int8"], help="int8 weights for CPU (dynamic activation "
                           "quantization, the LM head included)")
    precision.add_argument("--fp16", action="store_true", help="float16 weights and compute, for CUDA")
    p.add_argument("--trim-vocab", metavar="ESCONV_DIR", type=Path, default=None,
                   help="keep in the LM head only the tokens the model was trained to produce: those of ESConv's "
                   "train split in this folder (and of every --trim-corpus); default: the whole vocabulary")
    p.add_argument("--trim-corpus", metavar="NAME", action="append", default=[],
                   help="a stage-0 corpus the model was pretrained on (star-train --corpus), for --trim-vocab; "
                   "repeatable")
    p.add_argument("--no-validate", action="store_true",
                   help="skip the check against the PyTorch model (not recommended)")
    add_version(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    precision = "int8" if args.quantize == "int8" else "float16" if args.fp16 else "float32"
    # Imported after argparse so that --help and argument errors are instant (torch takes seconds).
    try:
        from star_export.exporter import checkpoint_tokenizer, export_bundle
        from star_export.output_vocab import training_target_ids
        from star_export.weights import ExportError
        from star_training.checkpoint import CheckpointError, resolve_checkpoint
        from star_training.cli_common import os_error_message
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED

    def say(line: object) -> None:
        print(printable(line), file=sys.stderr)

    start = time.perf_counter()
    try:
        checkpoint, which = resolve_checkpoint(args.checkpoint)
        if which:
            say(f"star-export: using {which}")
        output_ids = None
        if args.trim_vocab is not None:
            output_ids, counts = training_target_ids(checkpoint_tokenizer(checkpoint), args.trim_vocab,
                                                     args.trim_corpus)
            say(f"star-export: the LM head keeps {len(output_ids):,} tokens ("
                + ", ".join(f"{name}: {n:,}" for name, n in counts.items()) + ")")
        manifest = export_bundle(checkpoint, args.out, precision=precision, validate=not args.no_validate, log=say,
                                 output_ids=output_ids)
    except (ExportError, CheckpointError, ValueError) as err:
        say(f"star-export: error: {err}")
        return EXIT_USAGE
    except OSError as err:
        say(f"star-export: error: {os_error_message(err)}")
        return EXIT_FAILURE
    except KeyboardInterrupt:
        say("star-export: interrupted; nothing was written")
        return EXIT_INTERRUPTED
    size = sum(entry["size"] for entry in manifest["files"].values())
    seconds = time.perf_counter() - start
    print(printable(f"wrote {precision} bundle {args.out} ({size / 1e6:.1f} MB) in {seconds:.1f} s"))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
