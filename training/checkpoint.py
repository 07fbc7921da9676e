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
half-written checkpoint under the destination's name, and it replaces only what `is_checkpoint`
recognises (or an empty folder): `check_replaceable`, the one overwrite check of every checkpoint
writer (save_model, star-train's OUT/last and OUT/best).

A star-train run folder holds `best/` (lowest validation loss) and `last/` (the latest save);
`resolve_checkpoint` turns either a checkpoint folder or a run folder into the checkpoint to use
(best, else last), for star-export, star-eval and star-analyze.
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
RUN_BEST, RUN_LAST = "best", "last"  # a star-train run folder's checkpoints, in the order they are preferred
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
    check_replaceable(directory)

    def fill(tmp: Path) -> None:
        if tokenizer_dir is not None:
            Tokenizer.from_dir(tokenizer_dir).save(tmp)
        model.config.to_json_file(tmp / CONFIG_FILE)
        star = {"format_version": FORMAT_VERSION, **model.star_config.to_dict()}
        (tmp / STAR_CONFIG_FILE).write_text(json.dumps(star, indent=2) + "\n")
        save_file(weights_for_saving(model), str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})

    write_folder_atomically(directory, fill)


def is_checkpoint(folder: str | PathLike) -> bool:
    """Whether `folder` is a complete checkpoint this code wrote and reads: config.json,
    model.safetensors and a star_config.json of this FORMAT_VERSION."""
    folder = Path(folder)
    if not all((folder / name).is_file() for name in (CONFIG_FILE, STAR_CONFIG_FILE, WEIGHTS_FILE)):
        return False
    try:
        return _read_json(folder / STAR_CONFIG_FILE).get("format_version") == FORMAT_VERSION
    except CheckpointError:
        return False


def is_star_folder(folder: str | PathLike) -> bool:
    """Whether `folder` holds STAR's own files (a star_config.json), complete or not, rather than
    BlenderBot-Small's alone; `is_checkpoint` says whether it is complete."""
    return (Path(folder) / STAR_CONFIG_FILE).is_file()


def check_replaceable(folder: str | PathLike) -> None:
    """CheckpointError unless `folder` is absent, an empty folder, or a checkpoint (`is_checkpoint`):
    a writer replaces only what it wrote, never a user's files that happen to sit at that name."""
    folder = Path(folder)
    if not folder.exists() and not folder.is_symlink():
        return
    if folder.is_dir() and not folder.is_symlink() and (is_checkpoint(folder) or not any(folder.iterdir())):
        return
    raise CheckpointError(f"refusing to replace {folder}: it exists and is not a checkpoint folder; "
                          "move it away or choose another output folder")


def resolve_checkpoint(path: str | PathLike) -> tuple[Path, str | None]:
    """The checkpoint to use for `path`, and a line saying which when it is not `path` itself.

    path: a checkpoint folder (used as is) or a star-train run folder (its --out), whose
    RUN_BEST checkpoint is used when there is one, else RUN_LAST (a run stopped by --max-steps or
    Ctrl-C before its first validation has only last/). CheckpointError says what to pass instead.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such folder; give a star-train run folder (its --out) or a checkpoint "
                              f"in one (RUN/{RUN_BEST} or RUN/{RUN_LAST})")
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file; give a star-train run folder (its --out) or a checkpoint folder")
    if is_checkpoint(path):
        return path, None
    for name in (RUN_BEST, RUN_LAST):
        if is_checkpoint(path / name):
            why = ("the best validation loss" if name == RUN_BEST
                   else f"the latest save; the run has no {RUN_BEST}/ yet, it is written at the end of an epoch")
            return path / name, f"checkpoint {path / name} ({why})"
    if (path / RUN_BEST).exists() or (path / RUN_LAST).exists():
        raise CheckpointError(f"{path}: its {RUN_BEST}/ and {RUN_LAST}/ are not complete checkpoints; resume the run "
                              f"with star-train --resume --out {path}, or give another checkpoint")
    if (path / CONFIG_FILE).is_file():
        raise CheckpointError(f"{path}: a BlenderBot-Small folder without STAR ({STAR_CONFIG_FILE} is missing); "
                              f"train it first: star-train --base {path} --out RUN, then give RUN")
    raise CheckpointError(f"{path} is neither a checkpoint ({STAR_CONFIG_FILE}, {WEIGHTS_FILE}) nor a star-train run "
                          f"folder ({RUN_BEST}/ or {RUN_LAST}/); give the --out folder of star-train")


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
    if star_config is None and (preset is not None or not is_star_folder(name_or_path)):
        raise ValueError(
            f"{name_or_path or preset!r} has no STAR config: pass star_config with the tokenizer's strategy_token_ids"
        )
    if vocab_size is None and star_config is not None:
        vocab_size = max(star_config.strategy_token_ids, default=-1) + 1
    if preset is not None:
        return StarForConditionalGeneration(base_config(preset, vocab_size), star_config)

    path = Path(name_or_path)
    if is_star_folder(path):
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


_SIZE_FIELDS = ("vocab_size", "d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads",
                "decoder_attention_heads", "encoder_ffn_dim", "decoder_ffn_dim", "max_position_embeddings")


def estimated_parameters(config: BlenderbotSmallConfig, star: StarConfig) -> int:
    """The parameter count the configs describe, from the sizes alone (no tensor is built).

    V d (tied embedding) + 2 P d (positions) + L_enc (4 d^2 + 2 d F_enc) + L_dec (8 d^2 + 2 d F_dec)
    + STAR's gate and refiner FFNs (2 d h each); biases and norms (O(L d)) are left out, so this is
    a lower bound (measured: tiny preset 1,836,288 estimated, 1,839,424 built; compact 18,262,016 and
    18,346,496).
    """
    d = config.d_model
    star_ffn = sum(2 * d * (width or d) for width in (star.gate_hidden, star.refine_hidden))
    return (config.vocab_size * d + 2 * config.max_position_embeddings * d
            + config.encoder_layers * (4 * d * d + 2 * d * config.encoder_ffn_dim)
            + config.decoder_layers * (8 * d * d + 2 * d * config.decoder_ffn_dim) + star_ffn)


def check_sizes(path: Path, config: BlenderbotSmallConfig, star: StarConfig, weights_bytes: int) -> None:
    """CheckpointError for sizes that are not positive integers, or that describe a model larger than
    the weights file can hold (at least one byte per parameter): checked before any tensor exists,
    so an edited config.json (d_model 10^6, 10^5 layers) is one line, not a 230 GB allocation."""
    bad = [f"{name} {getattr(config, name, None)!r}" for name in _SIZE_FIELDS
           if isinstance(getattr(config, name, None), bool) or not isinstance(getattr(config, name, None), int)
           or getattr(config, name) < 1]
    if bad:
        raise CheckpointError(f"{path / CONFIG_FILE}: sizes must be positive integers, not {', '.join(bad)}; "
                              "restore the config.json star-train wrote")
    n = estimated_parameters(config, star)
    if n > weights_bytes:
        raise CheckpointError(
            f"{path / CONFIG_FILE} describes a model of at least {n:,} parameters, but {WEIGHTS_FILE} holds "
            f"{weights_bytes:,} bytes: the config does not belong to these weights; restore the config.json "
            "star-train wrote"
        )


def _load_star_folder(path: Path, star_config: StarConfig | None) -> StarForConditionalGeneration:
    for name in (CONFIG_FILE, STAR_CONFIG_FILE, WEIGHTS_FILE):
        if not (path / name).is_file():
            raise CheckpointError(f"{path}: missing {name}, not a complete STAR checkpoint; give the folder star-train "
                                  "wrote (its run folder, best/ or last/)")
    config = _read_base_config(path / CONFIG_FILE)
    saved = _read_star_config(path / STAR_CONFIG_FILE)
    tensors = _read_tensors(path / WEIGHTS_FILE)  # the file's own size, whatever the configs say
    check_sizes(path, config, star_config or saved, (path / WEIGHTS_FILE).stat().st_size)
    fresh_star = star_config is not None and not saved.use_star
    if fresh_star:
        tensors = {k: v for k, v in tensors.items() if not k.startswith(STAR_PREFIX)}
    try:
        model = StarForConditionalGeneration(config, star_config or saved)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: cannot build the model its configs describe: {e}; restore the configs "
                              "star-train wrote") from e
    _load_tensors(model, tensors, path / WEIGHTS_FILE, skip_prefix=STAR_PREFIX if fresh_star else None)
    return model


def _read_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path.parent}: missing {path.name}; give a complete checkpoint folder") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not readable JSON ({e}); restore the file star-train wrote") from e
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: expected a JSON object; restore the file star-train wrote")
    return d


def _read_base_config(path: Path) -> BlenderbotSmallConfig:
    d = _read_json(path)
    if d.get("model_type") != BlenderbotSmallConfig.model_type:
        raise CheckpointError(
            f"{path}: model_type is {d.get('model_type')!r}, not {BlenderbotSmallConfig.model_type!r}: "
            "another architecture"
        )
    try:
        return BlenderbotSmallConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: not a BlenderBot-Small config ({e}); restore the config.json star-train wrote") from e


def _read_star_config(path: Path) -> StarConfig:
    d = _read_json(path)
    version = d.pop("format_version", None)
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {version!r}; this code reads version {FORMAT_VERSION}: use the "
                              "star-esc version that wrote it, or retrain")
    try:
        return StarConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from e


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own SafetensorError, or OSError, on a bad file
        raise CheckpointError(f"{path}: not a readable safetensors file ({e}); the file is damaged: use another "
                              "checkpoint (e.g. the run's other one, best/ or last/)") from e


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
        raise CheckpointError(f"{path} does not match the architecture in its config.json; " + "; ".join(problems)
                              + "; restore the config.json that was saved with these weights")
    model.load_state_dict(
        {(k if k.startswith(STAR_PREFIX) else "base." + k): v for k, v in tensors.items()}, strict=False
    )
