"""A run stopped at any step (or killed at a random moment) and resumed ends with the bit-identical
lens an uninterrupted run makes; checkpoints hold translators only and are never left half-written."""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch

from lens.artifacts.files import atomic_path
from lens.artifacts.registry import load_lens, save_lens
from lens.core.model import load_model
from lens.training.lens_run import train
from lens.training.checkpointing import AtomicCheckpointIO, last_checkpoint
from lens.core.translators import TunedLens
from tiny_run import assert_same_lens, config, overrides, train_in_process, train_py, write_tiny_inputs

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 24
# lstsq start, random positions and validation mid-run: everything resuming has to get right
RUN = (f"optim.num_steps={STEPS}", "lens.init=lstsq", "lens.lstsq_sequences=8", "lens.positions_per_layer=16")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    return write_tiny_inputs(tmp_path_factory.mktemp("inputs"))


def checkpoint_step(path: Path) -> int:
    try:
        return torch.load(path, weights_only=True)["global_step"]
    except FileNotFoundError:
        return -1


def test_sigkilled_run_resumes_to_the_uninterrupted_lens(inputs, tmp_path):
    reference = train_in_process(overrides(inputs, tmp_path, "reference", *RUN))

    seed = random.randrange(10**6)
    rng = random.Random(seed)
    kill_after = rng.randrange(3, STEPS // 2)
    args = overrides(inputs, tmp_path, "killed", *RUN)
    ckpt = last_checkpoint(config(args).run_dir)
    proc = train_py(args, tmp_path / "first.log")
    deadline = time.monotonic() + 120
    while checkpoint_step(ckpt) < kill_after and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(rng.uniform(0, 0.05))  # anywhere in the next step, its checkpoint write included
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first_log = (tmp_path / "first.log").read_text()
    assert proc.returncode == -signal.SIGKILL, f"(seed {seed}) run ended before the kill:\n{first_log[-3000:]}"
    assert not (config(args).run_dir / "lens.safetensors").exists()
    killed_at = checkpoint_step(ckpt)
    assert 0 < killed_at < STEPS, f"(seed {seed}) checkpoint after the kill is at step {killed_at}"

    resumed = train_py([*args, "resume=true"], tmp_path / "second.log")
    assert resumed.wait(timeout=180) == 0, (tmp_path / "second.log").read_text()[-3000:]
    assert "starting from scratch" not in (tmp_path / "second.log").read_text()
    assert_same_lens(load_lens(config(args).run_dir), reference, atol=0)
    assert checkpoint_step(ckpt) == STEPS


class Crash(Exception):
    """Stands in for a kill: the run stops here, leaving on disk what a killed run leaves."""


EXACT_STEPS = 6
EXACT = (f"optim.num_steps={EXACT_STEPS}", "trainer.val_every_n_steps=3", *RUN[1:])
CRASH_POINTS = [("after checkpoint", k) for k in range(1, EXACT_STEPS)] + [("in validation", 3)]


@pytest.fixture(scope="module")
def uninterrupted(inputs, tmp_path_factory) -> TunedLens:
    return train_in_process(overrides(inputs, tmp_path_factory.mktemp("reference"), "reference", *EXACT))


@pytest.mark.parametrize("where, step", CRASH_POINTS, ids=[f"{w} {k}" for w, k in CRASH_POINTS])
def test_a_run_stopped_at_any_step_resumes_to_the_bit_identical_lens(inputs, tmp_path, monkeypatch, uninterrupted, where, step):
    """Every step of a short run, validation steps (random positions drawn there too) included."""
    from lens.training.module import TunedLensModule

    if where == "after checkpoint":
        save = AtomicCheckpointIO.save_checkpoint

        def save_then_crash(self, checkpoint, path, storage_options=None):
            save(self, checkpoint, path, storage_options)
            if checkpoint["global_step"] == step:
                raise Crash

        monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", save_then_crash)
    else:
        validate = TunedLensModule.validation_step

        def validate_then_crash(self, batch, batch_idx):
            validate(self, batch, batch_idx)
            if self.global_step == step:
                raise Crash

        monkeypatch.setattr(TunedLensModule, "validation_step", validate_then_crash)
    args = overrides(inputs, tmp_path, "stopped", *EXACT)
    with pytest.raises(Crash):
        train_in_process(args)
    assert checkpoint_step(last_checkpoint(config(args).run_dir)) == step
    monkeypatch.undo()
    assert_same_lens(train_in_process([*args, "resume=true"]), uninterrupted, atol=0)


def test_a_resumed_run_records_the_time_of_every_segment(inputs, tmp_path, monkeypatch):
    """``train_seconds`` (the learning curves' time axis) counts the segments before the resume too."""
    save = AtomicCheckpointIO.save_checkpoint

    def save_then_crash(self, checkpoint, path, storage_options=None):
        save(self, checkpoint, path, storage_options)
        if checkpoint["global_step"] == 2:
            raise Crash

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", save_then_crash)
    args = overrides(inputs, tmp_path, "clocked", "optim.num_steps=4", "trainer.checkpoint_every_n_steps=2")
    with pytest.raises(Crash):
        train_in_process(args)
    monkeypatch.undo()
    ckpt_path = last_checkpoint(config(args).run_dir)
    ckpt = torch.load(ckpt_path, weights_only=True)
    assert 0 < ckpt["callbacks"]["RunClock"]["seconds"] < 120
    ckpt["callbacks"]["RunClock"]["seconds"] = 1000.0  # as if the first segment had taken 1000 s
    torch.save(ckpt, ckpt_path)
    started = time.perf_counter()
    train(config([*args, "resume=true"]))
    second = time.perf_counter() - started
    recorded = json.loads((config(args).run_dir / "config.json").read_text())["details"]["train_seconds"]
    assert 1000.0 < recorded < 1000.0 + second


def test_checkpoint_holds_translators_not_the_base_model(inputs, tmp_path):
    args = overrides(inputs, tmp_path, "small", "optim.num_steps=2")
    train_in_process(args)
    ckpt = torch.load(last_checkpoint(config(args).run_dir), weights_only=True)
    assert set(ckpt["state_dict"]) == {"trainable.weight", "trainable.bias"}
    assert ckpt["optimizer_states"] and ckpt["lr_schedulers"]
    assert ckpt["LensDataModule"] == {"batches_done": 2}
    assert {"RngState", "ResumeGuard", "RunClock"} <= set(ckpt["callbacks"])
    base_model, _ = load_model(str(inputs / "model"))
    base_bytes = sum(p.numel() * p.element_size() for p in base_model.parameters())
    assert last_checkpoint(config(args).run_dir).stat().st_size < base_bytes / 4


def test_resume_under_changed_settings_is_refused(inputs, tmp_path):
    args = overrides(inputs, tmp_path, "changed", "optim.num_steps=2")
    train_in_process(args)
    with pytest.raises(ValueError, match="optim.*lr_scale"):
        train_in_process([*args, "optim.lr_scale=2", "resume=true"])
    longer = train_in_process([*args, "optim.num_steps=4", "resume=true"])  # training further is allowed
    assert torch.isfinite(longer.weight).all()
    assert checkpoint_step(last_checkpoint(config(args).run_dir)) == 4


def test_resume_path_that_does_not_exist_is_an_error(inputs, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        train(config(overrides(inputs, tmp_path, "x", f"resume_from={tmp_path / 'nope.ckpt'}")))


def killed_while_writing(write) -> None:
    """Run ``write`` in a forked child that SIGKILLs itself halfway through; wait for it."""
    pid = os.fork()
    if pid == 0:  # child: never returns
        try:
            write()
        finally:
            os._exit(1)  # only reached if the write did not kill us
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def die(*_args, **_kwargs) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def test_kill_during_any_atomic_write_keeps_the_old_file(tmp_path):
    final = tmp_path / "eval.json"
    final.write_text('{"old": true}')

    def write() -> None:
        with atomic_path(final) as tmp:
            tmp.write_text('{"new": tr')
            die()

    killed_while_writing(write)
    assert final.read_text() == '{"old": true}'


def test_kill_during_lens_save_keeps_the_old_lens(tmp_path, monkeypatch):
    old = TunedLens(2, 4)
    with torch.no_grad():
        old.bias.fill_(1.0)
    save_lens(old, tmp_path)

    def half_then_die(fd: int) -> None:  # the new weights are written, not yet renamed into place
        os.ftruncate(fd, os.fstat(fd).st_size // 2)
        die()

    monkeypatch.setattr("lens.artifacts.files.os.fsync", half_then_die)
    killed_while_writing(lambda: save_lens(TunedLens(2, 4), tmp_path))
    assert_same_lens(load_lens(tmp_path), old, atol=0)


def test_kill_during_checkpoint_save_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, path)

    def half_then_die(fd: int) -> None:  # the new checkpoint is half on disk, not yet renamed into place
        os.ftruncate(fd, os.fstat(fd).st_size // 2)
        die()

    monkeypatch.setattr("lens.artifacts.files.os.fsync", half_then_die)
    killed_while_writing(lambda: AtomicCheckpointIO().save_checkpoint({"state_dict": {}, "global_step": 2}, path))
    assert torch.load(path, weights_only=True)["global_step"] == 1
