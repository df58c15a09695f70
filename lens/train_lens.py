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

from lens.closed_form import RidgeStats, fit_residuals
from lens.config import TrainConfig, to_dict
from lens.evaluate import evaluate_lenses
from lens.io import logit_lens_for, save_lens, write_json
from lens.model import load_model, model_id
from lens.plots import plot_layer_metrics
from lens.pretrained import lens_metadata
from lens.training.checkpointing import (
    AtomicCheckpointIO,
    ResumeGuard,
    RngState,
    last_checkpoint,
    periodic_checkpoint,
)
from lens.training.datamodule import LensDataModule
from lens.training.trainer import lightning_trainer
from lens.training.module import TunedLensModule
from lens.translators import TunedLens


def closed_form_start(model, lens: TunedLens, sequences: torch.Tensor, batch_size: int, ridge: float) -> None:
    """Fit every translator by ridge regression onto the final residual, in one pass."""
    stats = RidgeStats(lens.n_layers, lens.d_model)
    for residuals in fit_residuals(model, sequences, batch_size, desc="closed-form start"):
        stats.update(residuals)
    stats.apply_to(lens, ridge)


def resume_settings(cfg: TrainConfig) -> dict[str, Any]:
    """What a resumed run must share with the run that wrote the checkpoint to reach the same lens.

    ``optim.num_steps`` may change: raising it is how a finished run is trained further.
    """
    full = to_dict(cfg)
    del full["optim"]["num_steps"]
    same = {key: full[key] for key in ("seed", "model", "data", "lens", "optim")}
    same["accumulate_grad_batches"] = cfg.trainer.accumulate_grad_batches
    return same


def resolve_resume(cfg: TrainConfig, path: str | Path | None = None) -> Path | None:
    """The checkpoint to continue from: ``path``, else ``last.ckpt`` of this run if ``cfg.resume``."""
    if path is not None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        return Path(path)
    last = last_checkpoint(cfg.run_dir)
    if cfg.resume and last.is_file():
        return last
    if cfg.resume:
        print(f"resume=true but {last} does not exist yet: starting from scratch")
    return None


def make_trainer(cfg: TrainConfig, run_dir: Path) -> L.Trainer:
    t = cfg.trainer
    callbacks: list[L.Callback] = [RngState(), ResumeGuard(resume_settings(cfg))]
    if t.checkpoint_every_n_steps > 0:
        callbacks.append(periodic_checkpoint(run_dir, t.checkpoint_every_n_steps))
    return lightning_trainer(
        t,
        cfg.optim,
        run_dir,
        enable_checkpointing=t.checkpoint_every_n_steps > 0,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
    )


def train(cfg: TrainConfig, resume_from: str | Path | None = None) -> dict[str, Any]:
    """Train, save and evaluate one tuned lens; returns the evaluation results (empty off rank 0)."""
    L.seed_everything(cfg.seed, workers=True)
    ckpt_path = resolve_resume(cfg, resume_from)
    run_dir = cfg.run_dir
    model, tokenizer = load_model(cfg.model.name, cfg.model.dtype)
    data = LensDataModule(cfg.data, tokenizer, seed=cfg.seed)
    data.setup("fit")
    lens = TunedLens.for_model(model)

    started = time.perf_counter()
    if cfg.lens.init not in ("zero", "lstsq"):
        raise ValueError(f"lens.init must be 'zero' or 'lstsq', got {cfg.lens.init!r}")
    if cfg.lens.init == "lstsq" and ckpt_path is None:  # a checkpoint already holds the translators
        seqs = data.train_sequences(cfg.lens.lstsq_sequences)
        closed_form_start(model, lens, seqs, cfg.data.batch_size, cfg.lens.ridge)
    if cfg.optim.num_steps > 0:
        module = TunedLensModule(model, lens, cfg.lens, cfg.optim, cfg.trainer.on_nonfinite)
        trainer = make_trainer(cfg, run_dir)
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
        model.to("cpu")  # Lightning moved only the module; bring the frozen model back with it
        if trainer.global_rank != 0:
            return {}  # the other processes of a multi-process run hold the same lens
    lens = lens.cpu()
    train_seconds = time.perf_counter() - started

    save_lens(lens, run_dir, {**lens_metadata(model), "train_seconds": train_seconds, "train_config": to_dict(cfg)})
    if not cfg.eval.enabled:
        return {}
    held_out = data.val_sequences[: cfg.eval.sequences]  # type: ignore[index]
    results = evaluate_lenses(model, {"tuned": lens, "logit": logit_lens_for(model)}, held_out, cfg.data.batch_size)
    results["base_model"] = model_id(model)
    results["train_seconds"] = train_seconds
    write_json(results, run_dir / "eval.json")
    plot_layer_metrics(results, run_dir / "eval.png", title=f"{cfg.run_name}: tuned vs logit lens (held out)")
    return results
