"""The Figure 3 picture: t-SNE of final decoder states, coloured by gold strategy, with the
K-means clusters marked (one marker shape per cluster, its number at the cluster's 2D median)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from star_runtime.strategies import STRATEGY_NAMES
from star_training.hidden_clusters import Clustering
from star_training.folders import save_figure_atomically

MARKERS = "osv^DPX*"  # one per K-means cluster (k = 8)


@dataclass(frozen=True)
class Panel:
    title: str
    clustering: Clustering
    gold: np.ndarray  # [N] gold strategy class ids


def plot_panels(panels: list[Panel], png: Path) -> None:
    """One row of panels, a shared legend of strategies and clusters; written atomically."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    colours = plt.get_cmap("tab10").colors
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 6), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        xy, clusters = panel.clustering.points_2d, panel.clustering.clusters
        for c in np.unique(clusters):
            on = clusters == c
            ax.scatter(xy[on, 0], xy[on, 1], c=[colours[g] for g in panel.gold[on]],
                       marker=MARKERS[c % len(MARKERS)], s=14, alpha=0.7, linewidths=0)
            mx, my = np.median(xy[on], axis=0)
            ax.annotate(str(c), (mx, my), fontsize=11, weight="bold", ha="center", va="center",
                        bbox=dict(boxstyle="circle,pad=0.2", fc="white", alpha=0.8))
        c = panel.clustering
        ax.set_title(f"{panel.title}\nsilhouette {c.silhouette:.3f}, ARI {c.ari:.3f}, {len(xy)} points", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    strategies = [Line2D([], [], ls="", marker="o", color=colours[k], label=name)
                  for k, name in enumerate(STRATEGY_NAMES)]
    n_clusters = max(int(p.clustering.clusters.max()) for p in panels) + 1
    shapes = [Line2D([], [], ls="", marker=MARKERS[c % len(MARKERS)], color="grey", label=f"cluster {c}")
              for c in range(n_clusters)]
    fig.legend(handles=strategies, title="gold strategy (colour)", loc="lower left", ncol=4, fontsize=8)
    fig.legend(handles=shapes, title="K-means cluster (shape)", loc="lower right", ncol=4, fontsize=8)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    save_figure_atomically(fig, png, dpi=110)
