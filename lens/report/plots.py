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
from lens.analysis.function_vectors import FunctionVectorStudy  # noqa: E402
from lens.analysis.intervention_eval import SteeringGrid  # noqa: E402
from lens.analysis.picture import METRICS, LossPicture  # noqa: E402
from lens.analysis.spans import ProgramEvaluation, SpanEvaluation, TruncationCurves  # noqa: E402
from lens.analysis.tracing import LensReading, Trace  # noqa: E402
from lens.analysis.value_directions import LensFlip  # noqa: E402
from lens.artifacts.files import atomic_path  # noqa: E402


def panels_figure(*args: Any, **kwargs: Any) -> tuple["plt.Figure", Any]:
    """``plt.subplots`` with constrained layout: colour bars and labels of side-by-side panels never overlap."""
    return plt.subplots(*args, layout="constrained", **kwargs)


def figure_title(model: str, what: str, lens: str | None, intervention: str, text: str) -> str:
    """What a researcher needs to read a figure: model, quantity, lens and how it was made (None for
    what needs no lens, such as the model's own loss), intervention, text."""
    shown = text if len(text) <= 70 else text[:67] + "..."
    through = f" through the {lens}" if lens else ""
    return f"{model}: {what}{through}\nintervention: {intervention}; text: \u201c{shown}\u201d"


def save_figure(fig: "plt.Figure", path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_layer_metrics(results: LensEvaluation, path: str | Path, title: str = "") -> Path:
    """Per-layer cross-entropy and KL to the final layer (bits), one line per lens."""
    fig, axes = panels_figure(1, 2, figsize=(11, 4))
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


PANEL_TITLES = {"base": "base model", "intervened": "intervened model", "diff": "intervened - base (aligned by layer)"}
GAP_COLOUR = "#b0b0b0"
"""Cells with no value: a layer the program removed, or the last token (nothing to predict)."""


def plot_token_heatmaps(
    picture: LossPicture, path: str | Path, metric: str = "ce", unit: str = "nats", title: str = "", write_tokens: bool = True
) -> Path:
    """``heatmap_figure`` written to ``path``."""
    return save_figure(heatmap_figure(picture, metric, unit, title, write_tokens)[0], path)


def heatmap_figure(
    picture: LossPicture, metric: str = "ce", unit: str = "nats", title: str = "", write_tokens: bool = True
) -> tuple["plt.Figure", dict[str, "plt.Axes"]]:
    """Row x token heatmaps of one lens metric: base, intervened, and intervened - base side by side.

    Rows are what the lens reads: layers of the intact model, the slots of a layer program (labelled
    with the layer each stands for). The difference aligns rows by original layer; a layer the
    program removed is a grey gap, not a zero. Cells are drawn as they are (no interpolation), so
    every pixel of a cell has a colour of its colour map.
    """
    panels = {k: v.numpy() for k, v in picture.panels(metric, unit).items()}  # [L+1 or R, T] each
    n_tok = len(picture.tokens)
    n_rows = max(arr.shape[0] for arr in panels.values())
    width = max(4.0, 0.42 * n_tok + 1.5)
    fig, axes = panels_figure(1, len(panels), figsize=(len(panels) * width, max(3.5, 0.2 * n_rows + 1.5)), squeeze=False)
    # 95th percentiles, not maxima: one row (the logit lens on the embeddings) or one attention-sink
    # column can be 10x every other cell; the colour bar arrow marks the clipped values
    vmax = max(float(np.nanpercentile(panels[s], 95)) for s in ("base", "intervened") if s in panels)
    top1 = {state: picture.top1_labels(state) for state in panels if state != "diff"}
    if "diff" in panels:  # the intervened top-1 at the row aligned with each base row
        top1["diff"] = [None if i is None else top1["intervened"][i] for i in picture.aligned]
    for ax, (name, arr) in zip(axes[0], panels.items()):
        if name == "diff":
            lim = max(float(np.nanpercentile(np.abs(arr), 95)), 1e-6)
            cmap, vmin, top, extend = plt.get_cmap("RdBu_r").copy(), -lim, lim, "both"
            label = f"{METRICS[metric]}, intervened - base [{unit}]"
        else:
            cmap, vmin, top, extend = plt.get_cmap("viridis").copy(), 0.0, vmax, "max"
            label = f"{METRICS[metric]} [{unit}]"
        cmap.set_bad(GAP_COLOUR)
        image = ax.imshow(arr, origin="lower", aspect="auto", cmap=cmap, vmin=vmin, vmax=top, interpolation="nearest")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02, extend=extend).set_label(label)
        if write_tokens and arr.shape[0] <= 40 and n_tok <= 32:  # cells are still big enough to read a token
            _write_top1(ax, top1[name], top1["base"] if name == "diff" else None, arr, image.norm)
        ax.set_xticks(range(n_tok), picture.tokens, rotation=90, fontsize=7)
        ax.set_yticks(range(arr.shape[0]), picture.row_labels(name), fontsize=5 if arr.shape[0] > 24 else 7)
        ax.set_xlabel("input token (each cell scores the prediction of the next one)")
        ax.set_ylabel("row: residual read as layer (after n blocks)")
        ax.set_title(PANEL_TITLES[name])
    fig.suptitle(title or f"{METRICS[metric]} through the {picture.lens_kind} lens", fontsize=10)
    return fig, dict(zip(panels, axes[0]))


def _write_top1(
    ax: "plt.Axes", top1: list, unless_equal: list[list[str]] | None, arr: np.ndarray, norm: Any
) -> None:
    """Write each cell's top-1 token; with ``unless_equal``, only where the intervention changed it."""
    for layer, row in enumerate(top1):
        for tok, label in enumerate(row or []):
            if unless_equal is not None and label == unless_equal[layer][tok]:
                continue
            shade = norm(arr[layer, tok])
            dark = unless_equal is None and (np.isnan(shade) or shade < 0.6)  # viridis is dark below ~0.6
            ax.text(tok, layer, label.strip()[:6], ha="center", va="center", fontsize=4, color="white" if dark else "black")


def plot_final_token_loss(
    pictures: LossPicture | list[LossPicture], path: str | Path, unit: str = "nats", title: str = "", names: list[str] | None = None
) -> Path:
    """Per-token loss of the model's own output: the base model and each intervened one, on one axis
    (several pictures of the same text, e.g. a cut model with and without a translator)."""
    pictures = pictures if isinstance(pictures, list) else [pictures]
    names = names or ["intervened model"] * len(pictures)
    n_tok = len(pictures[0].tokens)
    fig, ax = panels_figure(figsize=(max(6.0, 0.4 * n_tok + 2), 3.5))
    ax.plot(range(n_tok), pictures[0].output_ce("base", unit).numpy(), "o-", markersize=3, label="base model")
    for picture, name, style in zip(pictures, names, ("s-", "^-", "v-", "D-", "x-")):
        if picture.intervened is not None:
            ax.plot(range(n_tok), picture.output_ce("intervened", unit).numpy(), style, markersize=3, label=name)
    ax.set_xticks(range(n_tok), pictures[0].tokens, rotation=90, fontsize=7)
    ax.set_xlabel("input token (loss of predicting the next one)")
    ax.set_ylabel(f"cross-entropy of the model's output [{unit}]")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "per-token loss of the model's output", fontsize=9)
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
    fig, ax = panels_figure(figsize=(max(4.5, 0.35 * n_cols + 2.5), max(3.5, 0.22 * n_rows + 1.5)))
    image = ax.imshow(arr, origin="lower", aspect="auto", cmap="viridis")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02).set_label(cbar_label)
    ax.set_xticks(range(n_cols), [str(x) for x in xlabels], rotation=90, fontsize=7)
    ax.set_yticks(range(n_rows), [str(y) for y in ylabels], fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    return save_figure(fig, path)


TRACE_PANELS = {
    "block_out": ("residual (block output)", "Purples"),
    "mlp": ("MLP output", "Greens"),
    "attention": ("attention output", "Reds"),
    "mlp_window": ("MLP output, window of {w} blocks", "Greens"),
    "attention_window": ("attention output, window of {w} blocks", "Reds"),
}
"""Panel title and colour map of each causal-trace kind (ROME's colours)."""


def plot_trace(trace: Trace, path: str | Path, title: str = "") -> Path:
    """Token x block heatmaps of a causal trace, one panel per kind: p(target) with that one state
    restored (grey: not traced); subject tokens are starred. Each panel's colours run from the
    corrupted probability (or its lowest score) to its highest score."""
    kinds = list(trace.scores)
    n_tok, n_blocks = trace.scores[kinds[0]].shape
    cols = min(3, len(kinds))
    rows = math.ceil(len(kinds) / cols)
    fig, axes = panels_figure(rows, cols, figsize=(cols * max(4.5, 0.16 * n_blocks + 2.5), rows * max(3.0, 0.28 * n_tok + 1.4)), squeeze=False)
    start, end = trace.subject_span
    labels = [f"{tok}*" if start <= i < end else tok for i, tok in enumerate(trace.tokens)]
    for ax, kind in zip(axes.flat, kinds):
        name, cmap_name = TRACE_PANELS[kind]
        arr = trace.scores[kind].numpy()  # [T, n_blocks]
        cmap = plt.get_cmap(cmap_name).with_extremes(bad=GAP_COLOUR)
        low = min(trace.corrupted_prob, float(np.nanmin(arr)))
        image = ax.imshow(arr, aspect="auto", cmap=cmap, vmin=low, vmax=max(float(np.nanmax(arr)), low + 1e-6), interpolation="nearest")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02).set_label(f"p({trace.target!r}) restored [probability]")
        ax.set_yticks(range(n_tok), labels, fontsize=7)
        ax.set_xticks(range(0, n_blocks, max(1, n_blocks // 10)))
        ax.set_xlabel("block whose state is restored" + (" (window centre)" if kind.endswith("_window") else ""))
        ax.set_ylabel("token restored (* subject)")
        ax.set_title(name.format(w=trace.window), fontsize=9)
    for ax in list(axes.flat)[len(kinds) :]:
        ax.axis("off")
    note = f"clean p = {trace.clean_prob:.3f}, corrupted p = {trace.corrupted_prob:.3f} (noise std {trace.noise_std:.3g}, {trace.samples} draws, seed {trace.seed})"
    fig.suptitle(f"{title or 'causal trace'}\n{note}", fontsize=9)
    return save_figure(fig, path)


def plot_trace_lens(readings: list[LensReading], path: str | Path, title: str = "") -> Path:
    """The lens' p(target) per layer for each traced run, one panel per token; filled markers where
    the target is the lens' top-1."""
    positions = list(dict.fromkeys((r.position, r.token) for r in readings))
    fig, axes = panels_figure(1, len(positions), figsize=(5.5 * len(positions), 3.8), squeeze=False)
    for ax, (position, token) in zip(axes[0], positions):
        for reading, colour in zip([r for r in readings if r.position == position], ("black", "tab:red", "tab:green", "tab:blue")):
            layers = np.arange(len(reading.prob))
            ax.plot(layers, reading.prob, "-", color=colour, lw=1.2, label=f"{reading.run} (top-1 from layer {reading.top1_from})")
            hit = np.asarray(reading.target_top1)
            ax.plot(layers[hit], np.asarray(reading.prob)[hit], "o", color=colour, markersize=4)
            ax.plot(layers[~hit], np.asarray(reading.prob)[~hit], "o", color=colour, markersize=4, markerfacecolor="none")
        ax.set_xlabel("layer (residual after n blocks)")
        ax.set_ylabel("lens p(target) [probability]")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax.set_title(f"token {position} {token!r} (filled: target is the lens' top-1)", fontsize=9)
    fig.suptitle(title or "traced runs through the lens", fontsize=9)
    return save_figure(fig, path)


def plot_mean_effects(effects: dict[str, dict[str, list[float]]], path: str | Path, window: int, title: str = "") -> Path:
    """Mean indirect effect (restored - corrupted p(target)) per block of each kind, one panel per
    token (``effects[token][kind]``); ``window``: blocks restored together in the window kinds."""
    fig, axes = panels_figure(1, len(effects), figsize=(5.5 * len(effects), 3.8), squeeze=False)
    for ax, (token, per_kind) in zip(axes[0], effects.items()):
        for kind, values in per_kind.items():
            name, cmap_name = TRACE_PANELS[kind]
            style = "--" if kind.endswith("_window") else "-"
            ax.plot(range(len(values)), values, style, color=plt.get_cmap(cmap_name)(0.75), marker="o", markersize=3, label=name.format(w=window))
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlabel("block whose state is restored")
        ax.set_ylabel("mean indirect effect [probability]")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax.set_title(f"at the {token}", fontsize=9)
    fig.suptitle(f"{title or 'mean indirect effect per block'}\nindirect effect: p(target) with the state restored - p(target) corrupted", fontsize=9)
    return save_figure(fig, path)


def plot_eval_depth(results: DepthEvaluation, path: str | Path, title: str = "") -> Path:
    """Per-layer CE [bits/byte], entropy, top-1 agreement with the final layer, and prediction depth."""
    fig, axes = panels_figure(1, 4, figsize=(18, 3.8))
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
    fig, axes = panels_figure(1, 2, figsize=(12, 4))
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


def plot_program_sweep(results: ProgramEvaluation, path: str | Path, title: str = "") -> Path:
    """CE of every block run twice, every adjacent pair swapped, every attention and MLP zeroed,
    against the intact model."""
    fig, ax = panels_figure(figsize=(10, 3.8))
    kinds = {"repeat": "block i run twice", "swap": "blocks i, i+1 swapped", "attention": "attention of block i zeroed", "mlp": "MLP of block i zeroed"}
    for (kind, label), style in zip(kinds.items(), ("o-", "s-", "^-", "v-")):
        names = [name for name in results.ce if name.split()[0] == kind]
        if names:
            where = [int(name.split()[1].split(",")[0]) for name in names]
            ax.plot(where, [results.ce[name] for name in names], style, markersize=3, label=label)
    ax.axhline(results.intact_ce, color="black", lw=1, label="intact model")
    ax.set_xlabel("block i")
    ax.set_ylabel("next-token cross-entropy [nats]")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or f"repeating and swapping blocks, {results.tokens} held-out tokens", fontsize=9)
    return save_figure(fig, path)


def plot_truncation(curves: TruncationCurves, path: str | Path, title: str = "") -> Path:
    """Per end: the cut model's CE plain and with each translator, and the lens' CE at the cut, against blocks removed."""
    ends = list(dict.fromkeys(cut.end for cut in curves.cuts))
    fig, axes = panels_figure(1, len(ends), figsize=(6.5 * len(ends), 4.2), squeeze=False)
    names = {"plain": "blocks removed", "lstsq": "least-squares translator", "kl": "KL-trained translator"}
    for ax, end in zip(axes[0], ends):
        cuts = [cut for cut in curves.cuts if cut.end == end]
        removed = [cut.removed for cut in cuts]
        for variant, style in zip(cuts[0].ce, ("o-", "s-", "^-")):
            ax.plot(removed, [cut.ce[variant] for cut in cuts], style, markersize=3, label=f"model output, {names.get(variant, variant)}")
        ax.plot(removed, [cut.lens_ce for cut in cuts], "k:", label="lens reading the residual at the cut")
        ax.axhline(curves.intact_ce, color="grey", lw=1, label="intact model")
        ax.set_yscale("log")
        ax.set_xlabel(f"blocks removed from the {'end' if end == 'last' else 'start'} of the model")
        ax.set_ylabel("next-token cross-entropy [nats]")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
        ax.set_title(f"the {end} n blocks removed", fontsize=9)
    fig.suptitle(title or f"truncation, {curves.tokens} held-out tokens", fontsize=10)
    return save_figure(fig, path)


def plot_steering_grid(grid: SteeringGrid, path: str | Path, title: str = "") -> Path:
    """Two layer x coefficient maps: log-prob change on held-out text and on on-topic texts (0 is white)."""
    fig, axes = panels_figure(1, 2, figsize=(2 * max(4.5, 0.7 * len(grid.coefficients) + 2.5), max(3.5, 0.4 * len(grid.layers) + 1.8)))
    panels = (("held_out", grid.held_out, grid.held_out_tokens), ("on_topic", grid.on_topic, grid.on_topic_tokens))
    for ax, (name, values, tokens) in zip(axes, panels):
        arr = np.asarray(values, dtype=float)  # [layers, coefficients]
        lim = max(float(np.nanmax(np.abs(arr))), 1e-6)
        image = ax.imshow(arr, origin="lower", aspect="auto", cmap="RdBu", vmin=-lim, vmax=lim, interpolation="nearest")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02).set_label("log-prob change, steered - intact [nats/token]")
        for (i, j), value in np.ndenumerate(arr):
            ax.text(j, i, f"{value:+.2f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(grid.coefficients)), [f"{c:g}" for c in grid.coefficients])
        ax.set_yticks(range(len(grid.layers)), [str(layer) for layer in grid.layers])
        ax.set_xlabel("coefficient")
        ax.set_ylabel("layer (residual after n blocks)")
        ax.set_title(f"{name.replace('_', '-')} text ({tokens} tokens)", fontsize=9)
    fig.suptitle(title or "steering, every layer x coefficient", fontsize=10)
    return save_figure(fig, path)


def plot_head_effects(study: FunctionVectorStudy, path: str | Path, title: str = "") -> Path:
    """Block x head map of every head's average indirect effect; the heads summed into the function
    vector are boxed and numbered by rank (0 is white, so heads that hurt the answer show blue)."""
    arr = study.aie.numpy() * 100  # [L, H], percentage points
    n_layers, n_head = arr.shape
    fig, ax = panels_figure(figsize=(max(4.5, 0.45 * n_head + 2.5), max(4.0, 0.2 * n_layers + 1.5)))
    lim = max(float(np.abs(arr).max()), 1e-6)
    image = ax.imshow(arr, origin="lower", aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
    label = "average indirect effect: P(answer) patched - shuffled [percentage points]"
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02).set_label(label, fontsize=8)
    for rank, (block, head) in enumerate(study.heads):
        ax.add_patch(plt.Rectangle((head - 0.5, block - 0.5), 1, 1, fill=False, edgecolor="black", lw=1.2))
        dark = abs(arr[block, head]) > 0.6 * lim  # RdBu_r is dark at both ends
        ax.text(head, block, str(rank + 1), ha="center", va="center", fontsize=7, color="white" if dark else "black")
    ax.set_xticks(range(n_head), [str(h) for h in range(n_head)], fontsize=7)
    ax.set_yticks(range(n_layers), [str(b) for b in range(n_layers)], fontsize=6 if n_layers > 24 else 7)
    ax.set_xlabel("head")
    ax.set_ylabel("block")
    ax.set_title(title or f"{study.task}: average indirect effect of each head", fontsize=9)
    return save_figure(fig, path)


def plot_fv_layers(study: FunctionVectorStudy, path: str | Path, title: str = "") -> Path:
    """Zero-shot validation accuracy per injection layer; on the test words, the lens' probability of
    the answer and how often it is top-1, per layer, without and with the function vector."""
    fig, axes = panels_figure(1, 3, figsize=(16, 4))
    ax = axes[0]
    ax.plot(study.layers, [100 * a for a in study.val_accuracy], "o-", markersize=3, label="function vector added here")
    ax.axhline(100 * study.val_baseline, color="grey", lw=1, label="no function vector")
    ax.axvline(study.layer, color="black", ls=":", lw=1, label=f"chosen: layer {study.layer}")
    ax.set_xlabel("injection layer (residual after n blocks)")
    ax.set_ylabel("zero-shot accuracy, validation words [%]")
    ax.set_title(f"accuracy per layer ({study.counts['val_words']} words)", fontsize=9)
    before, after = study.reading_before, study.reading_after
    panels = ((axes[1], "prob", "mean lens P(answer) [probability]", "log"), (axes[2], "top1", "answer is the lens' top-1 [% of prompts]", "linear"))
    for ax, name, ylabel, scale in panels:
        scale_by = 100 if name == "top1" else 1
        layers = range(len(getattr(before, name)))
        ax.plot(layers, [scale_by * v for v in getattr(before, name)], "o-", markersize=3, label="zero-shot")
        ax.plot(layers, [scale_by * v for v in getattr(after, name)], "s-", markersize=3, label=f"zero-shot + FV at layer {study.layer}")
        ax.axvline(study.layer, color="black", ls=":", lw=1)
        ax.set_yscale(scale)
        ax.set_xlabel("layer read by the lens (residual after n blocks)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"final token of {study.counts['test_words']} zero-shot test prompts", fontsize=9)
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle(title or f"function vector for {study.task}", fontsize=10)
    return save_figure(fig, path)


def plot_direction_lens(readings: list[LensFlip], labels: list[str], path: str | Path, title: str = "") -> Path:
    """Mean lens p of the pronoun a value-space direction points to and of the one preferred before,
    per layer at the probes' final token, intact (dashed) vs with the direction (solid); one panel
    per form and sign, the median layer from which the new pronoun is top-1 marked."""
    rows, cols = math.ceil(len(readings) / 2), min(2, len(readings))
    fig, axes = panels_figure(rows, cols, figsize=(5.5 * cols, 3.6 * rows), squeeze=False, sharey=True)
    for ax in axes.flat[len(readings) :]:
        ax.set_visible(False)
    for ax, reading in zip(axes.flat, readings):
        to, old = (labels[1], labels[0]) if reading.sign > 0 else (labels[0], labels[1])
        layers = np.arange(len(reading.prob_to["before"]))
        for probs, colour, name in ((reading.prob_to, "tab:red", f"{to} pronoun (new)"), (reading.prob_from, "tab:blue", f"{old} pronoun (old)")):
            ax.plot(layers, probs["before"], "--", color=colour, lw=1.2, label=f"{name}, intact")
            ax.plot(layers, probs["after"], "-", color=colour, lw=1.6, label=f"{name}, with direction")
        median = reading.median_layer("top1_from", "after")
        if median is not None:
            ax.axvline(median, color="black", ls=":", lw=1, label=f"new pronoun top-1 from layer {median:g} (median)")
        ax.set_xlabel("layer read by the lens (residual after n blocks)")
        ax.set_ylabel("mean lens p(pronoun) [probability]")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
        ax.set_title(
            f"{reading.form}, towards {to}, c={reading.coefficient:g}\n{sum(reading.flipped)}/{len(reading.flipped)} probes flipped", fontsize=8
        )
    fig.suptitle(title or "value-space direction through the lens", fontsize=9)
    return save_figure(fig, path)


ARM_LABELS = {
    "published": "published recipe (zero init, all positions)",
    "default": "ours, SGD (closed form + KL, 64 positions/step)",
    "default_adam": "ours, Adam lr 1e-3 (the default since the optimizer study)",
    "default_wd0.001": "ours with weight decay 1e-3 (the old default)",
    "closed_form": "closed form alone",
}


def timed_elsewhere(record: dict[str, Any], point: dict[str, Any]) -> bool:
    """Whether a learning-curve point's wall time comes from another CPU than the record's (``timed_on``)."""
    return point.get("timed_on", record.get("timed_on")) != record.get("timed_on")


def plot_learning_curves(record: dict[str, Any], path: str | Path, title: str = "") -> Path:
    """Mean held-out KL against training tokens seen and against training wall time, one line per arm,
    and each arm's per-layer KL at its last point (``eval/learning_curves.py``'s record)."""
    fig, axes = panels_figure(1, 3, figsize=(16, 6.2))
    recorded = {p["arm"] for p in record["points"]}
    arms = {arm: sorted((p for p in record["points"] if p["arm"] == arm), key=lambda p: (p["tokens"], p["wall_s"]))
            for arm in [*ARM_LABELS, *sorted(recorded - ARM_LABELS.keys())]}  # an arm without a label still gets its line
    for arm, points in arms.items():
        trained = [p for p in points if p["tokens"] > 0]
        if not trained:
            continue
        label = ARM_LABELS.get(arm, arm)
        line = axes[0].plot([p["tokens"] for p in trained], [p["mean_kl"] for p in trained], marker="o", label=label)[0]
        here = [p for p in trained if not timed_elsewhere(record, p)]
        axes[1].plot([p["wall_s"] for p in here], [p["mean_kl"] for p in here], marker="o", color=line.get_color(), label=label)
        elsewhere = [p for p in trained if timed_elsewhere(record, p)]
        if elsewhere:  # another CPU's seconds: shown, but not joined to this machine's curve
            axes[1].plot([p["wall_s"] for p in elsewhere], [p["mean_kl"] for p in elsewhere], marker="o", linestyle="none",
                         markerfacecolor="none", color=line.get_color(), label=f"{label}, timed on {elsewhere[0]['timed_on']}")
        last = trained[-1]
        axes[2].plot(range(len(last["kl"]) - 1), last["kl"][:-1], marker="o", markersize=3, color=line.get_color(),
                     label=f"{arm}: {last['label']} ({last['tokens']:,} tokens)")
    logit = [p for p in arms["published"] if p["tokens"] == 0]
    if logit:
        axes[2].plot(range(len(logit[0]["kl"]) - 1), logit[0]["kl"][:-1], color="black", linestyle=":", label="logit lens")
    for ax, xlabel in zip(axes, ("training tokens seen (closed form + KL steps)", "training wall time [s] (evaluation excluded)", "layer (residual after n blocks)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("KL(final || lens) [nats/token]" if ax is axes[2] else "mean KL(final || lens) over layers [nats/token]")
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14))  # below: the curves fill the axes
    axes[0].set_xscale("log")
    axes[1].set_xscale("log")
    fig.suptitle(title or (
        f"{record.get('model', 'model')}: tuned-lens learning curves, held-out KL on {record.get('held_out_tokens', 0):,} tokens "
        f"of {record.get('corpus', 'corpus')} pages no arm trains on\nwall times as measured on {record.get('timed_on', 'one CPU')} unless "
        f"marked (other jobs shared the cores for some points: see docs/learning_curves.md)"))
    return save_figure(fig, path)


def plot_layer_convergence(record: dict[str, Any], full_runs: dict[int, dict[int, float]], path: str | Path, title: str = "") -> Path:
    """Held-out KL of single translators against KL-step budgets (``eval/layer_convergence.py``), one panel
    per layer, with the full runs' KL at that layer and budget for comparison."""
    layers = sorted({p["layer"] for p in record["points"]})
    fig, axes = panels_figure(1, len(layers), figsize=(5.5 * len(layers), 4.8), squeeze=False)
    for ax, layer in zip(axes[0], layers):
        points = sorted((p for p in record["points"] if p["layer"] == layer and p["kl_steps"] > 0), key=lambda p: p["kl_steps"])
        ax.plot([p["kl_steps"] for p in points], [p["kl"] for p in points], marker="o", label="this layer trained alone")
        full = sorted(full_runs.get(layer, {}).items())
        if full:
            ax.plot([s for s, _ in full], [k for _, k in full], marker="s", linestyle="--", label="full runs (all layers), same budget")
        start = [p["kl"] for p in record["points"] if p["layer"] == layer and p["kl_steps"] == 0]
        if start:
            ax.axhline(start[0], color="grey", linestyle=":", label="closed-form start")
        ax.set_xscale("log")
        ax.set_xlabel("KL steps (each budget its own run and linear-decay schedule)")
        ax.set_ylabel("held-out KL(final || lens) [nats/token]")
        ax.set_title(f"layer {layer} (residual after {layer} blocks)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=9)
    fig.suptitle(title or (
        f"{record.get('model', 'model')}: tuned-lens translators trained one layer at a time past the shipped budget\n"
        f"closed form on {record.get('cf_sequences', '?')} sequences, then KL steps as in {Path(record.get('config', '?')).name}; "
        f"held-out KL on {record.get('held_out_tokens', 0):,} tokens of {record.get('corpus', 'corpus')}"))
    return save_figure(fig, path)
