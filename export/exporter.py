"""checkpoint folder -> bundle folder: weights, graphs, tokenizer, manifest, then a self-check.

    export_bundle("ckpt/", "model.onnx")                       # float32, CPU or CUDA
    export_bundle("ckpt/", "model-int8", precision="int8")     # CPU
    export_bundle("ckpt/", "model-fp16", precision="float16")  # CUDA

The bundle is written into a temporary folder beside `out` and renamed into place only after
the check against PyTorch (star_export.validate) passed, so `out` is either the old bundle or the
new complete one, never half of one. The manifest then records the golden outputs of the bundle
as this onnxruntime computes them (star_runtime.selfcheck), which every load compares with.

An existing `out` is replaced only when nothing of anyone else's can be lost: an empty folder, or
a bundle star-export wrote, i.e. a folder whose manifest says producer "star-export" and which
holds nothing but the manifest and the files it lists, each of its recorded size
(`replaceable`). Anything else (a web app with its own manifest.json, a bundle with a user's notes
added) is refused with a line that says what to do.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from star_export.graph_builder import GraphBuilder, WeightsFile
from star_export.graphs import encoder_graph, step_graph
from star_export.validate import validate_bundle
from star_export.weights import EMBED, EMBED_SCALE, EMBED_T, Dims, ExportError, stored_arrays
from star_runtime.atomic import write_text_atomically
from star_runtime.bundle import (ENCODER_FILE, FORMAT_VERSION, MANIFEST_FILE, OLDEST_FORMAT_VERSION, PRECISIONS, STEP_FILE,
                                 WEIGHTS_FILE, file_entry, load_manifest)
from star_runtime.engine import Engine
from star_runtime.manifest import MAX_MANIFEST_BYTES, BundleError, parse
from star_runtime.sampling import DecodingOptions
from star_runtime.spec import OUTPUT_IDS, BundleSpec
from star_runtime.selfcheck import TOLERANCE, decisive_steps, golden
from star_runtime.strategies import STRATEGIES, STRATEGY_NAMES
from star_runtime.tokenizer import Tokenizer, TokenizerError
from star_training.checkpoint import CheckpointError, load_model
from star_training.folders import write_folder_atomically
from star_training.model import StarForConditionalGeneration

MAX_SOURCE_LENGTH = 160  # training's source length (SPEC section 1): the context the model was trained on


def checkpoint_tokenizer(checkpoint: str | Path) -> Tokenizer:
    """The tokenizer saved beside a checkpoint; ExportError when its files are missing or bad."""
    try:
        return Tokenizer.from_dir(checkpoint)
    except TokenizerError as err:
        raise ExportError(f"the checkpoint has no usable tokenizer files ({err}); save it with "
                          "star_training.checkpoint.save_model(model, dir, tokenizer_dir=...)") from None


def load_checkpoint(checkpoint: str | Path) -> tuple[StarForConditionalGeneration, Tokenizer]:
    """The model and the tokenizer saved beside it; ExportError when either is missing or bad."""
    path = Path(checkpoint)
    if not path.is_dir():
        raise ExportError(f"no checkpoint folder at {path}")
    try:
        model = load_model(path)
    except (CheckpointError, ValueError) as err:
        raise ExportError(f"cannot load the checkpoint: {err}") from None
    tokenizer = checkpoint_tokenizer(path)
    if tokenizer.vocab_size != model.config.vocab_size:
        raise ExportError(
            f"{path}: the tokenizer has {tokenizer.vocab_size} tokens, the model {model.config.vocab_size}")
    if list(model.star_config.strategy_token_ids) != list(tokenizer.strategy_ids):
        raise ExportError(f"{path}: the model's strategy ids {model.star_config.strategy_token_ids} are not the "
                          f"tokenizer's {tokenizer.strategy_ids}")
    check_finite(model, path)
    return model.eval(), tokenizer


def check_finite(model: StarForConditionalGeneration, path: Path) -> None:
    """ExportError naming the first weight that holds NaN or an infinity (a diverged run)."""
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                bad = int((~torch.isfinite(tensor)).sum())
                raise ExportError(f"{path}: the checkpoint's weight {name} holds {bad} NaN or infinite values "
                                  "(a diverged training run?); export an earlier checkpoint")


def write_graphs(folder: Path, model: StarForConditionalGeneration, precision: str,
                 output_ids: np.ndarray | None = None) -> dict[str, Any]:
    """weights.bin, encoder.onnx and decoder_step.onnx in `folder` (output_ids: a trimmed LM
    head's tokens, star_export.weights.stored_arrays); returns the manifest's "fingerprint" and
    "shared_tensors"."""
    dims = Dims.of(model)
    weights = WeightsFile(folder / WEIGHTS_FILE)
    try:
        for name, array in stored_arrays(model, precision, output_ids).items():
            weights.add(name, array)
    finally:
        weights.close()
    for file, build in ((ENCODER_FILE, encoder_graph), (STEP_FILE, step_graph)):
        builder = GraphBuilder(file.removesuffix(".onnx"), weights)
        build(builder, dims, precision)
        onnx.save(builder.model(WEIGHTS_FILE), str(folder / file))
        onnx.checker.check_model(str(folder / file))  # by path: it reads weights.bin beside the graph
    fingerprint = weights.fingerprint
    # How the runtime hands the embedding to both graphs (graphs.py, _Ops.embed): E^T (float, whole
    # LM head) as a graph input; E or E_q and its scales as initializers given once with
    # SessionOptions.add_initializer.
    shared = {name: "input" if name == EMBED_T else "initializer"
              for name in (EMBED, EMBED_SCALE, EMBED_T) if name in weights.tensors}
    if output_ids is not None:
        shared[OUTPUT_IDS] = "host"  # the runtime's map from logits to tokens
    return {
        "fingerprint": fingerprint,
        "shared_tensors": {name: {**weights.tensors[name].as_dict(), "binding": binding}
                           for name, binding in shared.items()},
    }


def bundle_spec(model: StarForConditionalGeneration, tokenizer: Tokenizer, precision: str,
                output_size: int | None = None) -> BundleSpec:
    """The bundle specification of `model` exported at `precision`, with the paper's decoding;
    output_size: a trimmed LM head's rows (default the vocabulary)."""
    dims = Dims.of(model)
    return BundleSpec(
        precision=precision, float_dtype="float16" if precision == "float16" else "float32", d_model=dims.d_model,
        decoder_layers=dims.decoder_layers, decoder_heads=dims.decoder_heads,
        head_dim=dims.d_model // dims.decoder_heads, vocab_size=dims.vocab_size, max_positions=dims.max_positions,
        output_size=output_size or dims.vocab_size,
        pad_id=tokenizer.pad_id, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, unk_id=tokenizer.unk_id,
        strategy_labels=STRATEGY_NAMES, strategy_tokens=STRATEGIES, strategy_token_ids=tuple(tokenizer.strategy_ids),
        # b[strategy ids]: with the embedding's rows, the runtime's strategy head
        strategy_logit_bias=tuple(model.base.final_logits_bias[0, tokenizer.strategy_ids].tolist()),
        decoding=DecodingOptions(), max_source_length=MAX_SOURCE_LENGTH,
    )


def build_manifest(folder: Path, model: StarForConditionalGeneration, tokenizer: Tokenizer, precision: str,
                   graphs: dict[str, Any], validation: dict[str, Any] | None) -> dict[str, Any]:
    """The manifest (star_runtime.manifest's schema) of the files in `folder`, the self-check's
    golden record still empty (`record_selfcheck` fills it)."""
    cfg = model.config
    files = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != MANIFEST_FILE)
    return {
        "format_version": FORMAT_VERSION,
        "producer": "star-export",
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
        **bundle_spec(model, tokenizer, precision, _output_size(graphs)).as_manifest(),
        "validation": validation,
        "selfcheck": None,
        "files": {name: file_entry(folder / name) for name in files},
    }


def _output_size(graphs: dict[str, Any]) -> int | None:
    """A trimmed LM head's rows (the length of its id table), None for the whole vocabulary."""
    table = graphs["shared_tensors"].get(OUTPUT_IDS)
    return table["shape"][0] if table else None


# Fixed contexts for the golden self-check, tried in order: the first whose greedy choices are
# decisive at every step is kept (a random-weights model can have near-tied logits).
SELFCHECK_TEXTS = (
    "i have been feeling so lonely since i moved to a new city for my job .",
    "my exams are next week and i can not sleep , i am scared i will fail .",
    "my best friend stopped talking to me and i do not know why .",
)


def record_selfcheck(folder: Path, manifest: dict[str, Any], tokenizer: Tokenizer, device: str = "cpu") -> None:
    """Fill manifest["selfcheck"] with the bundle's outputs for a fixed context, as this process's
    onnxruntime computes them (star_runtime.selfcheck)."""
    engine = Engine.open(folder, manifest, device=device, check_precision=False)
    eos = manifest["special_ids"]["eos"]
    tolerance = TOLERANCE[manifest["precision"]]
    best = None
    for text in SELFCHECK_TEXTS:
        record = golden(engine, [*tokenizer.encode(text), eos])
        score = decisive_steps(record, tolerance)
        if best is None or score > best[0]:
            best = (score, record)
        if score == len(record["steps"]) + 1:
            break
    manifest["selfcheck"] = best[1]


def _write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    write_text_atomically(folder / MANIFEST_FILE, json.dumps(manifest, indent=1) + "\n")


def replaceable(out: Path) -> str | None:
    """None when `out` may be replaced by a new bundle (module docstring), else why not."""
    entries = {p.name for p in out.iterdir()}
    if not entries:
        return None
    manifest_path = out / MANIFEST_FILE
    if MANIFEST_FILE not in entries or manifest_path.is_symlink() or not manifest_path.is_file():
        return f"it is not empty and holds no {MANIFEST_FILE}"
    if manifest_path.stat().st_size > MAX_MANIFEST_BYTES:
        return f"its {MANIFEST_FILE} is not a bundle manifest"
    try:
        manifest = parse(manifest_path.read_bytes(), str(manifest_path))
    except (BundleError, OSError):
        return f"its {MANIFEST_FILE} is not a bundle manifest"
    files = manifest.get("files")
    if manifest.get("producer") != "star-export" or not isinstance(files, dict):
        return f"its {MANIFEST_FILE} was not written by star-export"
    if not isinstance(manifest.get("format_version"), int) or (
            OLDEST_FORMAT_VERSION <= manifest["format_version"] <= FORMAT_VERSION):
        try:  # a format this star_runtime reads: the whole schema and every size must hold
            load_manifest(out, verify=False)
        except BundleError as err:
            return f"it is not a valid bundle ({err})"
    unlisted = sorted(entries - set(files) - {MANIFEST_FILE})
    if unlisted:
        return f"it holds files the bundle's manifest does not list ({', '.join(unlisted[:3])})"
    for name, entry in files.items():
        path = out / name
        if not isinstance(entry, dict) or path.is_symlink() or not path.is_file() \
                or path.stat().st_size != entry.get("size"):
            return f"its {name} is not the file its manifest describes"
    return None


def check_destination(out: Path) -> None:
    """Refuse to replace anything but an empty folder or a bundle star-export wrote (`replaceable`);
    fail early if the place is unwritable."""
    if out.is_symlink():
        raise ExportError(f"{out} is a symbolic link; --out names the bundle folder to create: give the real path")
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is a file; --out names the bundle folder to create")
    if out.exists():
        why = replaceable(out)
        if why is not None:
            raise ExportError(f"refusing to replace {out}: {why}; star-export replaces only an empty folder or a "
                              "bundle it wrote: choose another --out, or move that folder away first")
    probe = out.resolve().parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ExportError(f"cannot create {out}: {probe} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ExportError(f"cannot write {out}: no write permission in {probe}")


def export_bundle(checkpoint: str | Path, out: str | Path, *, precision: str = "float32",
                  validate: bool = True, log: Callable[[str], None] = print,
                  output_ids: Sequence[int] | np.ndarray | None = None) -> dict[str, Any]:
    """Write the bundle of `checkpoint` at `out` (a folder, whatever its name); returns the manifest.

    precision: "float32", "int8" or "float16". validate: run star_export.validate before keeping
    the bundle (ValidationError, and nothing written, beyond tolerance). log: progress lines.
    output_ids: the tokens the LM head keeps (star_export.output_vocab; __end__ among them), or
    None for the whole vocabulary.
    """
    if precision not in PRECISIONS:
        raise ExportError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    out = Path(out)
    check_destination(out)
    model, tokenizer = load_checkpoint(checkpoint)
    if output_ids is not None:
        output_ids = np.unique(np.asarray(output_ids, np.int64))
        if output_ids.size == 0 or output_ids[0] < 0 or output_ids[-1] >= tokenizer.vocab_size \
                or tokenizer.eos_id not in output_ids:
            raise ExportError(f"the LM head's tokens must be ids of the {tokenizer.vocab_size:,}-token vocabulary "
                              "with __end__ among them")
        if output_ids.size == tokenizer.vocab_size:
            output_ids = None  # nothing to trim
    result: dict[str, Any] = {}

    def fill(tmp: Path) -> None:
        graphs = write_graphs(tmp, model, precision, output_ids)
        tokenizer.save(tmp)
        manifest = build_manifest(tmp, model, tokenizer, precision, graphs, None)
        device = "cpu"
        if validate:
            manifest["validation"] = validate_bundle(tmp, model, manifest, log=log)
            device = manifest["validation"]["device"]
        record_selfcheck(tmp, manifest, tokenizer, device)
        _write_manifest(tmp, manifest)
        load_manifest(tmp)  # what the runtime will check: the schema holds for what was written
        result.update(manifest)

    try:
        write_folder_atomically(out, fill)
    except OSError as err:
        raise ExportError(f"cannot write {out}: {err}") from None
    return result
