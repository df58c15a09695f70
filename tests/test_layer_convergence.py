"""eval/layer_convergence.py: a layer trained alone is the layer the full lens would train, from the same start."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import torch

from conftest import make_model
from lens.config import TrainConfig
from lens.core.closed_form import closed_form_start
from lens.core.translators import TunedLens, Unembed

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval"))
import layer_convergence as lcv  # noqa: E402
from learning_curves import HeldOut  # noqa: E402


def tiny_setup(grad_clip: float):
    model = make_model("llama")
    torch.manual_seed(2)
    ids = torch.randint(0, model.config.vocab_size, (20, 16))  # 16 to train on, 4 held out
    cfg = TrainConfig()
    cfg = replace(cfg, data=replace(cfg.data, batch_size=2, seq_len=16),
                  lens=replace(cfg.lens, lstsq_sequences=12, positions_per_layer=8),
                  optim=replace(cfg.optim, optimizer="adam", lr_scale=10.0, grad_clip=grad_clip))
    return model, ids, cfg


def test_closed_form_of_the_cached_layers_is_the_full_lens_closed_form():
    model, ids, cfg = tiny_setup(0.0)
    layers = [0, 2]
    cache, stats = lcv.cache_training_residuals(model, ids[:16], layers, cfg.lens.lstsq_sequences, batch=4)
    assert cache.shape == (3, 16, 16, model.config.hidden_size)
    subset = TunedLens(len(layers), model.config.hidden_size)
    stats.apply_to(subset, cfg.lens.ridge)
    full = TunedLens.for_model(model)
    closed_form_start(model, full, ids[:12], 4, cfg.lens.ridge)  # the first lstsq_sequences only
    torch.testing.assert_close(subset.weight, full.weight[layers], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(subset.bias, full.bias[layers], rtol=1e-4, atol=1e-4)


def test_a_layer_alone_trains_as_inside_the_full_lens_and_lowers_held_out_kl():
    model, ids, cfg = tiny_setup(0.0)  # the clip couples layers (it scales by the total norm): off here
    n_layers, unembed = model.config.num_hidden_layers, Unembed(model)
    cache, stats = lcv.cache_training_residuals(model, ids[:16], list(range(n_layers)), cfg.lens.lstsq_sequences, batch=4)
    start = TunedLens.for_model(model)
    stats.apply_to(start, cfg.lens.ridge)
    together, _ = lcv.train_translators(list(cache), start, unembed, cfg, steps=30)
    layer = 1
    alone_start = TunedLens(1, start.d_model)
    alone_start.load_state_dict({"weight": start.weight[layer : layer + 1], "bias": start.bias[layer : layer + 1]})
    alone, _ = lcv.train_translators([cache[layer], cache[-1]], alone_start, unembed, cfg, steps=30)
    moved = (together.weight[layer] - start.weight[layer]).detach().abs().max()
    assert moved > 1e-3  # it trained
    torch.testing.assert_close(alone.weight[0], together.weight[layer], rtol=0, atol=float(moved) * 1e-3)
    torch.testing.assert_close(alone.bias[0], together.bias[layer], rtol=0, atol=1e-4)

    held_out = HeldOut.capture(model, ids[16:], 4)
    scored = HeldOut(held_out.residuals[[layer, n_layers]], held_out.targets, unembed)
    assert scored.score(alone, matmul_dtype=None)["kl"][0] < scored.score(alone_start, matmul_dtype=None)["kl"][0]


def test_table_compares_with_the_full_runs_and_gives_the_change_per_doubling():
    record = {"arm": "default_adam", "points": [
        {"layer": 3, "kl_steps": 0, "kl": 2.0, "train_s": 0.0},
        {"layer": 3, "kl_steps": 100, "kl": 1.0, "train_s": 10.0},
        {"layer": 3, "kl_steps": 400, "kl": 0.81, "train_s": 40.0},
    ]}
    curves = {"points": [{"arm": "default_adam", "kl_steps": 100, "kl": [0, 0, 0, 1.05]},
                         {"arm": "default", "kl_steps": 400, "kl": [0, 0, 0, 9.0]}]}
    rows = lcv.table(record, curves).splitlines()
    assert rows[3] == "| 3 | 100 | 1.0000 |  | 1.0500 | 10 |"  # no change from the start (0 steps is no doubling)
    assert rows[4] == "| 3 | 400 | 0.8100 | -10.0% |  | 40 |"  # 0.9 per doubling; the SGD arm's 400 is not this arm


def test_table_extrapolates_a_layer_with_four_budgets():
    steps = [100, 200, 400, 800]
    record = {"arm": "default_adam", "points": [
        {"layer": 0, "kl_steps": s, "kl": 0.5 + 2.0 * s**-0.3, "train_s": 1.0} for s in steps]}
    fit = lcv.table(record, {"points": []}).splitlines()[-1]
    assert fit.startswith("layer 0: KL ~ 0.500 + 2.000 * steps^-0.300 through 4 budgets")
    record["points"].pop()
    assert "converged estimate" not in lcv.table(record, {"points": []})
