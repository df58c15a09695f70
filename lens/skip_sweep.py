"""Skip sweep: how much each span of blocks matters, and how much a linear guess repairs.

For every span ``i..i+n`` (each length ``n`` in the config) on held-out text: next-token CE of
the intact model, of the model with the span skipped, and of the model with the span replaced
by a span translator (least squares, or least squares + KL training); plus KL to the intact
model. ``python -m lens.skip_sweep --config configs/skip_sweep_smollm2.yaml key=value ...``
writes ``skip_sweep.json`` and ``skip_sweep.png`` into the run folder.
"""

from __future__ import annotations

import argparse
from typing import Any

import lightning as L
from transformers import PreTrainedModel

from lens.config import SkipSweepConfig, SpanConfig, TranslatorTrainConfig, load_config, run_cli, to_dict
from lens.interventions.base import n_layers
from lens.io import write_json
from lens.model import load_model, model_id
from lens.plots import plot_skip_sweep
from lens.span_translator import Span, SpanTranslator, evaluate_spans, fit_least_squares
from lens.train_translator import train_span_translator
from lens.training.datamodule import LensDataModule

TRANSLATORS = ("none", "lstsq", "kl")


def sweep_spans(n_blocks: int, lengths: list[int]) -> list[Span]:
    """All spans ``(i, i+n)`` that fit in the model, shortest first."""
    bad = [n for n in lengths if not 1 <= n <= n_blocks]
    if bad:
        raise ValueError(f"span lengths {bad} out of range: valid lengths are 1..{n_blocks} for a {n_blocks}-block model")
    return [(i, i + n) for n in lengths for i in range(n_blocks - n + 1)]


def span_run_config(cfg: SkipSweepConfig, span: Span) -> TranslatorTrainConfig:
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


def run_skip_sweep(model: PreTrainedModel, data: LensDataModule, cfg: SkipSweepConfig) -> dict[str, Any]:
    """Fit a translator per span (unless ``translators: none``) and score every span; ``data`` set up."""
    if cfg.translators not in TRANSLATORS:
        raise ValueError(f"translators must be one of {TRANSLATORS}, got {cfg.translators!r}")
    spans = sweep_spans(n_layers(model), list(cfg.span_lengths))
    translators: dict[Span, SpanTranslator] = {}
    if cfg.translators != "none":
        translators = {span: SpanTranslator.for_span(model, *span) for span in spans}
        fit_least_squares(model, list(translators.values()), data.train_sequences(cfg.lstsq_sequences), cfg.data.batch_size, cfg.ridge)
    if cfg.translators == "kl":
        for span, translator in translators.items():
            train_span_translator(model, data, span_run_config(cfg, span), translator)
    held_out = data.val_sequences[: cfg.sequences]  # type: ignore[index]
    results = evaluate_spans(model, held_out, spans, translators, cfg.data.batch_size)  # type: ignore[arg-type]
    results.update(base_model=model_id(model), n_layers=n_layers(model), translators=cfg.translators)
    return results


def skip_sweep(cfg: SkipSweepConfig) -> dict[str, Any]:
    """The whole sweep from a config: model, data, spans, JSON + PNG in ``output_dir/run_name``."""
    L.seed_everything(cfg.seed, workers=True)
    model, tokenizer = load_model(cfg.model.name, cfg.model.dtype)
    data = LensDataModule(cfg.data, tokenizer, seed=cfg.seed)
    data.setup("fit")
    results = run_skip_sweep(model, data, cfg)
    results["config"] = to_dict(cfg)
    write_json(results, cfg.run_dir / "skip_sweep.json")
    plot_skip_sweep(results, cfg.run_dir / "skip_sweep.png", title=f"{model_id(model)}: skipping spans of blocks")
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file under configs/ (defaults apply without one)")
    parser.add_argument("overrides", nargs="*", help="OmegaConf dotlist overrides, e.g. span_lengths=[1,2]")
    args = parser.parse_args(argv)
    cfg = load_config(SkipSweepConfig, args.config, args.overrides)
    results = skip_sweep(cfg)
    print(f"intact model: CE {results['intact_ce']:.3f} nats per token")
    for row in results["spans"]:
        fixed = f", translator {row['translator_ce']:.3f}" if "translator_ce" in row else ""
        print(f"skip {row['start']:>2}..{row['end']:<2}: CE {row['skip_ce']:.3f}{fixed}")
    print(f"wrote {cfg.run_dir}")


if __name__ == "__main__":
    run_cli(main)
