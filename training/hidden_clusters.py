"""Do the final decoder states cluster by strategy? (paper Figure 3, plus the numbers it omits)

One point per example: the mean of a final decoder state over the example's response positions,

    x = 1/|R| sum_{t in R} s_t,    R = decoder positions t >= 1 whose label is scored     [d]
                                   (they predict the response tokens and __end__),
    s = h' for generation (STAR's fused state; h' = h when STAR is bypassed), or h.

Teacher-forced with the gold strategy token at position 1, as in training and PPL: the states
are those that predict the gold response. Position 0 (the strategy prediction) is left out: it
belongs to the other task. Mean pooling (our decision) gives one point per reply, so a point's
colour is one gold strategy; per-token points would weigh long replies more.

The states read the gold reply's words, so some clustering by strategy comes from the words
alone, for every model alike: a random tiny model reaches ARI 1.0 on the test fixture, whose
replies are one fixed sentence per strategy. Compare models with each other (or with a
random-init model of the same size), not with 0.

On the points X [N, d] and their gold strategies y [N]:
    K-means, k = 8, in the original d-dimensional space (10 starts, fixed seed)
    silhouette = mean over points of (b - a) / max(a, b) for the K-means clusters, in [-1, 1]
                 (a: mean distance to the own cluster, b: to the nearest other cluster)
    ARI        = adjusted Rand index of the K-means clusters against y: 1 identical partitions,
                 about 0 for chance, negative below chance
    t-SNE      to 2D (fixed seed, PCA start) for the picture only; no number is read from it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.manifold import TSNE
from sklearn.metrics import adjusted_rand_score, silhouette_score
from threadpoolctl import threadpool_limits

from star_training.data import Example, collate
from star_training.model import IGNORE_INDEX, StarForConditionalGeneration

K = 8  # as many clusters as strategies, as in the paper
STATE_H, STATE_FUSED = "h", "h'"


@torch.no_grad()
def response_states(
    model: StarForConditionalGeneration,
    examples: list[Example],
    *,
    pad_id: int,
    batch_size: int,
    device: torch.device,
) -> dict[str, np.ndarray]:
    """{"h": [N, d], "h'": [N, d]}: each state's mean over the response positions (eval mode)."""
    was_training = model.training
    model.eval()
    pooled: dict[str, list[np.ndarray]] = {STATE_H: [], STATE_FUSED: []}
    try:
        for i in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in collate(examples[i : i + batch_size], pad_id).items()}
            out = model(**batch)
            w = (batch["labels"][:, 1:] != IGNORE_INDEX).unsqueeze(-1).float()  # [B, T-1, 1]
            for name, states in ((STATE_H, out.hidden), (STATE_FUSED, out.fused)):
                mean = (states[:, 1:].float() * w).sum(1) / w.sum(1).clamp(min=1)  # [B, d]
                pooled[name].append(mean.cpu().numpy())
    finally:
        model.train(was_training)
    return {name: np.concatenate(parts) for name, parts in pooled.items()}


@dataclass(frozen=True)
class Clustering:
    points_2d: np.ndarray  # [N, 2] t-SNE of the states
    clusters: np.ndarray  # [N] K-means cluster of each state
    silhouette: float  # of the K-means clusters in the original space; nan if K-means found one cluster
    ari: float  # K-means clusters vs gold strategies


def cluster_states(x: np.ndarray, gold: np.ndarray, *, seed: int, k: int = K) -> Clustering:
    """K-means, silhouette and ARI in the original space of x [N, d]; t-SNE of x for plotting."""
    n = len(x)
    if n <= k:
        raise ValueError(f"{n} points cannot form {k} clusters; need at least {k + 1}")
    clusters = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(x)
    found = len(np.unique(clusters))  # fewer than k when points coincide
    silhouette = float(silhouette_score(x, clusters)) if 2 <= found < n else float("nan")
    # perplexity must stay below N; 30 (sklearn's default) from N = 91 up, N / 3 below that.
    tsne = TSNE(n_components=2, perplexity=min(30.0, (n - 1) / 3), init="pca", random_state=seed)
    # One OpenMP thread: sklearn's Barnes-Hut gradient spends its time in thread barriers when the
    # cores are shared. Measured on this project's 2 shared cores: 2000 points x 256 dims 74 s -> 31 s,
    # 12 points 3.4 s -> 0.2 s. The layout is the same either way.
    with threadpool_limits(1, user_api="openmp"):
        points_2d = tsne.fit_transform(x)
    return Clustering(points_2d, clusters, silhouette, float(adjusted_rand_score(gold, clusters)))
