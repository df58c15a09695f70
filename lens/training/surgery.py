"""Layer surgery on held-out text: sweeps and truncation curves. They live with training because
their translators can be KL-trained with Lightning, one per span.

Sweep (``kind: sweep``): for every span ``i..i+n`` (each length ``n`` in the config), next-token CE
of the intact model, of the model with the span skipped, and of the model with the span replaced
by a span translator (least squares, or least squares + KL training), plus KL to the intact model;
and, as asked, every block run twice and every adjacent pair swapped. Writes ``skip_sweep.json``
+ ``skip_sweep.png`` and ``programs.json`` + ``repeat_swap.png``.

Truncation (``kind: truncate``): remove the last ``n`` blocks, and the first ``n``, for every
``n``: the cut model's loss plain and with translators in place of the removed blocks, and what
the lens reads at the cut. Writes ``truncation.json`` + ``truncation.png``.
"""

from __future__ import annotations

import copy
from dataclasses import asdict
from typing import Hashable

from transformers import PreTrainedModel

from lens.analysis.picture import InterventionFactory
from lens.analysis.spans import (
    CutScore,
    Span,
    SpanEvaluation,
    SweepEvaluation,
    TruncationCurves,
    evaluate_programs,
    evaluate_spans,
    score_programs,
    token_costs,
)
from lens.artifacts.files import write_json
from lens.artifacts.registry import load_span_translator, resolve_lens
from lens.config import InputError, SpanConfig, SweepConfig, TranslatorTrainConfig, TruncationConfig, to_dict
from lens.core.arch import n_blocks
from lens.core.closed_form import fit_span_translators
from lens.core.model import model_id
from lens.core.translators import SpanTranslator
from lens.interventions import Ablation, LayerProgram
from lens.report.plots import plot_program_sweep, plot_skip_sweep, plot_truncation
from lens.runs.result import Measured
from lens.training.datamodule import LensDataModule, model_and_data
from lens.training.translator_run import train_span_translator


def sweep_spans(n: int, lengths: list[int]) -> list[Span]:
    """All spans ``(i, i+k)`` for each length ``k`` that fit in an ``n``-block model, shortest first."""
    bad = [k for k in lengths if not 1 <= k <= n]
    if bad:
        raise InputError(f"span lengths {bad} out of range: valid lengths are 1..{n} for a {n}-block model")
    return [(i, i + k) for k in lengths for i in range(n - k + 1)]


def span_run_config(cfg: SweepConfig | TruncationConfig, span: Span) -> TranslatorTrainConfig:
    """The KL training run a sweep or truncation does for one span."""
    return TranslatorTrainConfig(
        run_name=f"{cfg.run_name}/span_{span[0]:02d}_{span[1]:02d}",
        output_dir=cfg.output_dir,
        seed=cfg.seed,
        model=cfg.model,
        data=cfg.data,
        span=SpanConfig(start=span[0], end=span[1], loss="kl"),
        optim=cfg.optim,
        trainer=cfg.trainer,
    )


def run_skip_sweep(model: PreTrainedModel, data: LensDataModule, cfg: SweepConfig) -> SpanEvaluation:
    """Fit a translator per span (unless ``translators: none``), add the saved ones, score every span;
    ``data`` set up."""
    saved = [load_span_translator(path, model) for path in cfg.translator_files]  # before any fitting: fail early
    spans = sweep_spans(n_blocks(model), list(cfg.span_lengths))
    translators: dict[Span, SpanTranslator] = {}
    if cfg.translators != "none":
        translators = {span: SpanTranslator.for_span(model, *span) for span in spans}
        fit_span_translators(model, list(translators.values()), data.train_sequences(cfg.lstsq_sequences), cfg.data.batch_size, cfg.ridge)
    if cfg.translators == "kl":
        for span, translator in translators.items():
            train_span_translator(model, data, span_run_config(cfg, span), translator)
    for translator in saved:
        span = (translator.start, translator.end)
        spans += [span] if span not in spans else []
        translators[span] = translator
    held_out = data.val_sequences[: cfg.sequences]  # type: ignore[index]
    return evaluate_spans(model, held_out, spans, translators, cfg.data.batch_size)  # type: ignore[arg-type]


def sweep_programs(model: PreTrainedModel, operations: list[str]) -> dict[str, InterventionFactory]:
    """Every block repeated once (``repeat``), every adjacent pair swapped (``swap``), every block's
    attention and MLP zeroed (``ablate``), by name."""
    n, programs = n_blocks(model), {}
    if "repeat" in operations:
        programs.update({f"repeat {b}": (lambda b=b: LayerProgram.repeat(model, b, 2)) for b in range(n)})
    if "swap" in operations:
        programs.update({f"swap {i},{i + 1}": (lambda i=i: LayerProgram.swap(model, i)) for i in range(n - 1)})
    if "ablate" in operations:
        for part in ("attention", "mlp"):
            programs.update({f"{part} {b}": (lambda b=b, part=part: Ablation(model, b, part)) for b in range(n)})
    return programs


def block_parts(model: PreTrainedModel, block: int) -> dict[str, InterventionFactory]:
    """Block ``block`` skipped, and its attention and MLP zeroed, by name."""
    return {
        f"skip {block}": lambda: LayerProgram.skip(model, block, block + 1),
        f"attention {block}": lambda: Ablation(model, block, "attention"),
        f"mlp {block}": lambda: Ablation(model, block, "mlp"),
    }


def skip_sweep(cfg: SweepConfig) -> Measured[SweepEvaluation]:
    """The whole sweep from a config: model, data, programs, JSON + PNG in ``output_dir/run_name``."""
    model, data = model_and_data(cfg)
    result = SweepEvaluation()
    record = {"base_model": model_id(model), "n_layers": n_blocks(model), "config": to_dict(cfg)}
    name = model_id(model)
    if "skip" in cfg.operations:
        result.spans = run_skip_sweep(model, data, cfg)
        write_json({**result.spans.to_json(), **record, "translators": cfg.translators}, cfg.run_dir / "skip_sweep.json")
        plot_skip_sweep(result.spans, cfg.run_dir / "skip_sweep.png", title=f"{name}: skipping spans of blocks")
    programs = sweep_programs(model, cfg.operations)
    held_out = data.val_sequences[: cfg.sequences]  # type: ignore[index]
    if programs:
        result.programs = evaluate_programs(model, held_out, programs, cfg.data.batch_size)
        write_json({**result.programs.to_json(), **record}, cfg.run_dir / "programs.json")
        plot_program_sweep(result.programs, cfg.run_dir / "programs.png", title=f"{name}: every block repeated, swapped or ablated")
    if cfg.explain:
        parts = {key: make for block in cfg.explain for key, make in block_parts(model, block).items()}
        result.explained = token_costs(model, data.tokenizer, held_out, parts, batch_size=cfg.data.batch_size)
        costs = {key: [asdict(c) for c in costs] for key, costs in result.explained.items()}
        write_json({"unit": "nats", "tokens": int(held_out[:, 1:].numel()), "costs": costs, **record}, cfg.run_dir / "token_costs.json")
    return Measured(cfg.run_dir, result)


def cut_span(end: str, removed: int, n: int) -> Span:
    return (n - removed, n) if end == "last" else (0, removed)


def truncation(cfg: TruncationConfig) -> Measured[TruncationCurves]:
    """Truncation curves from a config: every cut from both ends, plain and with translators, and
    the lens reading the cut model's residual at the cut; JSON + PNG in ``output_dir/run_name``."""
    model, data = model_and_data(cfg)
    lens = resolve_lens(cfg.lens, model, cfg.model.name, cfg.allow_mismatch)
    n = n_blocks(model)
    cuts = [(end, k, cut_span(end, k, n)) for end in cfg.ends for k in range(1, n + 1)]
    spans = list(dict.fromkeys(span for _, _, span in cuts))
    fitted: dict[str, dict[Span, SpanTranslator]] = {}
    if cfg.translators:
        fitted["lstsq"] = {span: SpanTranslator.for_span(model, *span) for span in spans}
        fit_span_translators(model, list(fitted["lstsq"].values()), data.train_sequences(cfg.lstsq_sequences), cfg.data.batch_size, cfg.ridge)
    if "kl" in cfg.translators:
        fitted["kl"] = {span: train_span_translator(model, data, span_run_config(cfg, span), copy.deepcopy(t)) for span, t in fitted["lstsq"].items()}
    fitted = {name: fitted[name] for name in cfg.translators}
    programs: dict[Hashable, InterventionFactory] = {}
    lens_rows: dict[Hashable, tuple[int, int]] = {}
    for end, k, span in cuts:
        programs[end, k, "plain"] = lambda span=span: LayerProgram.skip(model, *span)
        # the residual at the cut, read as the layer the cut model treats it as: after n - k blocks
        # (the output of a model cut at its end) or the embedding entering block k (cut at its start)
        lens_rows[end, k, "plain"] = (n - k, n - k) if end == "last" else (0, k)
        for name, translators in fitted.items():
            programs[end, k, name] = lambda span=span, t=translators[span]: LayerProgram.replace(model, *span, t)
    held_out = data.val_sequences[: cfg.sequences]  # type: ignore[index]
    scores = score_programs(model, held_out, programs, cfg.data.batch_size, lens, lens_rows)
    variants = ["plain", *fitted]
    curves = TruncationCurves(scores.tokens, scores.intact_ce, lens.origin)
    for end, k, span in cuts:
        ce = {v: scores.ce[end, k, v] for v in variants}
        kl = {v: scores.kl[end, k, v] for v in variants}
        curves.cuts.append(CutScore(ce=ce, kl=kl, end=end, removed=k, lens_ce=scores.lens_ce[end, k, "plain"]))
    write_json({**curves.to_json(), "base_model": model_id(model), "config": to_dict(cfg)}, cfg.run_dir / "truncation.json")
    plot_truncation(curves, cfg.run_dir / "truncation.png", title=f"{model_id(model)}: removing blocks from either end; lens: {lens.origin}")
    return Measured(cfg.run_dir, curves)
