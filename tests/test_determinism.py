"""The same seed and config give a bit-identical lens on CPU; another seed gives another lens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lens.data.batches import ResumableBatches
from tiny_run import overrides, train_in_process, write_tiny_inputs

pytestmark = pytest.mark.usefixtures("one_thread")

RUN = ("optim.num_steps=6", "lens.init=lstsq", "lens.lstsq_sequences=8", "lens.positions_per_layer=16",
       "trainer.val_every_n_steps=3", "trainer.checkpoint_every_n_steps=0")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    return write_tiny_inputs(tmp_path_factory.mktemp("inputs"))


def test_same_seed_and_config_give_a_bit_identical_lens(inputs, tmp_path):
    first = train_in_process(overrides(inputs, tmp_path, "first", *RUN))
    second = train_in_process(overrides(inputs, tmp_path, "second", *RUN))
    assert torch.equal(first.weight, second.weight) and torch.equal(first.bias, second.bias)
    other_seed = train_in_process(overrides(inputs, tmp_path, "other", *RUN, "seed=7"))
    assert not torch.equal(first.weight, other_seed.weight)


def take(sequences: torch.Tensor, n: int, seed: int = 1, start: int = 0) -> list[torch.Tensor]:
    stream = iter(ResumableBatches(sequences, batch_size=3, seed=seed, start=start))
    return [next(stream)[0] for _ in range(n)]


def test_batch_order_depends_only_on_seed_and_position():
    sequences = torch.arange(30).reshape(10, 3)  # 10 sequences, batches of 3: 3 batches per pass
    full = take(sequences, 8)
    assert all(torch.equal(a, b) for a, b in zip(full, take(sequences, 8)))
    assert all(torch.equal(a, b) for a, b in zip(full[5:], take(sequences, 3, start=5)))  # resumed mid-pass
    first_pass = torch.cat(full[:3])[:, 0].tolist()
    assert len(set(first_pass)) == 9  # a pass draws each sequence at most once
    assert not all(torch.equal(a, b) for a, b in zip(full[:3], full[3:6]))  # each pass is reshuffled
    assert not torch.equal(full[0], take(sequences, 1, seed=2)[0])


def test_streamed_corpus_skips_only_in_the_pass_it_resumes():
    sequences = list(torch.arange(30).reshape(10, 3))  # 3 full batches of 3 per pass
    stream = ResumableBatches(lambda: iter(sequences), batch_size=3, seed=0, start=2)
    resumed_pass, next_pass = [b[0] for b in stream], [b[0] for b in stream]
    assert len(resumed_pass) == 1 and torch.equal(resumed_pass[0], torch.stack(sequences[6:9]))
    assert len(next_pass) == 3 and torch.equal(next_pass[0], torch.stack(sequences[:3]))
