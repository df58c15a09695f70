"""Checkpoints that let a killed run continue to the lens an uninterrupted run would have made.

A checkpoint holds only what training changes: the translators (the frozen base model lives
outside the module tree, see ``FrozenModelModule``), optimizer and scheduler state, Lightning's
loop progress, the data position (``LensDataModule.state_dict``), every random generator and the
settings that must not change across a resume. Files are written under a temporary name and
renamed, so a kill in the middle of a save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lens.artifacts.files import write_stream

CHECKPOINT_DIR = "resume"
"""Sub-folder of the run folder holding ``last.ckpt``."""
LAST = "last.ckpt"


def last_checkpoint(run_dir: Path) -> Path:
    return run_dir / CHECKPOINT_DIR / LAST


def periodic_checkpoint(run_dir: Path, every_n_steps: int) -> ModelCheckpoint:
    """Overwrite ``run_dir/resume/last.ckpt`` every ``every_n_steps`` optimizer steps."""
    return ModelCheckpoint(
        dirpath=run_dir / CHECKPOINT_DIR,
        every_n_train_steps=every_n_steps,
        save_top_k=0,
        save_last=True,
        enable_version_counter=False,
    )


def check_finite_state(state_dict: dict[str, torch.Tensor]) -> None:
    """Refuse to persist translators that hold NaN or inf: resuming from them cannot recover."""
    bad = [name for name, t in state_dict.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise ValueError(f"refusing to write a checkpoint whose tensors {bad} hold NaN or inf")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Stream to a temp file, fsync, rename: the checkpoint under the final name is always whole, a
    full disk is reported as such (not as a torch serialisation error), and no serialised copy of
    the translators and optimizer state is held in memory (with Adam that copy was the run's peak)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        check_finite_state(checkpoint.get("state_dict", {}))
        write_stream(Path(path), lambda f: torch.save(checkpoint, f), needed=tensor_bytes(checkpoint))


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a nested checkpoint: about its size on disk, known before writing it."""
    if isinstance(obj, torch.Tensor):
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


class RngState(Callback):
    """Save Python, NumPy and torch generators with each checkpoint; restore them when training resumes.

    Validation runs under a forked state, so whether it ran (a resumed run skips the validation
    due right after its checkpoint) never changes the random numbers training draws.
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None
        self._outside_validation: dict[str, Any] | None = None

    @staticmethod
    def capture() -> dict[str, Any]:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        return {
            "python": random.getstate(),
            "numpy": (kind, torch.from_numpy(keys.copy()), pos, has_gauss, gauss),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    @staticmethod
    def restore(state: dict[str, Any]) -> None:
        random.setstate(state["python"])
        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy(), pos, has_gauss, gauss))
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])

    def state_dict(self) -> dict[str, Any]:
        return self.capture()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._pending is not None:
            self.restore(self._pending)
            self._pending = None

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Always: inside ``fit`` Lightning reports the validation stage here, never ``trainer.training``,
        # and a resumed run may skip or repeat the validation at its checkpoint step.
        self._outside_validation = self.capture()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._outside_validation is not None:
            self.restore(self._outside_validation)
            self._outside_validation = None


class ResumeGuard(Callback):
    """Store the settings that shape the result; refuse to resume under different ones."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = settings

    def state_dict(self) -> dict[str, Any]:
        return {"settings": self.settings}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict["settings"]
        changed = sorted(k for k in saved.keys() | self.settings.keys() if saved.get(k) != self.settings.get(k))
        if changed:
            detail = "; ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {self.settings.get(k)!r}" for k in changed)
            raise ValueError(f"cannot resume: the checkpoint was written under other settings ({detail})")


class RunClock(Callback):
    """Wall seconds of the whole run, carried in each checkpoint, so a run resumed (perhaps more than
    once) reports every segment up to its last checkpoint plus the one that finished it, not just the
    last. The time a killed segment spent past its last checkpoint is redone, and counted once."""

    def __init__(self, started: float) -> None:
        self.started = started
        self.before = 0.0  # seconds of the earlier segments, up to the checkpoint this one resumed from

    def seconds(self) -> float:
        return self.before + time.perf_counter() - self.started

    def state_dict(self) -> dict[str, Any]:
        return {"seconds": self.seconds()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.before = state_dict["seconds"]
