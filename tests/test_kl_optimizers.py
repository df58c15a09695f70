"""eval/kl_optimizers.py: every spec sees the same batches from the same start, and its reads are real scores."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from conftest import make_model
from lens.analysis.evaluate import evaluate_lenses
from lens.config import LensConfig
from lens.core.closed_form import closed_form_start
from lens.core.translators import TunedLens
from lens.training.module import TunedLensModule

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval"))
import kl_optimizers as ko  # noqa: E402


def test_specs_share_batches_and_adam_improves_on_the_closed_form():
    model = make_model("llama")
    torch.manual_seed(2)
    ids = torch.randint(0, model.config.vocab_size, (32, 16))
    train, held_out = ids[:24], ids[24:]
    lens0 = TunedLens.for_model(model)
    closed_form_start(model, lens0, train[:4], 2, 1e-3)  # a deliberately poor start: 4 sequences

    def score(lens: TunedLens) -> float:
        return evaluate_lenses(model, {"l": lens}, held_out, 4, progress=False).lenses["l"].mean_kl

    cfg = LensConfig(positions_per_layer=8)
    first = ko.run_spec(model, cfg, lens0, "adam:adam:3:0:8", train, 2, score)
    again = ko.run_spec(model, cfg, lens0, "adam:adam:3:0:8", train, 2, score)
    assert sorted(first["mean_kl"]) == [2, 4, 8] and first["mean_kl"] == again["mean_kl"]  # same batches, same positions
    assert first["mean_kl"][8] < score(lens0)  # the spec trained a copy: the start is untouched and worse
    sgd = ko.run_spec(model, cfg, lens0, "sgd:sgd:1:1:8", train, 2, score)
    assert sgd["mean_kl"][8] != first["mean_kl"][8]

    probe = TunedLens.for_model(model)
    probe.load_state_dict(lens0.state_dict())
    rows = ko.gradient_norms(TunedLensModule(model, probe, cfg, ko.OptimConfig()), train, 2, 2)
    assert len(rows) == 3 and all(abs(r["total"] - torch.tensor(r["per_layer"]).norm().item()) < 1e-4 for r in rows[:2])
    assert rows[0]["total"] > 0
    assert probe.weight.grad is None  # cleared after: the measurement leaves nothing for an optimizer to apply
    assert len(rows[2]["weight_norm_per_layer"]) == lens0.n_layers


def test_a_bad_spec_is_refused_before_any_model_loads(capsys):
    for specs, says in (("adam:1:80", "name:optimizer:lr_scale:grad_clip:steps"), ("a:adamw:1:0:80", "optimizer one of sgd, adam"),
                        ("a:sgd:1:0:2", "steps >= 4"), ("a:sgd:1:1:8,a:adam:1:0:8", "give each spec its own name")):
        with pytest.raises(SystemExit):
            ko.main(["--specs", specs, "--config", "configs/does-not-exist.yaml"])  # the config is never read
        assert says in capsys.readouterr().err
