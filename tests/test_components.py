"""Block sites from the architecture table: they add up to the block, they are what the model
uses (overwriting one changes the output exactly as the hand-made equivalent), hooks go away."""

from __future__ import annotations

import pytest
import torch

from conftest import make_model
from lens.config import InputError
from lens.core.arch import get_component
from lens.core.components import SITES, edit_site, n_heads, out_in_weight, record_sites
from lens.core.residuals import capture_residuals
from lens.interventions import Ablation, hook_count

TEXT = "Packages are installed with apt and removed with apt purge."


def ids_of(tokenizer) -> torch.Tensor:
    return tokenizer(TEXT, return_tensors="pt").input_ids


def sequential_neox():
    model = make_model("gpt_neox")
    for block in model.gpt_neox.layers:
        block.use_parallel_residual = False
    return model


@pytest.mark.parametrize("build", ["gpt2", "gpt_neox", "llama", "neox_sequential"])
def test_attention_plus_mlp_plus_incoming_residual_is_the_block(build, tokenizer):
    model = sequential_neox() if build == "neox_sequential" else make_model(build)
    ids = ids_of(tokenizer)
    with torch.no_grad(), record_sites(model, SITES) as store:
        residuals, _ = capture_residuals(model, ids)
    n = len(residuals) - 1
    assert all(len(store[site]) == n for site in SITES)
    for block in range(n):
        torch.testing.assert_close(store["block_in"][block], residuals[block], rtol=0, atol=0)
        torch.testing.assert_close(store["block_out"][block], residuals[block + 1], rtol=0, atol=0)
        summed = store["block_in"][block] + store["attention"][block] + store["mlp"][block]
        torch.testing.assert_close(summed, store["block_out"][block], rtol=1e-5, atol=1e-5)
        # the MLP's output is its output projection applied to the key (dropout is off in eval)
        proj = get_component(model, block, "mlp_out")
        keyed = store["mlp_key"][block] @ out_in_weight(proj).T + (proj.bias if proj.bias is not None else 0)
        torch.testing.assert_close(keyed, store["mlp"][block], rtol=1e-5, atol=1e-5)
        assert store["heads"][block].shape[-1] % n_heads(model) == 0
    assert hook_count(model) == 0


def test_editing_a_site_is_what_the_model_uses(family, tokenizer):
    model = make_model(family)
    ids = ids_of(tokenizer)
    with torch.no_grad():
        clean = model(ids).logits
        with edit_site(model, 1, "mlp", lambda t: t):
            same = model(ids).logits
        with edit_site(model, 1, "mlp", torch.zeros_like):
            zeroed = model(ids).logits
        with Ablation(model, 1, "mlp"):
            ablated = model(ids).logits
        # zeroing the key zeroes the MLP output too, up to the projection's bias
        with edit_site(model, 1, "mlp_key", torch.zeros_like):
            keyless = model(ids).logits
    torch.testing.assert_close(same, clean, rtol=0, atol=0)
    torch.testing.assert_close(zeroed, ablated, rtol=0, atol=0)
    assert not torch.allclose(zeroed, clean, atol=1e-3)
    if get_component(model, 1, "mlp_out").bias is None:
        torch.testing.assert_close(keyless, ablated, rtol=1e-5, atol=1e-5)
    assert hook_count(model) == 0


def test_hooks_go_away_after_an_exception(tokenizer):
    model = make_model("llama")
    with pytest.raises(RuntimeError, match="inside"):
        with edit_site(model, 0, "heads", lambda t: t), record_sites(model, ["mlp_key"]):
            raise RuntimeError("inside")
    assert hook_count(model) == 0


def test_conv1d_weight_view_shares_storage():
    model = make_model("gpt2")
    proj = get_component(model, 0, "mlp_out")
    view = out_in_weight(proj)
    assert view.shape == (model.config.n_embd, proj.weight.shape[0])
    with torch.no_grad():
        view[0, 0] += 1.0
    assert proj.weight[0, 0] == view[0, 0]


@pytest.mark.parametrize("block, site, message", [(3, "mlp", "out of range"), (-1, "mlp", "out of range"), (0, "resid", "unknown site")])
def test_bad_sites(block, site, message):
    with pytest.raises(InputError, match=message):
        with edit_site(make_model("gpt2"), block, site, lambda t: t):
            pass
