"""Packed token sequences for Lightning: training batches and a fixed held-out set.

Training batches come from ``ResumableBatches``: a seeded stream whose position is
saved with each checkpoint, so a resumed run replays exactly the batches it had not trained on.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lens.config import CorpusRunConfig, DataConfig
from lens.core.model import load_run_model
from lens.data.batches import ResumableBatches
from lens.data.sequences import load_sequences, token_sequences


class LensDataModule(L.LightningDataModule):
    def __init__(self, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int = 42) -> None:
        super().__init__()
        self.cfg, self.tokenizer, self.seed = cfg, tokenizer, seed
        self.train_set: TensorDataset | None = None  # None when streaming
        self.val_sequences: torch.Tensor | None = None  # [n, seq_len]
        self.batches_done = 0
        """Batches this process trained on in the current epoch, restored from a checkpoint."""

    def setup(self, stage: str | None = None) -> None:
        if self.val_sequences is None:
            self.val_sequences = load_sequences(self.cfg, self.tokenizer, held_out=True, limit=self.cfg.max_eval_sequences)
        if self.train_set is None and not self.cfg.streaming:
            seqs = load_sequences(self.cfg, self.tokenizer, held_out=False, limit=self.cfg.max_train_sequences)
            self.train_set = TensorDataset(seqs)

    def train_sequences(self, limit: int) -> torch.Tensor:
        """The first ``limit`` training sequences, for one-pass statistics (closed-form start)."""
        if isinstance(self.train_set, TensorDataset):
            return self.train_set.tensors[0][:limit]
        return load_sequences(self.cfg, self.tokenizer, held_out=False, limit=limit)

    def train_dataloader(self) -> DataLoader:
        """This process's slice of each global batch, from the saved position on.

        The loader gets its own generator so that creating it draws nothing from the global
        one: a resumed run and an uninterrupted one then draw the same training randomness.
        """
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        if self.train_set is not None:
            source: Any = self.train_set.tensors[0]
        else:
            assert self.cfg.streaming, "call setup() first"
            source = partial(token_sequences, self.cfg, self.tokenizer, False, self.cfg.max_train_sequences)
        batches = ResumableBatches(source, self.cfg.batch_size, self.seed, self.batches_done, rank, world)
        workers = self.cfg.num_workers
        # persistent workers keep their copy of ``batches``, so only the first pass skips
        return DataLoader(batches, batch_size=None, num_workers=workers, persistent_workers=workers > 0, generator=torch.Generator())

    def val_dataloader(self) -> DataLoader:
        assert self.val_sequences is not None, "call setup() first"
        return DataLoader(TensorDataset(self.val_sequences), batch_size=self.cfg.batch_size, generator=torch.Generator())

    def state_dict(self) -> dict[str, Any]:
        """The data position: batches this process trained on in the current epoch.

        In-memory data is one endless epoch; a streamed corpus has one epoch per pass.
        """
        trainer = self.trainer
        if trainer is None:
            return {}
        return {"batches_done": trainer.fit_loop.epoch_loop.batch_progress.current.processed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.batches_done = state_dict.get("batches_done", 0)


def model_and_data(cfg: CorpusRunConfig) -> tuple[PreTrainedModel, LensDataModule]:
    """Seed, the frozen model (checked against the config first) and its corpus set up: what every
    Lightning run starts with."""
    L.seed_everything(cfg.seed, workers=True)
    model, tokenizer = load_run_model(cfg)
    data = LensDataModule(cfg.data, tokenizer, seed=cfg.seed)
    data.setup("fit")
    return model, data
