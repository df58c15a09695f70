"""``train(cfg)``: the whole tuned-lens run, top to bottom, callable from a notebook or ``train.py``.

config -> frozen model -> batches -> (closed-form start) -> Lightning KL training -> safetensors
-> held-out evaluation (JSON + PNG) against the logit lens.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tqdm.auto import tqdm

from lens.closed_form import RidgeStats
from lens.config import TrainConfig, TrainerConfig, to_dict
from lens.evaluate import evaluate_lenses
from lens.io import logit_lens_for, save_lens, write_json
from lens.model import load_model, model_id
from lens.plots import plot_layer_metrics
from lens.residuals import capture_residuals
from lens.training.datamodule import LensDataModule
from lens.training.module import TunedLensModule
from lens.translators import TunedLens


def resolve_precision(cfg: TrainerConfig) -> str:
    if cfg.precision != "auto":
        return cfg.precision
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


@torch.no_grad()
def closed_form_start(model, lens: TunedLens, sequences: torch.Tensor, batch_size: int, ridge: float) -> None:
    """Fit every translator by ridge regression onto the final residual, in one pass."""
    stats = RidgeStats(lens.n_layers, lens.d_model)
    for start in tqdm(range(0, len(sequences), batch_size), desc="closed-form start"):
        residuals, _ = capture_residuals(model, sequences[start : start + batch_size].to(model.device))
        stats.update(residuals.flatten(1, 2).cpu())
    stats.apply_to(lens, ridge)


def make_trainer(cfg: TrainConfig, run_dir: Path) -> L.Trainer:
    t = cfg.trainer
    return L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        strategy=t.strategy,
        precision=resolve_precision(t),  # type: ignore[arg-type]
        max_steps=cfg.optim.num_steps,
        accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=cfg.optim.grad_clip or None,
        log_every_n_steps=t.log_every_n_steps,
        val_check_interval=t.val_every_n_steps * t.accumulate_grad_batches,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        enable_progress_bar=t.progress_bar,
        enable_checkpointing=False,
        logger=TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version=""),
        default_root_dir=str(run_dir),
    )


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train, save and evaluate one tuned lens; returns the evaluation results."""
    L.seed_everything(cfg.seed, workers=True)
    run_dir = cfg.run_dir
    model, tokenizer = load_model(cfg.model.name, cfg.model.dtype)
    data = LensDataModule(cfg.data, tokenizer, seed=cfg.seed)
    data.setup("fit")
    lens = TunedLens.for_model(model)

    started = time.perf_counter()
    if cfg.lens.init == "lstsq":
        seqs = data.train_sequences(cfg.lens.lstsq_sequences)
        closed_form_start(model, lens, seqs, cfg.data.batch_size, cfg.lens.ridge)
    elif cfg.lens.init != "zero":
        raise ValueError(f"lens.init must be 'zero' or 'lstsq', got {cfg.lens.init!r}")
    if cfg.optim.num_steps > 0:
        module = TunedLensModule(model, lens, cfg.lens, cfg.optim)
        make_trainer(cfg, run_dir).fit(module, datamodule=data)
        model.to("cpu")  # Lightning moved only the module; bring the frozen model back with it
    lens = lens.cpu()
    train_seconds = time.perf_counter() - started

    save_lens(lens, run_dir, {"base_model": model_id(model), "train_seconds": train_seconds, "train_config": to_dict(cfg)})
    if not cfg.eval.enabled:
        return {}
    held_out = data.val_sequences[: cfg.eval.sequences]  # type: ignore[index]
    results = evaluate_lenses(model, {"tuned": lens, "logit": logit_lens_for(model)}, held_out, cfg.data.batch_size)
    results["base_model"] = model_id(model)
    results["train_seconds"] = train_seconds
    write_json(results, run_dir / "eval.json")
    plot_layer_metrics(results, run_dir / "eval.png", title=f"{cfg.run_name}: tuned vs logit lens (held out)")
    return results
