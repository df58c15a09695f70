"""One causal trace, read through a lens: ``lens trace --config configs/trace_smollm2.yaml key=value ...``.

Writes into ``<output_dir>/<run_name>/``: ``trace.png`` (token x block heatmaps, one panel per
kind), ``trace.html`` (the same grids, interactive), ``trace.json``; ``lens_reading.{json,png}``
(the clean, corrupted and best-MLP-restored runs through the lens at the last subject token and the
last token); ``facts.{json,png}`` (the mean indirect effect per block over the known facts of the
fact set, at the last subject token and the last token, and the block where each kind peaks).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lens.analysis.known_facts import known_facts
from lens.analysis.tracing import LensReading, Trace, corrupt, mean_effect, probability_rows, read_runs, trace_corruption, trace_facts, trace_kinds
from lens.artifacts.files import write_json
from lens.artifacts.registry import run_model_and_lens
from lens.config import TraceConfig, to_dict
from lens.data.facts import load_facts
from lens.report.html import write_grid_html
from lens.report.plots import figure_title, plot_mean_effects, plot_trace, plot_trace_lens

AT = {"last_subject": "last subject token", "last": "last token"}
"""Where the fact-set effects are read, and how figures name it."""


@dataclass
class FactEffects:
    """The mean indirect effect per block over the traced known facts."""

    facts: int
    known: int
    traced: list[str]
    """Prompts of the facts averaged."""
    skipped: dict[str, str]
    """Chosen facts that could not be traced, by id, with why."""
    effects: dict[str, dict[str, list[float]]]
    """``effects[at][kind]``: ``[n_blocks]``, at the last subject token and the last token."""

    def peaks(self) -> dict[str, dict[str, int]]:
        """The block where each kind's mean effect is highest."""
        return {at: {kind: max(range(len(v)), key=v.__getitem__) for kind, v in per_kind.items()} for at, per_kind in self.effects.items()}

    def to_json(self) -> dict[str, Any]:
        return {
            "facts": self.facts, "known": self.known, "traced": self.traced, "skipped": self.skipped, "effects": self.effects, "peak_block": self.peaks(),
        }


@dataclass
class TraceResult:
    run_dir: Path
    trace: Trace
    lens: str
    readings: list[LensReading]
    restored: tuple[int, int]
    """``(token, block)`` of the best single MLP restoration (the first kind's without ``mlp``), whose run the lens reads."""
    facts: FactEffects | None

    def lines(self) -> list[str]:
        t = self.trace
        out = [f"{t.prompt!r} -> {t.target!r}: clean p {t.clean_prob:.4f}, corrupted p {t.corrupted_prob:.4f} (noise std {t.noise_std:.4g})"]
        for kind in t.scores:
            token, block = t.best(kind)
            out.append(f"  best {kind}: token {token} {t.tokens[token]!r}, block {block}: p {float(t.scores[kind][token, block]):.4f}")
        out += [f"  {self.lens} lens, {r.run} at token {r.position} {r.token!r}: target top-1 from layer {r.top1_from}" for r in self.readings]
        if self.facts is not None:
            out.append(f"known facts: {self.facts.known} of {self.facts.facts}, {len(self.facts.traced)} traced; peak block {self.facts.peaks()}")
        return out


def trace_grids(trace: Trace) -> dict[str, dict[str, Any]]:
    """The trace's scores as the grids of the HTML page (rows: tokens, subject starred; columns: blocks)."""
    start, end = trace.subject_span
    rows = [f"{i} {tok}{'*' if start <= i < end else ''}" for i, tok in enumerate(trace.tokens)]
    return {
        kind: {
            "rows": rows, "cols": list(range(values.shape[1])), "values": probability_rows(values), "rowName": "token", "colName": "block",
            "label": f"p({trace.target!r}) with the state restored [probability]",
        }
        for kind, values in trace.scores.items()
    }


def fact_effects(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cfg: TraceConfig) -> FactEffects:
    """Trace ``cfg.facts`` known facts, evenly spaced through the fact set (so every relation has its
    share), at their last subject token and last token only; mean effects per block."""
    facts = load_facts(cfg.facts_path)
    known = known_facts(model, tokenizer, facts)
    traces, skipped = trace_facts(
        model, tokenizer, known, cfg.facts, kinds=cfg.kinds, window=cfg.window, samples=cfg.fact_samples, seed=cfg.seed, noise=cfg.noise,
        positions="both", batch_size=cfg.batch_size,
    )
    kinds = trace_kinds(cfg.kinds, cfg.window)
    effects = {at: {kind: [round(float(x), 6) for x in mean_effect(traces, kind, at)] for kind in kinds} for at in AT} if traces else {}
    return FactEffects(len(facts), len(known), [t.prompt for t in traces], skipped, effects)


def trace(cfg: TraceConfig) -> TraceResult:
    """Trace ``cfg.prompt``, read its runs through the lens, and average over the known facts."""
    model, tokenizer, lens = run_model_and_lens(cfg)
    corruption = corrupt(model, tokenizer, cfg.prompt, cfg.subject, cfg.target, noise=cfg.noise, samples=cfg.samples, seed=cfg.seed)
    result = trace_corruption(model, corruption, kinds=cfg.kinds, window=cfg.window, batch_size=cfg.batch_size)
    out, name = cfg.run_dir, cfg.model.name
    label = f"noise {cfg.noise:g} x embedding std on the subject {cfg.subject!r}, one state restored"
    title = figure_title(name, f"causal trace of p({result.target!r})", None, label, cfg.prompt)
    plot_trace(result, out / "trace.png", title=title)
    note = "Row: the token whose state is restored (* subject); column: the block. Cell: the target's probability at the last token, mean over noise draws."
    write_grid_html(trace_grids(result), out / "trace.html", title=title, note=note)
    write_json({**result.to_json(), "model": name, "config": to_dict(cfg)}, out / "trace.json")

    kind = "mlp" if "mlp" in result.scores else cfg.kinds[0]
    token, block = result.best(kind)
    runs = {"clean": None, "corrupted": {}, f"{kind} restored at token {token}, block {block}": {(kind, block): [token]}}
    readings = read_runs(model, tokenizer, lens, corruption, runs, sorted({corruption.last_subject, len(corruption.input_ids) - 1}))
    write_json({"lens": lens.origin, "target": result.target, "readings": [r.to_json() for r in readings]}, out / "lens_reading.json")
    what = f"p({result.target!r}) in the clean, corrupted and restored runs"
    plot_trace_lens(readings, out / "lens_reading.png", title=figure_title(name, what, lens.origin, label, cfg.prompt))

    facts = None
    if cfg.facts > 0:
        facts = fact_effects(model, tokenizer, cfg)
        write_json({**facts.to_json(), "samples": cfg.fact_samples, "noise": cfg.noise, "seed": cfg.seed, "window": cfg.window}, out / "facts.json")
        if facts.effects:
            effects = {AT[at]: per_kind for at, per_kind in facts.effects.items()}
            what = f"mean indirect effect over {len(facts.traced)} known facts ({cfg.fact_samples} noise draws each)"
            plot_mean_effects(effects, out / "facts.png", cfg.window, title=f"{name}: {what}")
    return TraceResult(out, result, lens.kind, readings, (token, block), facts)
