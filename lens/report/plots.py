"""All figures of the project (PNG via matplotlib), written atomically, drawn from typed results."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from lens.analysis.depth import DepthEvaluation  # noqa: E402
from lens.analysis.evaluate import LensEvaluation  # noqa: E402
from lens.analysis.picture import METRICS, LossPicture  # noqa: E402
from lens.analysis.spans import SpanEvaluation  # noqa: E402
from lens.artifacts.files import atomic_path  # noqa: E402


def save_figure(fig: "plt.Figure", path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_layer_metrics(results: LensEvaluation, path: str | Path, title: str = "") -> Path:
    """Per-layer cross-entropy and KL to the final layer (bits), one line per lens."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    panels = (("ce", "cross-entropy vs next token"), ("kl", "KL(final || lens)"))
    for ax, (metric, label) in zip(axes, panels):
        for name, per_layer in results.lenses.items():
            values = getattr(per_layer, metric)
            values = values[:-1] if metric == "kl" else values  # the final layer's KL is 0 by definition
            bits = [v / math.log(2) for v in values]
            ax.plot(range(len(bits)), bits, marker="o", markersize=3, label=f"{name} lens")
        ax.set_xlabel("layer (residual after n blocks)")
        ax.set_ylabel(f"{label} [bits]")
        ax.set_yscale("log")  # the logit lens is orders of magnitude off at early layers
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.suptitle(title or f"held-out evaluation, {results.tokens} tokens")
    return save_figure(fig, path)


PANEL_TITLES = {"base": "base model", "intervened": "intervened model", "diff": "intervened - base"}


def plot_token_heatmaps(
    picture: LossPicture, path: str | Path, metric: str = "ce", unit: str = "nats", title: str = ""
) -> Path:
    """Layer x token heatmaps of one lens metric: base, intervened, and intervened - base side by side."""
    panels = {k: v.numpy() for k, v in picture.panels(metric, unit).items()}  # each [L+1, T]
    n_rows, n_tok = panels["base"].shape
    width = max(4.0, 0.42 * n_tok + 1.5)
    fig, axes = plt.subplots(1, len(panels), figsize=(len(panels) * width, max(3.5, 0.2 * n_rows + 1.5)), squeeze=False)
    # 95th percentiles, not maxima: one row (the logit lens on the embeddings) or one attention-sink
    # column can be 10x every other cell; the colour bar arrow marks the clipped values
    vmax = max(float(np.nanpercentile(panels[s], 95)) for s in ("base", "intervened") if s in panels)
    base_top1 = picture.top1_labels("base")
    for ax, (name, arr) in zip(axes[0], panels.items()):
        if name == "diff":
            lim = max(float(np.nanpercentile(np.abs(arr), 95)), 1e-6)
            image = ax.imshow(arr, origin="lower", aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim)
            label, extend = f"{METRICS[metric]}, intervened - base [{unit}]", "both"
        else:
            image = ax.imshow(arr, origin="lower", aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax)
            label, extend = f"{METRICS[metric]} [{unit}]", "max"
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02, extend=extend).set_label(label)
        if n_rows <= 40 and n_tok <= 32:  # cells are still big enough to read a token
            top1 = base_top1 if name == "base" else picture.top1_labels("intervened")
            _write_top1(ax, top1, base_top1 if name == "diff" else None, arr, image.norm)
        ax.set_xticks(range(n_tok), picture.tokens, rotation=90, fontsize=7)
        ax.set_xlabel("input token (each cell scores the prediction of the next one)")
        ax.set_ylabel("layer (residual after n blocks)")
        ax.yaxis.get_major_locator().set_params(integer=True)
        ax.set_title(PANEL_TITLES[name])
    fig.suptitle(title or f"{METRICS[metric]} through the {picture.lens_kind} lens", y=1.02)
    return save_figure(fig, path)


def _write_top1(
    ax: "plt.Axes", top1: list[list[str]], unless_equal: list[list[str]] | None, arr: np.ndarray, norm: Any
) -> None:
    """Write each cell's top-1 token; with ``unless_equal``, only where the intervention changed it."""
    for layer, row in enumerate(top1):
        for tok, label in enumerate(row):
            if unless_equal is not None and label == unless_equal[layer][tok]:
                continue
            shade = norm(arr[layer, tok])
            dark = unless_equal is None and (np.isnan(shade) or shade < 0.6)  # viridis is dark below ~0.6
            ax.text(tok, layer, label.strip()[:6], ha="center", va="center", fontsize=4, color="white" if dark else "black")


def plot_final_token_loss(picture: LossPicture, path: str | Path, unit: str = "nats", title: str = "") -> Path:
    """Per-token loss of the model's own output (the final layer), base vs intervened."""
    panels = picture.panels("ce", unit)
    n_tok = len(picture.tokens)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.4 * n_tok + 2), 3.5))
    for name, style in (("base", "o-"), ("intervened", "s-")):
        if name in panels:
            ax.plot(range(n_tok), panels[name][-1].numpy(), style, markersize=3, label=f"{name} model")
    ax.set_xticks(range(n_tok), picture.tokens, rotation=90, fontsize=7)
    ax.set_xlabel("input token (loss of predicting the next one)")
    ax.set_ylabel(f"final-layer cross-entropy [{unit}]")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title or "per-token loss of the model's output")
    return save_figure(fig, path)


def plot_heatmap(
    values: Any,
    path: str | Path,
    xlabels: list,
    ylabels: list,
    xlabel: str,
    ylabel: str,
    cbar_label: str,
    title: str = "",
) -> Path:
    """Any matrix (rows bottom-up) with every row and column named: transfer matrices, per-cell divergences."""
    arr = np.asarray(values, dtype=float)  # [rows, cols]
    n_rows, n_cols = arr.shape
    fig, ax = plt.subplots(figsize=(max(4.5, 0.35 * n_cols + 2.5), max(3.5, 0.22 * n_rows + 1.5)))
    image = ax.imshow(arr, origin="lower", aspect="auto", cmap="viridis")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02).set_label(cbar_label)
    ax.set_xticks(range(n_cols), [str(x) for x in xlabels], rotation=90, fontsize=7)
    ax.set_yticks(range(n_rows), [str(y) for y in ylabels], fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    return save_figure(fig, path)


def plot_eval_depth(results: DepthEvaluation, path: str | Path, title: str = "") -> Path:
    """Per-layer CE [bits/byte], entropy, top-1 agreement with the final layer, and prediction depth."""
    fig, axes = plt.subplots(1, 4, figsize=(18, 3.8))
    panels = (("ce_bpb", "cross-entropy [bits/byte]"), ("entropy", "entropy [nats/token]"), ("agreement", "top-1 = final top-1"))
    for ax, (metric, label) in zip(axes, panels):
        for name, per_layer in results.lenses.items():
            values = per_layer.to_json()[metric]
            ax.plot(range(len(values)), values, marker="o", markersize=3, label=f"{name} lens")
        ax.set_xlabel("layer (residual after n blocks)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    ax = axes[3]
    for name, per_layer in results.lenses.items():
        hist = np.asarray(per_layer.depth_histogram, dtype=float)
        ax.step(range(len(hist)), hist / hist.sum(), where="mid", label=f"{name} lens (mean {per_layer.mean_depth:.1f})")
    ax.set_xlabel("prediction depth (first layer whose top-1 stays the final top-1)")
    ax.set_ylabel("fraction of tokens")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.suptitle(title or f"held-out evaluation, {results.tokens} tokens, {results.bytes} bytes")
    return save_figure(fig, path)


def plot_skip_sweep(results: SpanEvaluation, path: str | Path, title: str = "") -> Path:
    """Per span ``i..j``: CE of plain skip and of its translator vs the intact model, and KL to it."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    lengths = sorted({row.end - row.start for row in results.spans})
    for ax, metric, label in ((axes[0], "ce", "next-token cross-entropy [nats]"), (axes[1], "kl", "KL(intact || surgered) [nats]")):
        for n in lengths:
            rows = [row for row in results.spans if row.end - row.start == n]
            starts = [row.start for row in rows]
            ax.plot(starts, [getattr(row, f"skip_{metric}") for row in rows], "o-", markersize=3, label=f"skip {n} block(s)")
            if rows[0].translator_ce is not None:
                ax.plot(starts, [getattr(row, f"translator_{metric}") for row in rows], "s--", markersize=3, label=f"translator for {n} block(s)")
        if metric == "ce":
            ax.axhline(results.intact_ce, color="black", lw=1, label="intact model")
        else:
            ax.set_yscale("log")
        ax.set_xlabel("span start i (blocks i..i+n-1 removed)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title or f"skipping spans of blocks, {results.tokens} held-out tokens")
    return save_figure(fig, path)
