"""``train_translator(cfg)``: learn the affine map that stands in for a span of blocks.

config -> frozen model -> batches -> (least-squares start) -> Lightning training (KL or MSE)
-> ``translator.safetensors`` -> held-out CE/KL of intact model, plain skip and translator.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedModel

from lens.analysis.spans import SpanEvaluation, evaluate_spans
from lens.artifacts.files import write_json
from lens.artifacts.registry import save_span_translator
from lens.config import TranslatorTrainConfig, to_dict
from lens.core.closed_form import fit_span_translators
from lens.core.model import model_id
from lens.core.translators import SpanTranslator
from lens.training.datamodule import LensDataModule, model_and_data
from lens.training.span_module import SpanTranslatorModule
from lens.training.trainer import lightning_trainer


@dataclass
class TranslatorTrainResult:
    run_dir: Path
    train_seconds: float
    evaluation: SpanEvaluation | None = None

    def lines(self) -> list[str]:
        if self.evaluation is None:
            return [f"trained in {self.train_seconds:.1f} s (no evaluation)"]
        ev = self.evaluation
        return [
            f"span {row.start}..{row.end}: CE intact {ev.intact_ce:.3f}, skip {row.skip_ce:.3f}, translator {row.translator_ce:.3f} nats"
            for row in ev.spans
        ]


def train_span_translator(
    model: PreTrainedModel, data: LensDataModule, cfg: TranslatorTrainConfig, translator: SpanTranslator
) -> SpanTranslator:
    """``optim.num_steps`` Lightning steps of the configured loss; ``data`` must be set up. One small
    map trains in minutes, so the run keeps no resume checkpoints."""
    if cfg.optim.num_steps > 0:
        module = SpanTranslatorModule(model, translator, cfg.span.loss, cfg.optim)
        lightning_trainer(cfg.trainer, cfg.optim, cfg.run_dir, enable_checkpointing=False).fit(module, datamodule=data)
        model.to("cpu")  # Lightning moved only the module; bring the frozen model back with it
    return translator.cpu()


def train_translator(cfg: TranslatorTrainConfig) -> TranslatorTrainResult:
    """Train, save and evaluate one span translator."""
    model, data = model_and_data(cfg)
    translator = SpanTranslator.for_span(model, cfg.span.start, cfg.span.end)
    started = time.perf_counter()
    if cfg.span.init == "lstsq":
        fit_span_translators(model, [translator], data.train_sequences(cfg.span.lstsq_sequences), cfg.data.batch_size, cfg.span.ridge)
    train_span_translator(model, data, cfg, translator)
    result = TranslatorTrainResult(cfg.run_dir, time.perf_counter() - started)
    save_span_translator(translator, cfg.run_dir, model, to_dict(cfg), train_seconds=result.train_seconds)
    if not cfg.eval.enabled:
        return result
    span = (cfg.span.start, cfg.span.end)
    held_out = data.val_sequences[: cfg.eval.sequences]  # type: ignore[index]
    result.evaluation = evaluate_spans(model, held_out, [span], {span: translator}, cfg.data.batch_size)
    write_json({**result.evaluation.to_json(), "base_model": model_id(model), "train_seconds": result.train_seconds}, cfg.run_dir / "eval.json")
    return result
