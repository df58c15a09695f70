"""Batches: training batches that a resumed run can replay exactly (global batch ``b`` depends only
on ``(seed, b)``), and prompts grouped by length so that a batch of them needs no padding."""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, Iterable, Iterator, Sequence

import torch
from torch.utils.data import IterableDataset, get_worker_info

from lens.data.documents import CorpusError


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

    def _too_few(self, count: int) -> CorpusError:
        return CorpusError(
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


def equal_length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices of sequences with these token ``lengths``, in batches of at most ``batch_size`` that
    share one length (shortest first, each in index order): no padding, no attention mask, and the
    last token is column -1 of every row."""
    by_length: dict[int, list[int]] = defaultdict(list)
    for index, length in enumerate(lengths):
        by_length[length].append(index)
    return [group[i : i + batch_size] for _, group in sorted(by_length.items()) for i in range(0, len(group), batch_size)]
