"""Packed token sequences for Lightning: training batches and a fixed held-out set."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset, TensorDataset
from transformers import PreTrainedTokenizerBase

from lens.config import DataConfig
from lens.data import load_sequences, token_sequences


class _StreamedSequences(IterableDataset):
    """Training sequences read lazily from a (possibly streaming) corpus."""

    def __init__(self, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase) -> None:
        self.cfg, self.tokenizer = cfg, tokenizer

    def __iter__(self):
        for seq in token_sequences(self.cfg, self.tokenizer, held_out=False, limit=self.cfg.max_train_sequences):
            yield (seq,)


class LensDataModule(L.LightningDataModule):
    def __init__(self, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int = 42) -> None:
        super().__init__()
        self.cfg, self.tokenizer, self.seed = cfg, tokenizer, seed
        self.train_set: TensorDataset | _StreamedSequences | None = None
        self.val_sequences: torch.Tensor | None = None  # [n, seq_len]

    def setup(self, stage: str | None = None) -> None:
        if self.val_sequences is None:
            self.val_sequences = load_sequences(self.cfg, self.tokenizer, held_out=True, limit=self.cfg.max_eval_sequences)
        if self.train_set is None:
            if self.cfg.streaming:
                self.train_set = _StreamedSequences(self.cfg, self.tokenizer)
            else:
                seqs = load_sequences(self.cfg, self.tokenizer, held_out=False, limit=self.cfg.max_train_sequences)
                self.train_set = TensorDataset(seqs)

    def train_sequences(self, limit: int) -> torch.Tensor:
        """The first ``limit`` training sequences, for one-pass statistics (closed-form start)."""
        if isinstance(self.train_set, TensorDataset):
            return self.train_set.tensors[0][:limit]
        return load_sequences(self.cfg, self.tokenizer, held_out=False, limit=limit)

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None, "call setup() first"
        shuffle = isinstance(self.train_set, TensorDataset)
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(
            self.train_set,
            batch_size=self.cfg.batch_size,
            shuffle=shuffle,
            generator=generator,
            num_workers=self.cfg.num_workers,
            drop_last=True,
        )

    def val_dataloader(self) -> DataLoader:
        assert self.val_sequences is not None, "call setup() first"
        return DataLoader(TensorDataset(self.val_sequences), batch_size=self.cfg.batch_size)
