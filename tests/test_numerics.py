"""A NaN/inf loss stops the run naming layer and step, or skips the update; no NaN lens is ever written."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lens.artifacts.registry import load_lens, save_lens
from lens.training.checkpointing import AtomicCheckpointIO, last_checkpoint
from lens.training.guards import NonFiniteLossError
from lens.training.module import TunedLensModule
from lens.core.translators import TunedLens
from tiny_run import config, overrides, train_in_process, write_tiny_inputs

pytestmark = pytest.mark.usefixtures("one_thread")

START = ("lens.init=lstsq", "lens.lstsq_sequences=8")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    return write_tiny_inputs(tmp_path_factory.mktemp("inputs"))


def nan_loss_at(monkeypatch, layer: int, steps: set[int] | None) -> None:
    """Make the training loss of ``layer`` NaN at ``steps`` (every step when None)."""
    original = TunedLensModule.part_losses

    def part_losses(self, input_ids):
        losses = original(self, input_ids)
        if self.training and (steps is None or self.global_step in steps):
            losses = torch.where(torch.arange(len(losses)) == layer, torch.nan, losses)
        return losses

    monkeypatch.setattr(TunedLensModule, "part_losses", part_losses)


def test_nan_loss_stops_naming_layer_and_step(inputs, tmp_path, monkeypatch):
    nan_loss_at(monkeypatch, layer=1, steps={3})
    args = overrides(inputs, tmp_path, "stop", "optim.num_steps=6")
    with pytest.raises(NonFiniteLossError, match=r"step 3: kl_layer \[1\]"):
        train_in_process(args)
    run_dir = config(args).run_dir
    assert not (run_dir / "lens.safetensors").exists()
    ckpt = torch.load(last_checkpoint(run_dir), weights_only=True)
    assert ckpt["global_step"] == 3 and torch.isfinite(ckpt["state_dict"]["trainable.weight"]).all()


def test_skip_mode_leaves_the_weights_untouched(inputs, tmp_path, monkeypatch, caplog):
    start = train_in_process(overrides(inputs, tmp_path, "start", *START, "optim.num_steps=0"))
    nan_loss_at(monkeypatch, layer=2, steps=None)
    with caplog.at_level(logging.WARNING, logger="lens.training.guards"):
        skipped = train_in_process(overrides(inputs, tmp_path, "skip", *START, "optim.num_steps=3", "optim.weight_decay=0.001",
                                             "trainer.on_nonfinite=skip"))
    # SGD's weight decay alone would have moved them, had any update been applied
    assert torch.equal(skipped.weight, start.weight) and torch.equal(skipped.bias, start.bias)
    assert sum("step 2: kl_layer [2]" in r.getMessage() for r in caplog.records) == 1


def test_unknown_mode_is_an_error(inputs, tmp_path):
    with pytest.raises(ValueError, match="on_nonfinite"):
        train_in_process(overrides(inputs, tmp_path, "bad", "trainer.on_nonfinite=ignore"))


def test_nan_never_reaches_disk(tmp_path):
    with pytest.raises(ValueError, match="NaN"):
        AtomicCheckpointIO().save_checkpoint({"state_dict": {"trainable.weight": torch.tensor([torch.nan])}}, tmp_path / "c.ckpt")
    assert not (tmp_path / "c.ckpt").exists()
    lens = TunedLens(2, 4)
    with torch.no_grad():
        lens.bias[1, 2] = torch.inf
    with pytest.raises(ValueError, match="NaN or inf"):
        save_lens(lens, tmp_path / "lens")
    save_lens(TunedLens(2, 4), tmp_path / "lens")  # a lens whose file was damaged afterwards
    save_file({"weight": torch.full((2, 4, 4), torch.nan), "bias": torch.zeros(2, 4)}, str(tmp_path / "lens" / "lens.safetensors"))
    with pytest.raises(ValueError, match="NaN or inf"):
        load_lens(tmp_path / "lens")
