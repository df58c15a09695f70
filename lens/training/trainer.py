"""The one place that turns a ``TrainerConfig`` into a Lightning ``Trainer``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lens.config import OptimConfig, TrainerConfig


def resolve_precision(cfg: TrainerConfig) -> str:
    if cfg.precision != "auto":
        return cfg.precision
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def lightning_trainer(t: TrainerConfig, optim: OptimConfig, run_dir: Path, **extra: Any) -> L.Trainer:
    """Step-based training (``optim.num_steps``), validation every ``t.val_every_n_steps`` steps,
    TensorBoard logs in ``run_dir/tensorboard``; ``extra`` adds callbacks, plugins, checkpointing."""
    return L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        strategy=t.strategy,
        precision=resolve_precision(t),  # type: ignore[arg-type]
        max_steps=optim.num_steps,
        accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=optim.grad_clip or None,
        log_every_n_steps=t.log_every_n_steps,
        val_check_interval=t.val_every_n_steps * t.accumulate_grad_batches,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        enable_progress_bar=t.progress_bar,
        enable_model_summary=t.progress_bar,  # a quiet run (many small translators) prints neither
        use_distributed_sampler=False,  # the datamodule's batch stream slices batches per process itself
        logger=TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version=""),
        default_root_dir=str(run_dir),
        **extra,
    )
