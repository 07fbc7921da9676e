"""Saving and loading STAR checkpoints.

A checkpoint is a folder that transformers can also open as a plain BlenderBot-Small
(`BlenderbotSmallForConditionalGeneration.from_pretrained(folder)` ignores the STAR tensors):

    config.json        the base's transformers BlenderbotSmallConfig
    star_config.json   StarConfig as a plain dict, plus "format_version"
    model.safetensors  every weight once: base tensors under transformers' names, STAR tensors
                       under "star.*"; the tied shared embedding (= encoder and decoder
                       embed_tokens = lm_head) is stored as "model.shared.weight" only
    tokenizer files    when saved with a tokenizer folder (star_runtime.tokenizer.Tokenizer.save)

The folder is written with `folders.write_folder_atomically`, so a crash never leaves a
half-written checkpoint under the destination's name.
"""

from __future__ import annotations

import json
import re
from os import PathLike
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import BlenderbotSmallConfig, BlenderbotSmallForConditionalGeneration

from star_runtime.tokenizer import Tokenizer
from star_training.config import StarConfig, base_config
from star_training.folders import write_folder_atomically
from star_training.model import StarForConditionalGeneration, resize_vocab

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
STAR_CONFIG_FILE = "star_config.json"
WEIGHTS_FILE = "model.safetensors"
STAR_PREFIX = "star."
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")  # "facebook/blenderbot_small-90M"


class CheckpointError(Exception):
    """A checkpoint folder that is missing, incomplete, corrupt or of another architecture."""


# -- saving -----------------------------------------------------------------------------------
def weights_for_saving(model: StarForConditionalGeneration) -> dict[str, torch.Tensor]:
    """The state dict under checkpoint names, each tied tensor once (the first name it has)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:  # a tied alias of a tensor already stored
            continue
        seen.add(tensor.data_ptr())
        out[name.removeprefix("base.")] = tensor.detach().contiguous()
    return out


def save_model(
    model: StarForConditionalGeneration, directory: str | PathLike, *, tokenizer_dir: str | PathLike | None = None
) -> None:
    """Write `model` (and the tokenizer in `tokenizer_dir`, if given) as a checkpoint folder.

    An existing folder at `directory` is replaced only if it is a checkpoint itself (or empty).
    """
    directory = Path(directory)
    if directory.exists() and not _is_replaceable(directory):
        raise CheckpointError(f"refusing to overwrite {directory}: it exists and is not a checkpoint folder")

    def fill(tmp: Path) -> None:
        if tokenizer_dir is not None:
            Tokenizer.from_dir(tokenizer_dir).save(tmp)
        model.config.to_json_file(tmp / CONFIG_FILE)
        star = {"format_version": FORMAT_VERSION, **model.star_config.to_dict()}
        (tmp / STAR_CONFIG_FILE).write_text(json.dumps(star, indent=2) + "\n")
        save_file(weights_for_saving(model), str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})

    write_folder_atomically(directory, fill)


def _is_replaceable(directory: Path) -> bool:
    return directory.is_dir() and (_is_star_folder(directory) or not any(directory.iterdir()))


# -- loading ----------------------------------------------------------------------------------
def load_model(
    name_or_path: str | PathLike | None = None,
    *,
    star_config: StarConfig | None = None,
    preset: str | None = None,
    vocab_size: int | None = None,
) -> StarForConditionalGeneration:
    """A STAR model from one of four sources.

    - a STAR checkpoint folder (has star_config.json): weights and configs as saved. A given
      `star_config` replaces the saved one; if the saved one had STAR bypassed (a stage-1
      checkpoint, whose STAR weights were never trained), STAR is built fresh from it.
    - a local BlenderBot-Small folder (config.json + weights) or a hub name such as
      "facebook/blenderbot_small-90M": the base's weights, a fresh STAR; `star_config` is required.
    - name_or_path None and `preset` ("tiny", "compact", "base"): random initialisation;
      `star_config` is required.
    vocab_size: the tokenizer's, strategy tokens included; default max(strategy_token_ids) + 1
    (the tokenizer appends them last). A smaller base vocabulary is grown (`resize_vocab`).
    """
    if (name_or_path is None) == (preset is None):
        raise ValueError("give either a checkpoint (name_or_path) or a preset, not both or neither")
    if star_config is None and (preset is not None or not _is_star_folder(Path(name_or_path))):
        raise ValueError(
            f"{name_or_path or preset!r} has no STAR config: pass star_config with the tokenizer's strategy_token_ids"
        )
    if vocab_size is None and star_config is not None:
        vocab_size = max(star_config.strategy_token_ids, default=-1) + 1
    if preset is not None:
        return StarForConditionalGeneration(base_config(preset, vocab_size), star_config)

    path = Path(name_or_path)
    if _is_star_folder(path):
        model = _load_star_folder(path, star_config)
        if vocab_size is not None and vocab_size != model.config.vocab_size:
            raise CheckpointError(
                f"{path}: the model has {model.config.vocab_size} tokens but the tokenizer {vocab_size}"
            )
        return model
    base = _load_base(name_or_path)
    if vocab_size > base.config.vocab_size:
        resize_vocab(base, vocab_size)
    try:
        return StarForConditionalGeneration(base.config, star_config, base=base)
    except ValueError as e:
        raise CheckpointError(f"{name_or_path}: {e}") from e


def _is_star_folder(path: Path) -> bool:
    return (path / STAR_CONFIG_FILE).is_file()


def _load_base(name_or_path: str | PathLike) -> BlenderbotSmallForConditionalGeneration:
    """transformers' own loader, for a local folder or a hub name."""
    path = Path(name_or_path)
    if path.is_dir():
        _read_base_config(path / CONFIG_FILE)  # a clear message for a missing file or another architecture
    elif path.exists():
        raise CheckpointError(f"{path} is a file; a checkpoint is a folder")
    elif not _HUB_ID.match(str(name_or_path)):
        raise CheckpointError(f"no checkpoint folder at {path}")
    try:
        return BlenderbotSmallForConditionalGeneration.from_pretrained(str(name_or_path))
    except (OSError, ValueError, RuntimeError) as e:
        where = "" if path.is_dir() else " (no such folder; tried the Hugging Face hub)"
        raise CheckpointError(f"cannot load BlenderBot-Small weights from {name_or_path}{where}: {e}") from e


def _load_star_folder(path: Path, star_config: StarConfig | None) -> StarForConditionalGeneration:
    for name in (CONFIG_FILE, STAR_CONFIG_FILE, WEIGHTS_FILE):
        if not (path / name).is_file():
            raise CheckpointError(f"{path}: missing {name}, not a complete STAR checkpoint")
    config = _read_base_config(path / CONFIG_FILE)
    saved = _read_star_config(path / STAR_CONFIG_FILE)
    tensors = _read_tensors(path / WEIGHTS_FILE)
    fresh_star = star_config is not None and not saved.use_star
    if fresh_star:
        tensors = {k: v for k, v in tensors.items() if not k.startswith(STAR_PREFIX)}
    try:
        model = StarForConditionalGeneration(config, star_config or saved)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: cannot build the model its configs describe: {e}") from e
    _load_tensors(model, tensors, path / WEIGHTS_FILE, skip_prefix=STAR_PREFIX if fresh_star else None)
    return model


def _read_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path.parent}: missing {path.name}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not readable JSON ({e})") from e
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return d


def _read_base_config(path: Path) -> BlenderbotSmallConfig:
    d = _read_json(path)
    if d.get("model_type") != BlenderbotSmallConfig.model_type:
        raise CheckpointError(
            f"{path}: model_type is {d.get('model_type')!r}, not {BlenderbotSmallConfig.model_type!r}: "
            "another architecture"
        )
    return BlenderbotSmallConfig.from_dict(d)


def _read_star_config(path: Path) -> StarConfig:
    d = _read_json(path)
    version = d.pop("format_version", None)
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {version!r}; this code reads version {FORMAT_VERSION}")
    try:
        return StarConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from e


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own SafetensorError, or OSError, on a bad file
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e


def _load_tensors(
    model: StarForConditionalGeneration,
    tensors: dict[str, torch.Tensor],
    path: Path,
    *,
    skip_prefix: str | None = None,
) -> None:
    """Copy `tensors` (checkpoint names) into `model`, after checking that they are exactly the
    model's tensors: every name known, every shape equal, nothing missing but tied aliases."""
    expected = {name.removeprefix("base."): t for name, t in model.state_dict().items()}
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [
        f"{k} {tuple(tensors[k].shape)} (the config says {tuple(expected[k].shape)})"
        for k in tensors
        if k in expected and tensors[k].shape != expected[k].shape
    ]
    present = {expected[k].data_ptr() for k in tensors if k in expected}
    missing = sorted(
        k
        for k, t in expected.items()
        if k not in tensors and t.data_ptr() not in present and not (skip_prefix and k.startswith(skip_prefix))
    )
    problems = [
        f"{len(names)} {label}: {', '.join(names[:5])}{', ...' if len(names) > 5 else ''}"
        for label, names in (("unknown tensors", unexpected), ("with wrong shapes", wrong), ("missing", missing))
        if names
    ]
    if problems:
        raise CheckpointError(f"{path} does not match the architecture in its config.json; " + "; ".join(problems))
    model.load_state_dict(
        {(k if k.startswith(STAR_PREFIX) else "base." + k): v for k, v in tensors.items()}, strict=False
    )
