"""The exporter's self-check: the bundle, run by star_runtime, against the PyTorch model.

For a few random contexts (fixed seed; lengths up to the 160-token maximum) both decode in lock
step for `steps` positions, fed the same tokens (PyTorch's greedy choice), and every logit is
compared: the strategy logits at position 0 (from h), the response logits after (from h').

    float32  max |logits_bundle - logits_torch| <= ATOL["float32"]         (same function, other op order)
    float16  max |...| <= ATOL["float16"] * max(1, max |logits_torch|)
    int8     relative RMS error of the logits <= INT8_MAX_REL_RMS and the strategy argmax agreement
             is reported (random-init models have near-tied strategy logits, so it is not a gate)

A disagreement beyond tolerance raises ValidationError, and the exporter keeps nothing. The
statistics cannot pass on NaN: a non-finite logit on either side makes every error infinite
(Python's max(0.0, nan) is 0.0, which let an all-NaN checkpoint pass with "0.00e+00").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from star_export.weights import ExportError
from star_runtime.engine import Engine
from star_training.model import StarForConditionalGeneration

# float32: measured 1.2e-7 (tiny preset) and 4e-6 (90M base), random weights; 1e-4 leaves room
# for other CPUs' kernels, and a wrong weight is still caught (tests/test_export.py: one LayerNorm
# gamma 10% off). float16: measured 2.4e-3 of 7 on the base with float32 compute (CPU).
ATOL = {"float32": 1e-4, "float16": 5e-2}
INT8_MAX_REL_RMS = 0.1  # measured 0.009 (tiny) and 0.018 (base), random weights
CONTEXT_LENGTHS = (160, 37, 5)


class ValidationError(ExportError):
    """The bundle computes something else than the checkpoint."""


def _contexts(vocab_size: int, first_regular: int, n_special_tail: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(first_regular, vocab_size - n_special_tail, size=(1, n), dtype=np.int64)
            for n in CONTEXT_LENGTHS]


@torch.inference_mode()
def compare(folder, model: StarForConditionalGeneration, manifest: dict[str, Any], *, steps: int = 6,
            device: str = "cpu") -> dict[str, Any]:
    """Lock-step decoding of bundle and model; returns the error statistics (see module doc).

    manifest: the bundle's, as the exporter built it (the golden self-check is not in it yet).
    """
    engine = Engine.open(folder, manifest, device=device, check_precision=False)
    special = manifest["special_ids"]
    sids = manifest["strategies"]["token_ids"]
    max_abs, sq_err, sq_ref, agree, scale, finite = 0.0, 0.0, 0.0, 0, 0.0, True
    contexts = _contexts(model.config.vocab_size, max(special.values()) + 1, len(sids))
    for ids in contexts:
        ids_t = torch.from_numpy(ids)
        mask = torch.ones_like(ids_t)
        e = model.encode(ids_t, mask)
        run = engine.start(ids)
        token = torch.tensor([[special["bos"]]])
        h, cache = model.decode(token, e, mask)
        state = model.empty_star_state(1)
        for t in range(steps + 1):
            if t > 0:
                h, cache = model.decode(token, e, mask, past_key_values=cache)
            fused, state = model.fuse_step(h[:, 0], state)
            logits_b = run.step(int(token))
            if t == 0:
                ref = model.strategy_logits(h[:, 0])[0].numpy()
                got = engine.strategy_logits(run.hidden)
                agree += int(ref.argmax() == got.argmax())
                token = torch.tensor([[sids[int(ref.argmax())]]])
            else:
                ref = model.lm_logits(fused)[0].numpy()[engine.output_ids]  # the tokens the bundle's head keeps
                got = logits_b
                token = torch.tensor([[int(engine.output_ids[ref.argmax()])]])
            diff = got.astype(np.float64) - ref
            finite = finite and bool(np.isfinite(diff).all() and np.isfinite(ref).all())
            max_abs = max(max_abs, float(np.abs(diff).max()))
            scale = max(scale, float(np.abs(ref).max()))
            sq_err += float((diff**2).sum())
            sq_ref += float(((ref - ref.mean()) ** 2).sum())
    rel_rms = (sq_err / sq_ref) ** 0.5 if sq_ref else 0.0
    if not finite:
        max_abs = rel_rms = float("inf")
    return {
        "contexts": len(contexts),
        "positions": len(contexts) * (steps + 1),
        "max_abs_logit_diff": max_abs,
        "max_abs_logit": scale,
        "rel_rms_logit_diff": rel_rms,
        "strategy_agreement": agree / len(contexts),
    }


def validate_bundle(folder, model: StarForConditionalGeneration, manifest: dict[str, Any], *,
                    log: Callable[[str], None] = print, device: str | None = None) -> dict[str, Any]:
    """Run `compare` and raise ValidationError beyond tolerance; returns the statistics."""
    precision = manifest["precision"]
    if device is None:
        import onnxruntime as ort

        cuda = "CUDAExecutionProvider" in ort.get_available_providers()
        device = "cuda" if precision == "float16" and cuda else "cpu"
        if precision == "float16" and not cuda:
            log("note: no CUDA here: the float16 bundle is checked on the CPU (onnxruntime computes its float16 "
                "ops in float32), which checks the graphs and weights but not CUDA's kernels")
    stats = compare(folder, model, manifest, device=device)
    stats["device"] = device
    if precision == "int8":
        ok = stats["rel_rms_logit_diff"] <= INT8_MAX_REL_RMS
        bound = f"relative RMS error {stats['rel_rms_logit_diff']:.4f} (limit {INT8_MAX_REL_RMS})"
    else:
        limit = ATOL[precision] * (max(1.0, stats["max_abs_logit"]) if precision == "float16" else 1.0)
        ok = stats["max_abs_logit_diff"] <= limit
        bound = f"max |logit difference| {stats['max_abs_logit_diff']:.2e} (limit {limit:.1e})"
    log(f"validation ({precision}, {device}, {stats['positions']} positions of {stats['contexts']} contexts): "
        f"{bound}, strategy argmax agreement {stats['strategy_agreement']:.0%}")
    if not ok:
        raise ValidationError(f"the exported bundle disagrees with the PyTorch model: {bound}; nothing was written")
    return stats
