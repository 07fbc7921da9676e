"""checkpoint folder -> bundle folder: weights, graphs, tokenizer, manifest, then a self-check.

    export_bundle("ckpt/", "model.onnx")                       # float32, CPU or CUDA
    export_bundle("ckpt/", "model-int8", precision="int8")     # CPU
    export_bundle("ckpt/", "model-fp16", precision="float16")  # CUDA

The bundle is written into a temporary folder beside `out` and renamed into place only after
the self-check (star_export.validate) passed, so `out` is either the old bundle or the new
complete one, never half of one. An existing `out` is replaced only if it is a bundle or empty.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx

from star_export.graph_builder import GraphBuilder, WeightsFile
from star_export.graphs import encoder_graph, step_graph
from star_export.validate import validate_bundle
from star_export.weights import EMBED, EMBED_SCALE, EMBED_T, Dims, ExportError, stored_arrays
from star_runtime.bundle import (ENCODER_FILE, FORMAT_VERSION, MANIFEST_FILE, PRECISIONS, STEP_FILE, WEIGHTS_FILE,
                                 file_entry)
from star_runtime.strategies import STRATEGIES, STRATEGY_NAMES
from star_runtime.tokenizer import Tokenizer, TokenizerError
from star_training.checkpoint import CheckpointError, load_model
from star_training.folders import write_folder_atomically
from star_training.model import StarForConditionalGeneration

# The paper's decoding settings (SPEC section 1) and training's source length.
GENERATION_DEFAULTS = {
    "do_sample": True, "top_p": 0.3, "top_k": 30, "temperature": 0.7, "repetition_penalty": 1.03,
    "max_new_tokens": 40, "max_source_length": 160,
}


def load_checkpoint(checkpoint: str | Path) -> tuple[StarForConditionalGeneration, Tokenizer]:
    """The model and the tokenizer saved beside it; ExportError when either is missing or bad."""
    path = Path(checkpoint)
    if not path.is_dir():
        raise ExportError(f"no checkpoint folder at {path}")
    try:
        model = load_model(path)
    except (CheckpointError, ValueError) as err:
        raise ExportError(f"cannot load the checkpoint: {err}") from None
    try:
        tokenizer = Tokenizer.from_dir(path)
    except TokenizerError as err:
        raise ExportError(f"the checkpoint has no usable tokenizer files ({err}); save it with "
                          "save_pretrained(dir, tokenizer_dir=...)") from None
    if tokenizer.vocab_size != model.config.vocab_size:
        raise ExportError(
            f"{path}: the tokenizer has {tokenizer.vocab_size} tokens, the model {model.config.vocab_size}")
    if list(model.star_config.strategy_token_ids) != list(tokenizer.strategy_ids):
        raise ExportError(f"{path}: the model's strategy ids {model.star_config.strategy_token_ids} are not the "
                          f"tokenizer's {tokenizer.strategy_ids}")
    return model.eval(), tokenizer


def write_graphs(folder: Path, model: StarForConditionalGeneration, precision: str) -> dict[str, Any]:
    """weights.bin, encoder.onnx and decoder_step.onnx in `folder`; returns the manifest's "io"."""
    dims = Dims.of(model)
    weights = WeightsFile(folder / WEIGHTS_FILE)
    try:
        for name, array in stored_arrays(model, precision).items():
            weights.add(name, array)
    finally:
        weights.close()
    for file, build in ((ENCODER_FILE, encoder_graph), (STEP_FILE, step_graph)):
        builder = GraphBuilder(file.removesuffix(".onnx"), weights)
        build(builder, dims, precision)
        onnx.save(builder.model(WEIGHTS_FILE), str(folder / file))
        onnx.checker.check_model(str(folder / file))  # by path: it reads weights.bin beside the graph
    # How the runtime hands the embedding to both graphs (graphs.py, _Ops.embed): float bundles take
    # E^T as a graph input; int8 ones as initializers given once with SessionOptions.add_initializer.
    shared = {EMBED: "initializer", EMBED_SCALE: "initializer"} if precision == "int8" else {EMBED_T: "input"}
    return {
        "shared_tensors": {name: {**weights.tensors[name].as_dict(), "binding": binding}
                           for name, binding in shared.items()},
        "io": {
            "float_dtype": "float16" if precision == "float16" else "float32",
            "d_model": dims.d_model,
            "decoder_layers": dims.decoder_layers,
            "decoder_heads": dims.decoder_heads,
            "head_dim": dims.d_model // dims.decoder_heads,
            "vocab_size": dims.vocab_size,
            "max_positions": dims.max_positions,
        },
    }


def build_manifest(folder: Path, model: StarForConditionalGeneration, tokenizer: Tokenizer, precision: str,
                   graphs: dict[str, Any], validation: dict[str, Any] | None) -> dict[str, Any]:
    cfg = model.config
    files = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != MANIFEST_FILE)
    return {
        "format_version": FORMAT_VERSION,
        "producer": "star-export",
        "precision": precision,
        "devices": list(PRECISIONS[precision]),
        "graphs": {"encoder": ENCODER_FILE, "step": STEP_FILE, "weights": WEIGHTS_FILE},
        **graphs,
        "model_config": {
            "model_type": cfg.model_type,
            "d_model": cfg.d_model,
            "encoder_layers": cfg.encoder_layers,
            "decoder_layers": cfg.decoder_layers,
            "encoder_attention_heads": cfg.encoder_attention_heads,
            "decoder_attention_heads": cfg.decoder_attention_heads,
            "encoder_ffn_dim": cfg.encoder_ffn_dim,
            "decoder_ffn_dim": cfg.decoder_ffn_dim,
            "vocab_size": cfg.vocab_size,
            "max_position_embeddings": cfg.max_position_embeddings,
            "star": model.star_config.to_dict(),
        },
        "strategies": {"labels": list(STRATEGY_NAMES), "tokens": list(STRATEGIES),
                       "token_ids": list(tokenizer.strategy_ids),
                       # b[strategy ids]: with the embedding's rows, the runtime's strategy head
                       "logit_bias": model.base.final_logits_bias[0, tokenizer.strategy_ids].tolist()},
        "special_ids": {"pad": tokenizer.pad_id, "bos": tokenizer.bos_id, "eos": tokenizer.eos_id,
                        "unk": tokenizer.unk_id},
        "generation": dict(GENERATION_DEFAULTS),
        "validation": validation,
        "files": {name: file_entry(folder / name) for name in files},
    }


def _write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def check_destination(out: Path) -> None:
    """Refuse to replace anything but a bundle or an empty folder; fail early if unwritable."""
    if out.exists():
        if not out.is_dir():
            raise ExportError(f"{out} exists and is a file; --out names the bundle folder to create")
        if any(out.iterdir()) and not (out / MANIFEST_FILE).is_file():
            raise ExportError(f"refusing to replace {out}: it exists and is not a bundle (no {MANIFEST_FILE})")
    probe = out.resolve().parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ExportError(f"cannot create {out}: {probe} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ExportError(f"cannot write {out}: no write permission in {probe}")


def export_bundle(checkpoint: str | Path, out: str | Path, *, precision: str = "float32",
                  validate: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Write the bundle of `checkpoint` at `out` (a folder, whatever its name); returns the manifest.

    precision: "float32", "int8" or "float16". validate: run star_export.validate before keeping
    the bundle (ValidationError, and nothing written, beyond tolerance). log: progress lines.
    """
    if precision not in PRECISIONS:
        raise ExportError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    out = Path(out)
    check_destination(out)
    model, tokenizer = load_checkpoint(checkpoint)
    result: dict[str, Any] = {}

    def fill(tmp: Path) -> None:
        graphs = write_graphs(tmp, model, precision)
        tokenizer.save(tmp)
        manifest = build_manifest(tmp, model, tokenizer, precision, graphs, None)
        _write_manifest(tmp, manifest)
        if validate:
            manifest["validation"] = validate_bundle(tmp, model, log=log)
            _write_manifest(tmp, manifest)
        result.update(manifest)

    try:
        write_folder_atomically(out, fill)
    except OSError as err:
        raise ExportError(f"cannot write {out}: {err}") from None
    return result
