"""``train(cfg)``: the whole tuned-lens run, top to bottom, callable from a notebook or ``lens train``.

config -> frozen model -> batches -> (closed-form start) -> Lightning KL training -> safetensors
-> held-out evaluation (JSON + PNG) against the logit lens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L

from lens.analysis.evaluate import LensEvaluation, evaluate_lenses
from lens.artifacts.files import write_json
from lens.artifacts.registry import save_lens
from lens.config import TrainConfig, lens_recipe, to_dict
from lens.core.closed_form import closed_form_start
from lens.core.model import model_id
from lens.core.translators import TunedLens, logit_lens_for
from lens.report.plots import plot_layer_metrics
from lens.training.checkpointing import (
    AtomicCheckpointIO,
    ResumeGuard,
    RngState,
    RunClock,
    last_checkpoint,
    periodic_checkpoint,
)
from lens.training.datamodule import model_and_data
from lens.training.module import TunedLensModule
from lens.training.trainer import lightning_trainer


@dataclass
class LensTrainResult:
    """Where the lens went, how long training took, and its held-out evaluation (None when disabled
    or off rank 0 of a multi-process run)."""

    run_dir: Path
    train_seconds: float
    evaluation: LensEvaluation | None = None

    def lines(self) -> list[str]:
        return self.evaluation.lines() if self.evaluation else [f"trained in {self.train_seconds:.1f} s (no evaluation)"]


def resume_settings(cfg: TrainConfig) -> dict[str, Any]:
    """What a resumed run must share with the run that wrote the checkpoint to reach the same lens.

    ``optim.num_steps`` may change: raising it is how a finished run is trained further.
    """
    full = to_dict(cfg)
    del full["optim"]["num_steps"]
    same = {key: full[key] for key in ("seed", "model", "data", "lens", "optim")}
    same["accumulate_grad_batches"] = cfg.trainer.accumulate_grad_batches
    return same


def resolve_resume(cfg: TrainConfig) -> Path | None:
    """The checkpoint to continue from: ``resume_from``, else ``last.ckpt`` of this run if ``resume``."""
    if cfg.resume_from is not None:
        if not Path(cfg.resume_from).is_file():
            raise FileNotFoundError(f"checkpoint {cfg.resume_from} (resume_from) does not exist")
        return Path(cfg.resume_from)
    last = last_checkpoint(cfg.run_dir)
    if cfg.resume and last.is_file():
        return last
    if cfg.resume:
        print(f"resume=true but {last} does not exist yet: starting from scratch")
    return None


def make_trainer(cfg: TrainConfig, run_dir: Path, clock: RunClock | None = None) -> L.Trainer:
    """The run's Lightning trainer; ``clock`` (the run's) rides in its checkpoints."""
    t = cfg.trainer
    callbacks: list[L.Callback] = [RngState(), ResumeGuard(resume_settings(cfg)), *([clock] if clock else [])]
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


def train(cfg: TrainConfig) -> LensTrainResult:
    """Train, save and evaluate one tuned lens."""
    ckpt_path = resolve_resume(cfg)
    run_dir = cfg.run_dir
    model, data = model_and_data(cfg)
    lens = TunedLens.for_model(model)

    clock = RunClock(time.perf_counter())
    if cfg.lens.init == "lstsq" and ckpt_path is None:  # a checkpoint already holds the translators
        seqs = data.train_sequences(cfg.lens.lstsq_sequences)
        closed_form_start(model, lens, seqs, cfg.data.batch_size, cfg.lens.ridge)
    if cfg.optim.num_steps > 0:
        module = TunedLensModule(model, lens, cfg.lens, cfg.optim, cfg.trainer.on_nonfinite)
        trainer = make_trainer(cfg, run_dir, clock)
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
        model.to("cpu")  # Lightning moved only the module; bring the frozen model back with it
        if trainer.global_rank != 0:
            return LensTrainResult(run_dir, clock.seconds())  # the other processes hold the same lens
    lens = lens.cpu()
    train_seconds = clock.seconds()  # every segment of a resumed run

    save_lens(lens, run_dir, model, to_dict(cfg), train_seconds=train_seconds)
    result = LensTrainResult(run_dir, train_seconds)
    if not cfg.eval.enabled:
        return result
    held_out = data.val_sequences[: cfg.eval.sequences]  # type: ignore[index]
    result.evaluation = evaluate_lenses(model, {"tuned": lens, "logit": logit_lens_for(model)}, held_out, cfg.data.batch_size)
    write_json({**result.evaluation.to_json(), "base_model": model_id(model), "train_seconds": train_seconds}, run_dir / "eval.json")
    title = f"{model_id(model)}: {lens_recipe(to_dict(cfg))} vs logit lens, {result.evaluation.tokens:,} held-out tokens"
    plot_layer_metrics(result.evaluation, run_dir / "eval.png", title=title)
    return result
