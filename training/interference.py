"""Gradient interference of the two tasks: cosine of grad L_LM and grad L_ST (paper Table 1).

For one batch and a set P of parameter tensors both losses reach,

    g_LM = d L_LM / d theta_P,   g_ST = d L_ST / d theta_P          flattened and concatenated, [n_P]
    cos  = <g_LM, g_ST> / (|g_LM| |g_ST|)                           in [-1, 1]

The paper reports -0.05 for BlenderBot-Joint and 0.47 with STAR. The cosine is that of the
unweighted losses: the training loss weighs them by (1 - lambda) and lambda, positive scalars
that do not change a cosine.

Which parameters (P, our decision; the paper says only "shared"): the tensors for which autograd
gives a gradient from BOTH losses. For BlenderBot-Joint and for STAR alike that is the whole
base model (encoder, decoder, the shared embedding tied with the LM head; L_ST reaches every
decoder layer through position 0). The STAR module is never in P: L_ST reads the original state
h_0, so only L_LM reaches STAR. Elements inside a tensor of P that only one loss reaches (the
embedding rows of tokens only one task sees) count as zeros of the other gradient. The group
"embedding" is the shared token embedding alone, the only shared tensor that training stage 2
updates (stage 2 trains STAR and the embedding).

The model runs in eval mode (no dropout), so a batch's cosine is a deterministic function of
the weights; over N batches we report the mean with a t-interval.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

# the batches' cosines are averaged with the one interval of the project's reports
from star_training.intervals import Interval, t_interval
from star_training.model import StarForConditionalGeneration

GROUPS = ("shared", "embedding")  # "shared": every tensor both losses reach; "embedding": the tied W_E


@dataclass(frozen=True)
class BatchCosine:
    cosine: dict[str, float]  # group -> cosine of g_LM and g_ST over that group
    shared_names: tuple[str, ...]  # the parameter tensors of group "shared"
    shared_numel: int  # their number of elements


def batch_gradient_cosine(model: StarForConditionalGeneration, batch: dict[str, torch.Tensor]) -> BatchCosine:
    """The cosine of grad L_LM and grad L_ST on one collated batch (model in eval mode).

    Dot products and norms are summed tensor by tensor in float64, which equals the cosine of the
    concatenated vectors without materialising two copies of every gradient.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # tied tensors listed once
    if not named:
        raise ValueError("no parameter requires a gradient")
    out = model(**batch)
    params = [p for _, p in named]
    g_lm = torch.autograd.grad(out.loss_lm, params, retain_graph=True, allow_unused=True)
    g_st = torch.autograd.grad(out.loss_st, params, allow_unused=True)
    embedding = model.base.get_input_embeddings().weight
    sums = {g: torch.zeros(3, dtype=torch.float64) for g in GROUPS}  # <a,b>, |a|^2, |b|^2
    shared_names, shared_numel = [], 0
    for (name, p), a, b in zip(named, g_lm, g_st):
        if a is None or b is None:  # reached by one loss only (STAR: L_LM alone) or by neither
            continue
        shared_names.append(name)
        shared_numel += p.numel()
        a, b = a.double().flatten(), b.double().flatten()
        terms = torch.stack([a @ b, a @ a, b @ b]).cpu()
        sums["shared"] += terms
        if p is embedding:
            sums["embedding"] += terms
    cosine = {g: float(s[0] / (s[1].sqrt() * s[2].sqrt())) if s[1] > 0 and s[2] > 0 else math.nan
              for g, s in sums.items()}
    return BatchCosine(cosine, tuple(shared_names), shared_numel)


@dataclass(frozen=True)
class CosineSummary:
    per_batch: dict[str, list[float]]  # group -> one cosine per batch
    interval: dict[str, Interval]  # group -> mean and 95% t-interval over the batches
    shared_names: tuple[str, ...]
    shared_numel: int


def gradient_cosine(
    model: StarForConditionalGeneration, batches: Iterable[dict[str, torch.Tensor]], *, device: torch.device
) -> CosineSummary:
    """`batch_gradient_cosine` over `batches`, in eval mode with every parameter trainable; the
    model's mode and requires_grad flags are restored afterwards."""
    was_training = model.training
    flags = [p.requires_grad for p in model.parameters()]
    model.eval().requires_grad_(True)
    per_batch: dict[str, list[float]] = {g: [] for g in GROUPS}
    names: tuple[str, ...] | None = None
    numel = 0
    try:
        for batch in batches:
            result = batch_gradient_cosine(model, {k: v.to(device) for k, v in batch.items()})
            if names is not None and result.shared_names != names:  # reach is structural, so this means a bug
                raise RuntimeError("the shared parameters changed between batches")
            names, numel = result.shared_names, result.shared_numel
            for g in GROUPS:
                per_batch[g].append(result.cosine[g])
    finally:
        model.train(was_training)
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
    if names is None:
        raise ValueError("no batches to score")
    return CosineSummary(per_batch, {g: t_interval(v) for g, v in per_batch.items()}, names, numel)
