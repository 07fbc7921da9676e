"""star-export: turn a STAR checkpoint folder into a bundle folder for star_runtime.

    star-export --checkpoint ckpt/ --out model.onnx                  # float32 (CPU or CUDA)
    star-export --checkpoint ckpt/ --out model-int8 --quantize int8  # int8 weights (CPU)
    star-export --checkpoint ckpt/ --out model-fp16 --fp16           # float16 (CUDA)

`--out` names the bundle FOLDER, even when it ends in ".onnx": a bundle is two graphs, one
weights file, the tokenizer and a manifest (docs/bundle.md). Bad input gets one line on stderr
and exit code 1 (2 for bad arguments), never a traceback.
"""

from __future__ import annotations

import argparse
import sys
import time

EXIT_ERROR = 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="star-export",
        description="Export a STAR checkpoint (star-train's output folder) to an ONNX bundle folder that "
        "star_runtime and star-chat load. The exporter checks the bundle against the PyTorch model "
        "before it keeps anything.",
    )
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="checkpoint folder (config.json, "
                   "star_config.json, model.safetensors and the tokenizer files)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="bundle folder to write (a folder even if the name ends in .onnx); replaced only if it "
                   "is a bundle or empty")
    precision = p.add_mutually_exclusive_group()
    precision.add_argument("--quantize", choices=["int8"], help="int8 weights for CPU (dynamic activation "
                           "quantization, the LM head included)")
    precision.add_argument("--fp16", action="store_true", help="float16 weights and compute, for CUDA")
    p.add_argument("--no-validate", action="store_true",
                   help="skip the check against the PyTorch model (not recommended)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    precision = "int8" if args.quantize == "int8" else "float16" if args.fp16 else "float32"
    # Imported after argparse so that --help and argument errors are instant (torch takes seconds).
    from star_export.exporter import export_bundle
    from star_export.weights import ExportError

    start = time.perf_counter()
    try:
        manifest = export_bundle(args.checkpoint, args.out, precision=precision, validate=not args.no_validate,
                                 log=lambda line: print(line, file=sys.stderr))
    except (ExportError, OSError, ValueError) as err:
        print(f"star-export: error: {err}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("star-export: interrupted; nothing was written", file=sys.stderr)
        return 130
    size = sum(entry["size"] for entry in manifest["files"].values())
    print(f"wrote {precision} bundle {args.out} ({size / 1e6:.1f} MB) in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
