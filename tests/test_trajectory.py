"""Prediction trajectories: statistics and divergences against direct formulas, prediction depth."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import assert_rank, assert_top_k, make_model, random_lens

from lens.artifacts.registry import save_lens
from lens.cli import main as lens_cli
from lens.core.translators import LogitLens, TunedLens, Unembed
from lens.analysis.trajectory import (
    STATS,
    compare_readings,
    depth_histogram,
    divergences,
    prediction_depth,
    read_text,
    read_trajectory,
)

LN2 = math.log(2)


def direct(p: list[float], q: list[float]) -> tuple[float, float, float]:
    """KL, JS and TV written out term by term, with 0 log 0 = 0."""
    kl = sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)
    m = [(a + b) / 2 for a, b in zip(p, q)]
    js = 0.5 * sum(a * math.log(a / c) for a, c in zip(p, m) if a > 0) + 0.5 * sum(
        b * math.log(b / c) for b, c in zip(q, m) if b > 0
    )
    tv = 0.5 * sum(abs(a - b) for a, b in zip(p, q))
    return kl, js, tv


def test_divergences_match_direct_formulas():
    torch.manual_seed(0)
    p = torch.rand(20, 7, dtype=torch.float64) ** 3
    q = torch.rand(20, 7, dtype=torch.float64) ** 3
    p[:5, 2] = 0.0  # exact zeros in p only: KL stays finite
    p, q = p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)
    got = divergences(p.log(), q.log())
    for row in range(20):
        kl, js, tv = direct(p[row].tolist(), q[row].tolist())
        assert got["kl"][row].item() == pytest.approx(kl, rel=1e-9, abs=1e-12)
        assert got["js"][row].item() == pytest.approx(js, rel=1e-9, abs=1e-12)
        assert got["tv"][row].item() == pytest.approx(tv, rel=1e-9, abs=1e-12)
    assert (got["js"] <= LN2).all() and (got["tv"] <= 1).all() and (got["kl"] >= 0).all()
    swapped = divergences(q.log(), p.log())
    torch.testing.assert_close(swapped["js"], got["js"])  # JS and TV are symmetric, KL is not
    torch.testing.assert_close(swapped["tv"], got["tv"])
    assert not torch.allclose(swapped["kl"], got["kl"])


def test_divergence_bounds_are_reached_and_zero_on_equal():
    p = torch.tensor([[0.5, 0.5, 0.0, 0.0]])
    q = torch.tensor([[0.0, 0.0, 0.25, 0.75]])
    disjoint = divergences(p.log(), q.log())
    assert disjoint["js"].item() == pytest.approx(LN2, rel=1e-6, abs=1e-7)
    assert disjoint["tv"].item() == pytest.approx(1.0)
    assert disjoint["kl"].item() == math.inf
    same = divergences(q.log(), q.log())  # exactly 0 by construction, whatever the platform's log/exp
    assert same["js"].item() == 0 and same["tv"].item() == 0 and same["kl"].item() == 0
    torch.manual_seed(1)
    wide = torch.randn(6, 301).log_softmax(-1)
    assert (divergences(wide, wide.clone())["js"] == 0).all()


def test_prediction_depth_on_constructed_case():
    final = torch.tensor([7, 7, 7, 7])
    top1 = torch.tensor(
        [  # layer x token; the last row is the final layer
            [7, 1, 7, 1],
            [7, 1, 7, 1],
            [7, 7, 1, 1],
            [7, 7, 7, 1],
            [7, 7, 7, 7],
        ]
    )
    depths = prediction_depth(top1, final)
    assert depths.tolist() == [0, 2, 3, 4]  # token 2 matches early, leaves at layer 2, settles at 3
    assert depth_histogram(depths, n_layers=4).tolist() == [1, 0, 1, 1, 1]
    top1[-1, 0] = 3  # the final row counts as a match by definition
    assert prediction_depth(top1, final)[0].item() == 0


@pytest.fixture
def tuned_setup(tokenizer):
    model = make_model("llama")
    lens = random_lens(model, seed=3, bias_std=0.3)
    ids, reading = read_text(model, tokenizer, "The quick brown fox jumps over the lazy dog. A lens")
    return model, lens, ids, reading


def test_trajectory_statistics_match_direct_formulas(tuned_setup):
    model, lens, ids, reading = tuned_setup
    residuals, logits = reading.residuals, reading.final_logits
    unembed = Unembed(model)
    traj = read_trajectory(lens, unembed, ids, reading, top_k=4, chunk=5)  # chunk < T on purpose
    assert set(traj.stats) == set(STATS)
    n_rows, n_tok = residuals.shape[:2]
    log_final = logits.double().log_softmax(-1)  # [T, V]
    final_top = logits.argmax(-1)
    for layer in range(n_rows):
        with torch.no_grad():
            log_q = unembed(lens.translate_layer(residuals[layer], layer)).double().log_softmax(-1)  # [T, V]
        q = log_q.exp()
        for t in range(n_tok):
            row = {name: traj.stats[name][layer, t].item() for name in STATS}
            assert row["entropy"] == pytest.approx(-(q[t] * log_q[t]).sum().item(), rel=1e-4, abs=1e-6)
            assert row["kl"] == pytest.approx((log_final[t].exp() * (log_final[t] - log_q[t])).sum().item(), rel=1e-3, abs=1e-5)
            assert row["max_prob"] == pytest.approx(q[t].max().item(), rel=1e-5, abs=1e-7)
            assert_rank(row["final_top_rank"], log_q[t], final_top[t])
            if t + 1 < n_tok:
                nxt = ids[t + 1]
                assert row["ce"] == pytest.approx(-log_q[t, nxt].item(), rel=1e-5, abs=1e-6)
                assert_rank(row["target_rank"], log_q[t], nxt)
            else:
                assert math.isnan(row["ce"]) and math.isnan(row["target_rank"])
            assert_top_k(traj.top_ids[layer, t], log_q[t])
    # the final row is the model itself: its own top token ranks first, its KL to itself is exactly 0
    assert (traj.stats["final_top_rank"][-1] == 0).all() and (traj.stats["kl"][-1] == 0).all()
    expected_depth = [
        next(l for l in range(n_rows) if all(traj.top_ids[m, t, 0] == traj.top_ids[-1, t, 0] for m in range(l, n_rows)))
        for t in range(n_tok)
    ]
    assert traj.depth.tolist() == expected_depth


def test_compare_readings_matches_full_distributions(tuned_setup):
    model, lens, _, reading = tuned_setup
    residuals = reading.residuals
    unembed = Unembed(model)
    logit = LogitLens(lens.n_layers, lens.d_model)
    got = compare_readings(unembed, lens, residuals, logit, residuals, chunk=4)
    for layer in (0, lens.n_layers - 1):
        with torch.no_grad():
            log_p = unembed(lens.translate_layer(residuals[layer], layer)).double().log_softmax(-1)
            log_q = unembed(residuals[layer]).double().log_softmax(-1)
        for t in (0, 7):
            kl, js, tv = direct(log_p[t].exp().tolist(), log_q[t].exp().tolist())
            assert got["kl"][layer, t].item() == pytest.approx(kl, rel=1e-3, abs=1e-6)
            assert got["js"][layer, t].item() == pytest.approx(js, rel=1e-3, abs=1e-6)
            assert got["tv"][layer, t].item() == pytest.approx(tv, rel=1e-3, abs=1e-6)
    assert got["js"][-1].abs().max() < 1e-6  # the final layer is read the same way by both lenses
    assert got["js"].max() <= LN2 and got["tv"].max() <= 1
    with pytest.raises(ValueError, match="same layers and tokens"):
        compare_readings(unembed, lens, residuals, logit, residuals[:, :3])


def test_trajectory_command_writes_json_and_figures(tmp_path, tokenizer, capsys):
    model = make_model("gpt2")
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    lens = TunedLens.for_model(model)
    with torch.no_grad():
        lens.bias.normal_(0, 0.5)
    save_lens(lens, tmp_path / "lens")
    common = [f"model.name={tmp_path / 'model'}", f"output_dir={tmp_path}"]
    out = tmp_path / "out"
    lens_cli(["trajectory", "The quick brown fox", *common, f"lens={tmp_path / 'lens'}", "run_name=out"])
    result = json.loads((out / "trajectory.json").read_text())
    n_tok = len(result["tokens"])
    assert result["lens"] == "tuned" and len(result["stats"]["entropy"]) == model.config.n_layer + 1
    assert len(result["stats"]["ce"][0]) == n_tok and result["stats"]["ce"][0][-1] is None
    assert len(result["prediction_depth"]) == n_tok and len(result["top_tokens"][0][0]) == 5
    assert max(max(row) for row in result["vs_logit_lens"]["js"]) <= LN2
    for name in ("trajectory.png", "trajectory.html", "trajectory_js.png"):
        assert (out / name).stat().st_size > 0
    # no lens given and none trained for this model: the logit lens, and no comparison
    lens_cli(["trajectory", *common, "run_name=o2"])
    assert json.loads((tmp_path / "o2" / "trajectory.json").read_text())["lens"] == "logit"
    assert not (tmp_path / "o2" / "trajectory_js.png").exists()
    # a lens that was asked for must exist: no silent fallback to the logit lens
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        lens_cli(["trajectory", *common, f"lens={tmp_path / 'absent'}", "run_name=o3"])
    assert exit_.value.code == 2 and "absent': no such folder" in capsys.readouterr().err
    assert not (tmp_path / "o3").exists()
