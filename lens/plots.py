"""All figures of the project (PNG via matplotlib), written atomically."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from lens.io import atomic_path  # noqa: E402


def save_figure(fig: "plt.Figure", path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_layer_metrics(results: dict[str, Any], path: str | Path, title: str = "") -> Path:
    """Per-layer cross-entropy and KL to the final layer (bits), one line per lens."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    panels = (("ce", "cross-entropy vs next token"), ("kl", "KL(final || lens)"))
    for ax, (metric, label) in zip(axes, panels):
        for name, per_layer in results["lenses"].items():
            bits = [v / math.log(2) for v in per_layer[metric]]
            ax.plot(range(len(bits)), bits, marker="o", markersize=3, label=f"{name} lens")
        ax.set_xlabel("layer (residual after n blocks)")
        ax.set_ylabel(f"{label} [bits]")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title or f"held-out evaluation, {results['tokens']} tokens")
    return save_figure(fig, path)
