"""Skip sweep: how much each span of blocks matters, and how much a linear guess repairs.

For every span ``i..i+n`` (each length ``n`` in the config) on held-out text: next-token CE of
the intact model, of the model with the span skipped, and of the model with the span replaced
by a span translator (least squares, or least squares + KL training); plus KL to the intact
model. ``lens surgery --config configs/skip_sweep_smollm2.yaml key=value ...`` writes
``skip_sweep.json`` and ``skip_sweep.png`` into the run folder. It lives with training because
``translators: kl`` trains a translator per span with Lightning.
"""

from __future__ import annotations

import lightning as L
from transformers import PreTrainedModel

from lens.analysis.spans import Span, SpanEvaluation, evaluate_spans
from lens.artifacts.files import write_json
from lens.artifacts.registry import load_span_translator
from lens.config import InputError, SpanConfig, SurgeryConfig, TranslatorTrainConfig, to_dict
from lens.core.arch import n_blocks
from lens.core.closed_form import fit_span_translators
from lens.core.model import check_fits_model, load_model, model_id
from lens.core.translators import SpanTranslator
from lens.report.plots import plot_skip_sweep
from lens.runs.result import Measured
from lens.training.datamodule import LensDataModule
from lens.training.translator_run import train_span_translator


def sweep_spans(n: int, lengths: list[int]) -> list[Span]:
    """All spans ``(i, i+k)`` for each length ``k`` that fit in an ``n``-block model, shortest first."""
    bad = [k for k in lengths if not 1 <= k <= n]
    if bad:
        raise InputError(f"span lengths {bad} out of range: valid lengths are 1..{n} for a {n}-block model")
    return [(i, i + k) for k in lengths for i in range(n - k + 1)]


def span_run_config(cfg: SurgeryConfig, span: Span) -> TranslatorTrainConfig:
    """The KL training run the sweep does for one span (``translators: kl``)."""
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


def run_skip_sweep(model: PreTrainedModel, data: LensDataModule, cfg: SurgeryConfig) -> SpanEvaluation:
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


def skip_sweep(cfg: SurgeryConfig) -> Measured[SpanEvaluation]:
    """The whole sweep from a config: model, data, spans, JSON + PNG in ``output_dir/run_name``."""
    check_fits_model(cfg)
    L.seed_everything(cfg.seed, workers=True)
    model, tokenizer = load_model(cfg.model.name, cfg.model.dtype)
    data = LensDataModule(cfg.data, tokenizer, seed=cfg.seed)
    data.setup("fit")
    evaluation = run_skip_sweep(model, data, cfg)
    record = {**evaluation.to_json(), "base_model": model_id(model), "n_layers": n_blocks(model), "translators": cfg.translators}
    write_json({**record, "config": to_dict(cfg)}, cfg.run_dir / "skip_sweep.json")
    plot_skip_sweep(evaluation, cfg.run_dir / "skip_sweep.png", title=f"{model_id(model)}: skipping spans of blocks")
    return Measured(cfg.run_dir, evaluation)
