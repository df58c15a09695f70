"""Checkpoints that let a killed run continue to the lens an uninterrupted run would have made.

A checkpoint holds only what training changes: the translators (the frozen base model lives
outside the module tree, see ``FrozenModelModule``), optimizer and scheduler state, Lightning's
loop progress, the data position (``LensDataModule.state_dict``), every random generator and the
settings that must not change across a resume. Files are written under a temporary name and
renamed, so a kill in the middle of a save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import IterableDataset, get_worker_info

from lens.io import atomic_path

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
    """``torch.save`` to a temp file, fsync, rename: the checkpoint under the final name is always whole."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        check_finite_state(checkpoint.get("state_dict", {}))
        with atomic_path(Path(path)) as tmp:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())


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
        if trainer.training:
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


class ResumableBatches(IterableDataset):
    """This process's batches, where global batch ``b`` depends only on ``(seed, b)``.

    In-memory sequences give an endless stream (one Lightning epoch) in which pass ``e`` over the
    data is a permutation drawn from ``seed + e``; a streamed corpus gives one pass in corpus order
    per iteration (one epoch per pass). A global batch holds ``batch_size * world_size`` sequences
    and process ``rank`` takes the ``rank``-th slice, so N processes of ``batch_size`` B see the
    same global batches as one process of ``N * B``. The first iteration skips ``start`` global
    batches, those a resumed run already trained on in its current epoch; dataloader workers take
    every ``num_workers``-th batch so that their interleaved output keeps the same order.
    """

    def __init__(
        self,
        sequences: torch.Tensor | Callable[[], Iterable[torch.Tensor]],
        batch_size: int,
        seed: int,
        start: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.sequences, self.batch_size, self.seed = sequences, batch_size, seed
        self.start, self.rank, self.world_size = start, rank, world_size

    @property
    def global_size(self) -> int:
        return self.batch_size * self.world_size

    def _too_few(self, count: int) -> ValueError:
        return ValueError(
            f"{count} training sequences cannot fill one global batch of {self.global_size} "
            f"(data.batch_size {self.batch_size} x {self.world_size} processes): use a larger corpus "
            "or a smaller data.seq_len / data.batch_size"
        )

    def _global_batches(self, start: int) -> Iterator[torch.Tensor]:
        """Global batches from number ``start`` on, ``[global_size, seq_len]`` each."""
        size = self.global_size
        if isinstance(self.sequences, torch.Tensor):
            per_pass = len(self.sequences) // size
            if per_pass == 0:
                raise self._too_few(len(self.sequences))
            batch = start
            while True:
                order = torch.randperm(len(self.sequences), generator=torch.Generator().manual_seed(self.seed + batch // per_pass))
                for i in range(batch % per_pass, per_pass):
                    yield self.sequences[order[i * size : (i + 1) * size]]
                batch += per_pass - batch % per_pass
        else:  # streaming: the pass follows the corpus order, so skipping means reading
            buffer, count, seen = [], 0, 0
            for seq in self.sequences():
                buffer.append(seq)
                count += 1
                if len(buffer) == size:
                    if seen >= start:
                        yield torch.stack(buffer)
                    seen, buffer = seen + 1, []
            if count < size:
                raise self._too_few(count)

    def __iter__(self) -> Iterator[tuple[torch.Tensor]]:
        start, self.start = self.start, 0  # later passes start at their beginning
        worker = get_worker_info()
        worker_id, n_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        lo = self.rank * self.batch_size
        for i, batch in enumerate(self._global_batches(start)):
            if i % n_workers == worker_id:
                yield (batch[lo : lo + self.batch_size],)
