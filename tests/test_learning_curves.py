"""eval/learning_curves.py: the published arm resumes to the same lens; the converged-KL extrapolation."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from conftest import make_model
from lens.artifacts.registry import save_lens
from lens.config import TrainConfig, to_dict

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


def test_power_law_fit_recovers_the_floor_of_a_known_curve():
    steps = [80, 160, 320, 640, 1280, 2560]
    kl = [1.25 + 0.9 * s ** -0.4 for s in steps]
    floor, scale, alpha = lc.power_law_fit(steps, kl)
    assert floor == pytest.approx(1.25, abs=0.01) and alpha == pytest.approx(0.4, abs=0.03)
    assert scale == pytest.approx(0.9, rel=0.1)


def test_converged_estimate_uses_the_full_closed_form_budgets_only():
    def point(cf: int, steps: int, kl: float) -> dict:
        return {"arm": "default", "cf_sequences": cf, "kl_steps": steps, "mean_kl": kl}

    curve = [point(1408, s, 1.2 + 2.0 * s ** -0.5) for s in (80, 320, 640, 1280, 2560)]
    other = [point(64, 20, 9.0), point(256, 80, 7.0), {"arm": "published", "kl_steps": 128, "mean_kl": 3.0}]
    est = lc.converged_estimate({"points": other + curve})
    assert est["kl_steps"] == [80, 320, 640, 1280, 2560]
    assert est["floor"] == pytest.approx(1.2, abs=0.01)
    lo, hi = est["floor_range"]
    assert lo <= est["floor"] + 1e-9 and hi >= est["floor"] - 1e-9 and hi - lo < 0.05
    assert lc.converged_estimate({"points": other + curve[:3]}) is None  # 3 points cannot check a 3-parameter fit
    assert lc.converged_estimate({"points": other + curve[:4]})["floor_range"] is None
    turned = lc.converged_estimate({"points": curve[:4] + [point(1408, 2560, 1.5)]})
    assert turned["rises_at"] == 2560 and turned["best"] == (1280, curve[3]["mean_kl"]) and "floor" not in turned


def test_points_record_their_scoring_precision_and_the_table_marks_float32(tmp_path):
    model, _, _, curves, out = tiny_arm(tmp_path, "precision")
    lens = lc.TunedLens.for_model(model)
    with torch.no_grad():
        lens.weight.normal_(std=0.05)
    curves.add("closed_form", "bf16", lens, 10, (1.0, None))
    exact = lc.Curves(out, curves.held_out, "float32")
    exact.add("closed_form", "f32", lens, 20, (2.0, None))
    points = {p["label"]: p for p in exact.record["points"]}
    assert points["bf16"]["score_dtype"] == "bfloat16" and points["f32"]["score_dtype"] == "float32"
    assert points["f32"]["kl"] == curves.held_out.score(lens, matmul_dtype=None)["kl"]
    assert points["f32"]["kl"] != points["bf16"]["kl"]  # the precision is not a label only
    rows = lc.table(exact.record).splitlines()
    assert "| f32 † |" in rows[3] and "| bf16 |" in rows[2] and rows[-1].startswith("† scored with float32")


def test_an_added_run_takes_its_recorded_or_given_seconds_and_another_cpus_time_is_marked(tmp_path):
    model, _, cfg, curves, out = tiny_arm(tmp_path, "added")
    cfg = replace(cfg, lens=replace(cfg.lens, lstsq_sequences=8), optim=replace(cfg.optim, num_steps=4))
    save_lens(lc.TunedLens.for_model(model), out / "run", model, to_dict(cfg), train_seconds=5.0)
    lc.add_run(curves, out / "run", model)
    assert [(p["label"], p["wall_s"], p["tokens"]) for p in curves.record["points"]] == [("cf8+kl4", 5.0, (8 + 4 * 2) * 16)]
    lc.add_run(curves, out / "run", model, train_seconds=123.0)  # a run whose config.json holds its last segment only
    (point,) = curves.record["points"]
    assert point["wall_s"] == 123.0 and point["timed_on"] == lc.cpu_name() == curves.record["timed_on"]
    assert "‡" not in lc.table(curves.record)
    curves.record["timed_on"] = "the study's first CPU"  # the record's other points were timed elsewhere
    rows = lc.table(curves.record).splitlines()
    assert "| 123 (-) ‡ |" in rows[2] and rows[-1] == f"‡ timed on {lc.cpu_name()}; the others on the study's first CPU"


def test_an_added_run_joins_the_arm_of_its_optimizer_and_weight_decay(tmp_path):
    model, _, cfg, curves, out = tiny_arm(tmp_path, "arms")
    for optimizer, wd in (("sgd", 0.0), ("adam", 0.0), ("sgd", 1e-3), ("adam", 1e-3)):
        run = out / f"{optimizer}{wd}"
        save_lens(lc.TunedLens.for_model(model), run, model, to_dict(replace(cfg, optim=replace(cfg.optim, optimizer=optimizer, weight_decay=wd))), train_seconds=1.0)
        lc.add_run(curves, run, model)
    assert [(p["arm"], p["optimizer"]) for p in curves.record["points"]] == [
        ("default", "sgd"), ("default_adam", "adam"), ("default_wd0.001", "sgd"), ("default_adam_wd0.001", "adam")]
    assert lc.default_arms(curves.record) == ["default", "default_adam", "default_adam_wd0.001", "default_wd0.001"]


def test_train_seconds_without_add_run_is_refused(capsys):
    with pytest.raises(SystemExit):
        lc.main(["--train-seconds", "10"])
    assert "--train-seconds only applies to --add-run" in capsys.readouterr().err
