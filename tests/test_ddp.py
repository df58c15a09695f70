"""Two CPU processes (DDP over gloo, through Lightning) train the lens one process trains on the
same global batches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lens.artifacts.registry import load_lens
from lens.data.batches import ResumableBatches
from tiny_run import assert_same_lens, config, overrides, train_in_process, train_py, write_tiny_inputs

pytestmark = pytest.mark.usefixtures("one_thread")

RUN = ("optim.num_steps=6", "trainer.val_every_n_steps=3", "trainer.checkpoint_every_n_steps=3")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    return write_tiny_inputs(tmp_path_factory.mktemp("inputs"))


def test_processes_split_each_global_batch():
    sequences = torch.arange(40).reshape(20, 2)
    whole = iter(ResumableBatches(sequences, batch_size=4, seed=3))
    halves = [iter(ResumableBatches(sequences, batch_size=2, seed=3, rank=r, world_size=2)) for r in (0, 1)]
    for _ in range(7):
        assert torch.equal(next(whole)[0], torch.cat([next(h)[0] for h in halves]))


def test_two_gloo_processes_match_one_process(inputs, tmp_path):
    one = train_in_process(overrides(inputs, tmp_path, "one", *RUN, "data.batch_size=4"))
    args = overrides(inputs, tmp_path, "two", *RUN, "data.batch_size=2", "trainer.strategy=ddp", "trainer.devices=2")
    log = tmp_path / "ddp.log"
    assert train_py(args, log).wait(timeout=300) == 0, log.read_text()[-3000:]
    assert "MEMBER: 2/2" in log.read_text()  # Lightning really started two processes
    assert_same_lens(load_lens(config(args).run_dir), one, atol=1e-5)
