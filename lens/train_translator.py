"""``train_translator(cfg)``: learn the affine map that stands in for a span of blocks.

config -> frozen model -> batches -> (least-squares start) -> Lightning training (KL or MSE)
-> ``translator.safetensors`` -> held-out CE/KL of intact model, plain skip and translator.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
from transformers import PreTrainedModel

from lens.config import TranslatorTrainConfig, to_dict
from lens.interventions.base import n_layers
from lens.io import write_json
from lens.model import load_model, model_id
from lens.span_translator import SpanTranslator, evaluate_spans, fit_least_squares, save_translator
from lens.training.datamodule import LensDataModule
from lens.training.span_module import SpanTranslatorModule
from lens.training.trainer import lightning_trainer


def make_translator_trainer(cfg: TranslatorTrainConfig) -> L.Trainer:
    """A plain Lightning trainer: one small map trains in minutes, so no resume checkpoints."""
    return lightning_trainer(cfg.trainer, cfg.optim, cfg.run_dir, enable_checkpointing=False)


def train_span_translator(
    model: PreTrainedModel, data: LensDataModule, cfg: TranslatorTrainConfig, translator: SpanTranslator
) -> SpanTranslator:
    """``optim.num_steps`` Lightning steps of the configured loss; ``data`` must be set up."""
    if cfg.optim.num_steps > 0:
        module = SpanTranslatorModule(model, translator, cfg.span.loss, cfg.optim)
        make_translator_trainer(cfg).fit(module, datamodule=data)
        model.to("cpu")  # Lightning moved only the module; bring the frozen model back with it
    return translator.cpu()


def train_translator(cfg: TranslatorTrainConfig) -> dict[str, Any]:
    """Train, save and evaluate one span translator; returns the held-out evaluation."""
    L.seed_everything(cfg.seed, workers=True)
    model, tokenizer = load_model(cfg.model.name, cfg.model.dtype)
    data = LensDataModule(cfg.data, tokenizer, seed=cfg.seed)
    data.setup("fit")
    started = time.perf_counter()
    translator = SpanTranslator.for_span(model, cfg.span.start, cfg.span.end)
    if cfg.span.init == "lstsq":
        fit_least_squares(model, [translator], data.train_sequences(cfg.span.lstsq_sequences), cfg.data.batch_size, cfg.span.ridge)
    elif cfg.span.init != "zero":
        raise ValueError(f"span.init must be 'zero' or 'lstsq', got {cfg.span.init!r}")
    train_span_translator(model, data, cfg, translator)
    train_seconds = time.perf_counter() - started
    save_translator(translator, cfg.run_dir, {
        "base_model": model_id(model),
        "num_layers": n_layers(model),
        "train_seconds": train_seconds,
        "train_config": to_dict(cfg),
    })
    if not cfg.eval.enabled:
        return {}
    span = (cfg.span.start, cfg.span.end)
    held_out = data.val_sequences[: cfg.eval.sequences]  # type: ignore[index]
    results = evaluate_spans(model, held_out, [span], {span: translator}, cfg.data.batch_size)
    results.update(base_model=model_id(model), train_seconds=train_seconds)
    write_json(results, cfg.run_dir / "eval.json")
    return results
