"""A bundle back to a float32 checkpoint, exactly: every stored weight dequantized and put back.

    python -m star_export.dequantize BUNDLE OUT_CHECKPOINT

For int8 bundles (export/weights.py's two formats) the float weight is what the graphs compute
with, bit for bit in float32:

    int8 [K, N], scale s [N]                 W      = W_q * s           (DynamicQuantizeMatMul)
    uint8 [N, K/B, B], scale s [N, K/B]      W^T    = (W_q - 128) * s   (MatMulNBits)

float32 bundles hold W itself. Names map back to the model's parameters through
star_export.weights.layout, the table `collect` reads through. The checkpoint gets the
bundle's tokenizer files and the compact/tiny/base preset whose sizes the manifest records.
Used to rebuild the shipped default bundle, whose training checkpoint is gone (docs/platforms.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import torch

from star_export.weights import EMBED, EMBED_T, ExportError, layout
from star_runtime.cli import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from star_runtime.spec import OUTPUT_IDS
from star_runtime.tokenizer import Tokenizer
from star_training.checkpoint import save_model
from star_training.config import PRESETS, StarConfig, base_config
from star_training.model import StarForConditionalGeneration

SIZE_KEYS = ("d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads", "decoder_attention_heads",
             "encoder_ffn_dim", "decoder_ffn_dim")


def stored_tensors(folder: Path) -> dict[str, np.ndarray]:
    """Every array of weights.bin by name, read through the graphs' external-data tables."""
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    table: dict[str, tuple[int, int, np.dtype, tuple[int, ...]]] = {}
    for role in ("encoder", "step"):
        graph = onnx.load(str(folder / manifest["graphs"][role]), load_external_data=False).graph
        for t in graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                info = {e.key: e.value for e in t.external_data}
                dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
                table[t.name] = (int(info["offset"]), int(info["length"]), dtype, tuple(t.dims))
    for name, spec in manifest["shared_tensors"].items():
        table[name] = (spec["offset"], spec["length"], np.dtype(spec["dtype"]), tuple(spec["shape"]))
    data = (folder / manifest["graphs"]["weights"]).read_bytes()
    return {name: np.frombuffer(data, dtype, length // dtype.itemsize, offset).reshape(shape)
            for name, (offset, length, dtype, shape) in table.items()}


def dequantized(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """name -> float32 array in the layout of star_export.weights.collect (W [in, out] for matrices)."""
    out = {}
    for name, array in tensors.items():
        if name.endswith(".scale"):
            continue
        if array.dtype == np.int8:  # [K, N], per-column scales
            out[name] = array.astype(np.float32) * tensors[name + ".scale"]
        elif array.dtype == np.uint8:  # [N, K/B, B], per-block scales: W^T
            scale = tensors[name + ".scale"][..., None]
            wt = ((array.astype(np.float32) - 128) * scale).reshape(array.shape[0], -1)
            out[EMBED_T if name == EMBED else name] = np.ascontiguousarray(wt.T)
        else:
            out[name] = array.astype(np.float32)
    return out


def to_checkpoint(bundle: str | Path, out: str | Path) -> StarForConditionalGeneration:
    """Rebuild the model of `bundle` (module docstring) and save it as a checkpoint at `out`."""
    folder = Path(bundle)
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    if OUTPUT_IDS in manifest.get("shared_tensors", {}):
        raise ExportError(f"{folder}: its LM head is trimmed to {manifest['io']['output_size']:,} tokens, so the "
                          "bias of the others is not in it; dequantize an export of the whole head")
    cfg = manifest["model_config"]
    preset = next((p for p, sizes in PRESETS.items() if all(sizes[k] == cfg[k] for k in SIZE_KEYS)), None)
    if preset is None:
        raise ExportError(f"{folder}: sizes {[cfg[k] for k in SIZE_KEYS]} match no preset")
    tokenizer = Tokenizer.from_dir(folder)
    star = StarConfig.from_dict(cfg["star"])
    model = StarForConditionalGeneration(base_config(preset, tokenizer.vocab_size, pad_id=tokenizer.pad_id,
                                                     start_id=tokenizer.bos_id, eos_id=tokenizer.eos_id,
                                                     unk_id=tokenizer.unk_id), star)
    arrays = dequantized(stored_tensors(folder))
    mats, views = layout(model)
    with torch.no_grad():
        for name, group in mats.items():
            w, b = torch.from_numpy(arrays.pop(name)), torch.from_numpy(arrays.pop(name + ".bias"))
            start = 0
            for linear in group:
                end = start + linear.out_features
                linear.weight.copy_(w[:, start:end].T)
                linear.bias.copy_(b[start:end])
                start = end
            if start != w.shape[1]:
                raise ExportError(f"{folder}: matrix {name} has {w.shape[1]} columns, the model {start}")
        for name, view in views.items():
            view.copy_(torch.from_numpy(arrays.pop(name)).reshape(view.shape))
    if arrays:
        raise ExportError(f"{folder}: weights the model has no place for: {sorted(arrays)[:5]}")
    save_model(model, out, tokenizer_dir=folder)
    return model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m star_export.dequantize", description=__doc__.split("\n")[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("out", type=Path, help="checkpoint folder to write (must not exist)")
    args = p.parse_args(argv)
    if args.out.exists():
        print(f"dequantize: error: {args.out} exists; choose a new checkpoint folder", file=sys.stderr)
        return EXIT_USAGE
    if not (args.bundle / "manifest.json").is_file():
        print(f"dequantize: error: {args.bundle} is not a bundle folder (no manifest.json)", file=sys.stderr)
        return EXIT_USAGE
    try:
        to_checkpoint(args.bundle, args.out)
    except (ExportError, ValueError, KeyError) as err:  # the bundle's content is wrong
        print(f"dequantize: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as err:  # reading or writing failed
        print(f"dequantize: error: {err}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"wrote {args.out}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
