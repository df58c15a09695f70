"""eval/learning_curves.py's published arm: a run stopped after a read resumes to the same lens."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from conftest import make_model
from lens.config import TrainConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval"))
import learning_curves as lc  # noqa: E402


def tiny_arm(tmp_path: Path, name: str):
    model = make_model("llama")
    torch.manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (24, 16))
    data = SimpleNamespace(train_dataloader=lambda: DataLoader(TensorDataset(ids), batch_size=2, shuffle=True))
    cfg = TrainConfig()
    cfg = replace(cfg, data=replace(cfg.data, batch_size=2, seq_len=16))
    out = tmp_path / name
    out.mkdir()
    curves = lc.Curves(out, lc.HeldOut.capture(model, ids[:4], 2))
    return model, data, cfg, curves, out


def test_published_arm_resumes_to_the_same_lens(tmp_path):
    model, data, cfg, whole, out = tiny_arm(tmp_path, "whole")
    lc.published_arm(model, data, cfg, whole, 6, [3, 6], out)

    model, data, cfg, stopped, out = tiny_arm(tmp_path, "stopped")
    lc.published_arm(model, data, cfg, stopped, 6, [3], out)  # reads step 3, saves its state there
    saved = out / "published_state.safetensors"
    assert saved.exists()
    state = saved.read_bytes()
    first = {p["label"]: p for p in stopped.record["points"]}
    lc.published_arm(model, data, cfg, stopped, 6, [3, 6], out)  # step 3 is recorded: resumes from it
    resumed = {p["label"]: p for p in stopped.record["points"]}
    assert resumed["step3"] == first["step3"]  # not re-run
    reference = {p["label"]: p for p in whole.record["points"]}
    assert resumed["step6"]["kl"] == reference["step6"]["kl"]
    assert resumed["step6"]["mean_kl"] < reference["step0"]["mean_kl"]  # it trained
    assert saved.read_bytes() != state  # and saved its state at step 6

    model, data, cfg, other, out = tiny_arm(tmp_path, "other")
    lc.published_arm(model, data, cfg, other, 6, [3], out)
    restarted = lc.Curves(out, other.held_out)
    restarted.record["points"] = [p for p in restarted.record["points"] if p["label"] == "step0"]
    lc.published_arm(model, data, cfg, restarted, 8, [3], out)  # another schedule length: not resumed
    assert restarted.done("published", "step3")  # re-read: a resumed run would start after step 3
    assert next(p for p in restarted.record["points"] if p["label"] == "step3")["schedule_steps"] == 8


def test_published_reads_outside_the_run_are_refused_before_a_model_loads(capsys):
    with pytest.raises(SystemExit) as exit_info:
        lc.main(["--published-steps", "128", "--published-reads", "8,300"])
    assert exit_info.value.code == 2
    assert "--published-reads '8,300'" in capsys.readouterr().err
