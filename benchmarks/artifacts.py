"""The files the backends load, built once into a work folder and reused when nothing changed.

    checkpoint/           the STAR model (eager PyTorch); transformers opens it as a plain
                          BlenderBot-Small too (checkpoint.py), which is what optimum exports
    checkpoint-nostar/    the same weights with STAR bypassed (h' = h), for STAR's share of the time
    optimum/              optimum's ONNX export of the base model (no STAR): encoder_model.onnx and
                          decoder_model_merged.onnx, the files ORTModelForSeq2SeqLM loads
    bundle-float32[-nostar]/, bundle-int8[-nostar]/    star-export's bundles
    ctranslate2-float32/, ctranslate2-int8/    CTranslate2's conversion of the base model (no STAR;
                          ctranslate2_convert.py), weights quantized at conversion

Where the model comes from (`resolve_source`), first match wins:
    --checkpoint CKPT       a STAR checkpoint folder: every backend runs its weights;
    the default bundle      $STAR_BUNDLE, else star_runtime/data/default_bundle (as star-chat and Runtime.load() find
                            it): the runtime backend of its precision runs it as shipped; the others
                            run random weights of its configuration (the timing of a dense model does
                            not depend on the values of its weights);
    otherwise               random weights, fixed seed, with the real BlenderBot-Small-90M
                            configuration (the "base" preset).
With --quick, the tiny preset's random weights, whatever is installed.

`work/artifacts.json` records what each folder was built from (a key: the source, the seed, the
library versions, for bundles the exporter's source); a folder is rebuilt only when its key
changed, so a second run with the same --work-dir starts at once.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from harness import BenchmarkError, BenchmarkUsageError, library_versions

KEYS_FILE = "artifacts.json"
OPTIMUM_UNUSED = ("decoder_model.onnx", "decoder_with_past_model.onnx")  # the merged decoder replaces both


@dataclass(frozen=True)
class ModelSource:
    """What the benchmark runs: a checkpoint as given, or random weights of a configuration."""

    description: str
    checkpoint: str | None = None  # a STAR checkpoint to use as is
    preset: str | None = None  # random weights of this preset ...
    sizes: dict[str, int] | None = None  # ... with these sizes replaced (a default bundle's)
    star: dict[str, Any] | None = None  # ... and this StarConfig (a default bundle's; None: the default)
    tokenizer: str | None = None  # tokenizer folder of the random model
    bundle: str | None = None  # a shipped bundle, run as is by the runtime backend of its precision
    bundle_precision: str | None = None


SIZE_KEYS = ("d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads", "decoder_attention_heads",
             "encoder_ffn_dim", "decoder_ffn_dim", "max_position_embeddings")


def resolve_source(checkpoint: Path | None, tokenizer: Path | None, preset: str, *,
                   default_bundle_first: bool = True) -> ModelSource:
    """See the module docstring (--quick passes default_bundle_first=False: always the tiny
    random model); a BenchmarkError names what is missing."""
    if checkpoint is not None:
        from star_training.checkpoint import is_checkpoint

        if not is_checkpoint(checkpoint):
            raise BenchmarkUsageError(f"{checkpoint}: not a STAR checkpoint folder (config.json, star_config.json "
                                      "and model.safetensors)")
        if not (checkpoint / "vocab.json").is_file():
            raise BenchmarkUsageError(f"{checkpoint}: no tokenizer files beside the weights (star-export needs them "
                                      "too); save it with star_training.checkpoint.save_model(model, dir, tokenizer_dir=...)")
        return ModelSource(f"checkpoint {checkpoint}", checkpoint=str(checkpoint.resolve()))
    from star_runtime.bundle import load_manifest
    from star_runtime.runtime import default_bundle

    bundle = default_bundle() if default_bundle_first else None
    if bundle is not None:
        try:
            manifest = load_manifest(bundle, verify=False)
        except ValueError as e:
            raise BenchmarkError(f"the default bundle cannot be used: {e}") from None
        sizes = {k: manifest["model_config"][k] for k in SIZE_KEYS if k in manifest["model_config"]}
        return ModelSource(f"the default bundle {bundle} ({manifest['precision']}); the other backends: random "
                           "weights of its configuration", preset="base", sizes=sizes,
                           star=manifest["model_config"].get("star"), tokenizer=str(bundle.resolve()),
                           bundle=str(bundle.resolve()), bundle_precision=manifest["precision"])
    if tokenizer is None:
        from star_training.cli_common import DEFAULT_TOKENIZER

        tokenizer = DEFAULT_TOKENIZER
    if not (tokenizer / "vocab.json").is_file():
        raise BenchmarkUsageError(f"no default bundle and no tokenizer files in {tokenizer}: pass --checkpoint CKPT, "
                             "or --tokenizer DIR (BlenderBot-Small's vocab.json and merges.txt)")
    real = " (the real BlenderBot-Small-90M configuration)" if preset == "base" else ""
    return ModelSource(f"random weights, preset {preset!r}{real}",
                       preset=preset, tokenizer=str(tokenizer.resolve()))


def exporter_fingerprint() -> str:
    """sha256 of star_export's source files: a changed exporter invalidates cached bundles."""
    import star_export

    digest = hashlib.sha256()
    for path in sorted(Path(star_export.__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


class Artifacts:
    """Builds (or finds) each backend's files under `work_dir`."""

    def __init__(self, work_dir: Path, source: ModelSource, seed: int, log: Callable[[str], None], *,
                 validate: bool = True, trim_vocab: Path | None = None) -> None:
        """validate: let star-export run its self-check (bundle against PyTorch); --quick skips it
        (7 of its 56 s on the loaded CI machine), the tests of star-export cover it. trim_vocab:
        export the bundles with the LM head trimmed to the tokens of this ESConv folder's train
        responses (star-export --trim-vocab)."""
        self.work_dir, self.source, self.seed, self.log, self.validate = work_dir, source, seed, log, validate
        self.trim_vocab = trim_vocab
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._done: set[str] = set()  # folders checked or built in this run
        versions = library_versions()
        self._base_key = {"source": asdict(source), "seed": seed,
                          "versions": {k: versions[k] for k in ("star-esc", "torch", "onnxruntime", "optimum-onnx")}}

    def _cached(self, name: str, key: dict[str, Any], build: Callable[[Path], None]) -> Path:
        from star_runtime.atomic import write_text_atomically

        path = self.work_dir / name
        if name in self._done:
            return path
        keys_path = self.work_dir / KEYS_FILE
        keys = json.loads(keys_path.read_text()) if keys_path.is_file() else {}
        key = {**self._base_key, **key}
        if path.is_dir() and keys.get(name) == key:
            self.log(f"reusing {path}")
            self._done.add(name)
            return path
        self.log(f"building {path}")
        keys.pop(name, None)  # a crash mid-build must not leave the old key on a new folder
        write_text_atomically(keys_path, json.dumps(keys, indent=2))
        try:
            build(path)
        except BenchmarkError:
            raise
        except Exception as e:  # third-party builders (optimum, transformers) raise anything
            raise BenchmarkError(f"cannot build {path}: {type(e).__name__}: {e}") from None
        keys[name] = key
        write_text_atomically(keys_path, json.dumps(keys, indent=2))
        self._done.add(name)
        return path

    def checkpoint(self, star: bool = True) -> Path:
        """The STAR checkpoint eager PyTorch loads (and the bundles are exported from)."""
        if star and self.source.checkpoint is not None:
            return Path(self.source.checkpoint)
        if not star:
            return self._cached("checkpoint-nostar", {"star": False}, self._save_without_star)
        return self._cached("checkpoint", {}, self._save_random)

    def _save_random(self, path: Path) -> None:
        import torch

        from star_runtime.tokenizer import Tokenizer
        from star_training.checkpoint import save_model
        from star_training.config import StarConfig, base_config
        from star_training.model import StarForConditionalGeneration

        tokenizer = Tokenizer.from_dir(self.source.tokenizer)
        config = base_config(self.source.preset, tokenizer.vocab_size, pad_id=tokenizer.pad_id,
                             start_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, unk_id=tokenizer.unk_id)
        config.update(self.source.sizes or {})
        torch.manual_seed(self.seed)
        star = StarConfig.from_dict({**(self.source.star or {}), "strategy_token_ids": tokenizer.strategy_ids})
        model = StarForConditionalGeneration(config, star)
        save_model(model, path, tokenizer_dir=self.source.tokenizer)

    def _save_without_star(self, path: Path) -> None:
        from star_training.checkpoint import load_model, save_model

        source = self.checkpoint(star=True)
        model = load_model(source)
        model.star_config.use_star = False
        save_model(model, path, tokenizer_dir=source)

    def optimum(self) -> Path:
        """optimum's export of the checkpoint's base model (transformers ignores the STAR tensors)."""
        checkpoint = self.checkpoint()
        return self._cached("optimum", {"optimum_of": str(checkpoint)},
                            lambda path: self._export_optimum(checkpoint, path))

    @staticmethod
    def _export_optimum(checkpoint: Path, path: Path) -> None:
        from optimum.exporters.onnx import main_export
        from transformers.utils import logging

        from star_training.folders import write_folder_atomically

        def fill(tmp: Path) -> None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # tracer and "weights not used" warnings, expected here
                logging.set_verbosity_error()
                main_export(str(checkpoint), tmp, task="text2text-generation-with-past", do_validation=False)
            for name in OPTIMUM_UNUSED:
                (tmp / name).unlink(missing_ok=True)

        write_folder_atomically(path, fill)

    def ctranslate2(self, quantization: str) -> Path:
        """CTranslate2's conversion of the checkpoint's base model (STAR left out), its weights
        stored as `quantization` (float32 or int8)."""
        import importlib.util

        if importlib.util.find_spec("ctranslate2") is None:
            raise BenchmarkUsageError("the ctranslate2-* backends need CTranslate2: pip install ctranslate2 "
                                      "(the `benchmark` extra)")
        from importlib import metadata

        from ctranslate2_convert import convert_checkpoint

        from star_training.folders import write_folder_atomically

        checkpoint = self.checkpoint()
        converter = Path(__file__).with_name("ctranslate2_convert.py")
        key = {"ctranslate2_of": str(checkpoint), "quantization": quantization,
               "ctranslate2": metadata.version("ctranslate2"),
               "converter": hashlib.sha256(converter.read_bytes()).hexdigest()}
        return self._cached(f"ctranslate2-{quantization}", key, lambda path: write_folder_atomically(
            path, lambda tmp: convert_checkpoint(checkpoint, tmp, quantization)))

    def bundle(self, precision: str, star: bool = True) -> Path:
        """star-export's bundle of the checkpoint (or the shipped bundle of that precision)."""
        if star and self.source.bundle is not None and self.source.bundle_precision == precision:
            return Path(self.source.bundle)
        from star_export.exporter import export_bundle
        from star_export.weights import ExportError

        checkpoint = self.checkpoint(star)
        name = f"bundle-{precision}" + ("" if star else "-nostar")

        def build(path: Path) -> None:
            from star_export.exporter import checkpoint_tokenizer
            from star_export.output_vocab import training_target_ids

            try:
                output_ids = None
                if self.trim_vocab is not None:
                    output_ids, _ = training_target_ids(checkpoint_tokenizer(checkpoint), self.trim_vocab)
                export_bundle(checkpoint, path, precision=precision, validate=self.validate,
                              log=lambda line: self.log(f"  {line}"), output_ids=output_ids)
            except (ExportError, OSError, ValueError) as e:
                raise BenchmarkError(f"star-export failed for {name}: {e}") from None

        key = {"bundle_of": str(checkpoint), "precision": precision, "validated": self.validate,
               "exporter": exporter_fingerprint(), "trim_vocab": str(self.trim_vocab) if self.trim_vocab else None}
        return self._cached(name, key, build)
