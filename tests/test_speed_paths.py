"""Every fast path of lens training against the straightforward computation, on tiny models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lens.core.closed_form import RidgeStats
from conftest import random_lens
from lens.core.metrics import StreamingKL, lens_kl_loss, lens_kl_loss_reference, teacher_terms
from lens.core.residuals import capture_residuals
from lens.core.translators import TunedLens, Unembed



def batch(model, n_seqs: int = 2, seq_len: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Residuals ``[L+1, N, d]`` and teacher log-probs ``[N, V]`` of random tokens."""
    torch.manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (n_seqs, seq_len))
    residuals, logits = capture_residuals(model, ids)
    return residuals.flatten(1, 2), logits.flatten(0, 1).float().log_softmax(-1)


def with_unembed_bias(unembed: Unembed) -> Unembed:
    """Give the unembedding a bias (GPT-2 and Llama have none)."""
    old = unembed.unembed
    biased = nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(old.weight)
        biased.bias.normal_(0, 0.5)
    biased.requires_grad_(False)
    unembed.unembed = biased
    return unembed


def loss_and_grads(loss_fn, lens: TunedLens) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lens.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.sum().backward()
    return loss.detach(), lens.weight.grad.clone(), lens.bias.grad.clone()


def assert_same(fast: tuple, slow: tuple) -> None:
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("unembed_bias", [False, True])
def test_streaming_kl_matches_reference(tiny_model, unembed_bias):
    lens, unembed = random_lens(tiny_model), Unembed(tiny_model)
    if unembed_bias:
        unembed = with_unembed_bias(unembed)
    residuals, teacher = batch(tiny_model)
    fast = loss_and_grads(lambda: lens_kl_loss(lens, unembed, residuals, teacher, chunk=5), lens)
    slow = loss_and_grads(lambda: lens_kl_loss_reference(lens, unembed, residuals, teacher), lens)
    assert fast[0].shape == (lens.n_layers,)
    assert fast[0].min() > 0
    assert_same(fast, slow)


def test_streaming_kl_with_row_subsampling(tiny_model):
    """The training module keeps a random subset of positions; both paths agree on it."""
    lens, unembed = random_lens(tiny_model), with_unembed_bias(Unembed(tiny_model))
    residuals, teacher = batch(tiny_model)
    keep = torch.randperm(residuals.shape[1], generator=torch.Generator().manual_seed(0))[:7]
    residuals, teacher = residuals[:, keep], teacher[keep]
    fast = loss_and_grads(lambda: lens_kl_loss(lens, unembed, residuals, teacher, chunk=3), lens)
    slow = loss_and_grads(lambda: lens_kl_loss_reference(lens, unembed, residuals, teacher), lens)
    assert_same(fast, slow)


@pytest.mark.parametrize("family", ["llama"])
def test_chunk_size_does_not_change_results(tiny_model):
    lens, unembed = random_lens(tiny_model), Unembed(tiny_model)
    residuals, teacher = batch(tiny_model)
    results = [
        loss_and_grads(lambda c=c: lens_kl_loss(lens, unembed, residuals, teacher, chunk=c), lens)
        for c in (1, 4, 10_000)
    ]
    for other in results[1:]:
        assert_same(other, results[0])


@pytest.mark.parametrize("family", ["gpt2"])
def test_streaming_kl_reuses_teacher_rows(tiny_model):
    """Row ``i`` of the student reads teacher row ``i % M``: the same as repeating the teacher."""
    unembed = Unembed(tiny_model)
    residuals, teacher = batch(tiny_model)
    x = unembed.final_norm(residuals[:2].reshape(-1, residuals.shape[-1]))  # two layers' rows
    w, b = unembed.unembed.weight, unembed.unembed.bias
    results = []
    for t in (teacher, teacher.repeat(2, 1)):
        xi = x.clone().requires_grad_()
        loss = StreamingKL.apply(xi, w, b, *teacher_terms(t), 4)
        loss.backward()
        results.append((loss.detach(), xi.grad))
    assert_same(results[0], results[1])


def test_batched_translate_matches_per_layer(tiny_model):
    lens = random_lens(tiny_model)
    torch.manual_seed(2)
    residuals = torch.randn(lens.n_layers + 1, 2, 5, lens.d_model)  # [L+1, B, T, d]
    batched = lens.translate(residuals)
    looped = torch.stack([lens.translate_layer(h, i) for i, h in enumerate(residuals)])
    assert batched.shape == residuals.shape
    torch.testing.assert_close(batched, looped, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(batched[-1], residuals[-1])


def lstsq_reference(residuals: torch.Tensor, ridge_rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, b)`` from ``torch.linalg.lstsq`` per layer on ``[h, 1] -> h_L`` (ridge as extra rows)."""
    y = residuals[-1].double()
    weights, biases = [], []
    for layer, h in enumerate(residuals[:-1].double()):
        x = torch.cat([h, torch.ones_like(h[:, :1])], dim=1)
        target = y
        if ridge_rows is not None:
            x = torch.cat([x, ridge_rows[layer]])
            target = torch.cat([y, torch.zeros(ridge_rows.shape[1], y.shape[1], dtype=y.dtype)])
        coef = torch.linalg.lstsq(x, target).solution  # [d+1, d]
        d = h.shape[1]
        weights.append(coef[:d].T - torch.eye(d, dtype=coef.dtype))
        biases.append(coef[d])
    return torch.stack(weights).float(), torch.stack(biases).float()


def assert_layers_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    """Per layer, ``|actual - expected| <= rtol * |expected|`` in Frobenius norm.

    The Gram sums are float32 (``RidgeStats``), so each coefficient's error scales with the largest
    coefficients of its layer, not with itself; an element-wise tolerance on the small entries then
    depends on the BLAS kernel's summation order (it failed on an AVX2-only AMD EPYC)."""
    for layer, (a, e) in enumerate(zip(actual, expected)):
        error, scale = float((a - e).norm()), float(e.norm())
        assert error <= rtol * scale, f"layer {layer}: |difference| {error:.3g} > {rtol:g} * |reference| {scale:.3g}"


def random_residuals(n_layers: int = 3, n_tokens: int = 200, d: int = 8) -> torch.Tensor:
    """Residual-like data: layers of very different scale and a nonzero mean (so the bias matters)."""
    torch.manual_seed(3)
    h = torch.randn(n_layers + 1, n_tokens, d) * torch.logspace(0, 2, n_layers + 1)[:, None, None]
    return h + torch.randn(n_layers + 1, 1, d) * 3


def accumulate(residuals: torch.Tensor, pieces: int) -> RidgeStats:
    stats = RidgeStats(residuals.shape[0] - 1, residuals.shape[-1])
    for part in residuals.chunk(pieces, dim=1):
        stats.update(part)
    return stats


def test_ridge_solve_matches_lstsq_without_ridge():
    residuals = random_residuals()
    weight, bias = accumulate(residuals, pieces=3).solve(ridge=0.0)
    ref_weight, ref_bias = lstsq_reference(residuals, None)
    assert_layers_close(weight, ref_weight, rtol=1e-4)
    assert_layers_close(bias, ref_bias, rtol=1e-4)


def test_ridge_solve_matches_lstsq_with_unpenalised_bias_column():
    residuals = random_residuals()
    ridge = 0.5
    n_layers, d = residuals.shape[0] - 1, residuals.shape[-1]
    gram_diag = (residuals[:-1].double() ** 2).sum(1)  # [L, d]: the Gram diagonal, bias column left out
    rows = torch.zeros(n_layers, d, d + 1, dtype=torch.float64)
    rows[:, :, :d] = torch.eye(d) * (ridge * gram_diag.mean(-1))[:, None, None].sqrt()
    weight, bias = accumulate(residuals, pieces=4).solve(ridge=ridge)
    ref_weight, ref_bias = lstsq_reference(residuals, rows)
    assert_layers_close(weight, ref_weight, rtol=1e-4)
    assert_layers_close(bias, ref_bias, rtol=1e-4)


def test_ridge_solve_on_model_residuals(tiny_model):
    """Closed-form start on a real (tiny) model's residuals equals lstsq; it beats the logit lens."""
    residuals, teacher = batch(tiny_model, n_seqs=8, seq_len=16)
    stats = accumulate(residuals, pieces=2)
    weight, bias = stats.solve(ridge=1e-9)
    ref_weight, ref_bias = lstsq_reference(residuals, None)
    assert_layers_close(weight, ref_weight, rtol=1e-3)
    assert_layers_close(bias, ref_bias, rtol=1e-3)
    lens, unembed = TunedLens.for_model(tiny_model), Unembed(tiny_model)
    with torch.no_grad():
        logit_kl = lens_kl_loss(lens, unembed, residuals, teacher).mean()
        stats.apply_to(lens)
        fitted_kl = lens_kl_loss(lens, unembed, residuals, teacher).mean()
    assert fitted_kl < logit_kl


def test_residuals_without_logits_are_the_same_residuals(tiny_model):
    """``logits=False`` skips the unembedding (no ``[B, T, V]`` block) and changes nothing upstream."""
    ids = torch.randint(0, tiny_model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    with_logits, logits = capture_residuals(tiny_model, ids)
    without, none = capture_residuals(tiny_model, ids, logits=False)
    assert none is None and torch.equal(with_logits, without)
    torch.testing.assert_close(Unembed(tiny_model)(without[-1]), logits, rtol=1e-5, atol=1e-5)  # the teacher the step rebuilds
    assert capture_residuals(tiny_model, ids)[1].shape == logits.shape  # the hook is gone afterwards


def test_training_step_takes_the_teacher_only_at_kept_positions(tiny_model):
    """``part_losses`` = the full-logit KL at the same random positions (the teacher is no longer
    computed, then thrown away, at the others)."""
    from lens.config import LensConfig, OptimConfig
    from lens.training.module import TunedLensModule

    lens, unembed = random_lens(tiny_model), Unembed(tiny_model)
    module = TunedLensModule(tiny_model, lens, LensConfig(positions_per_layer=5, kl_chunk=3), OptimConfig())
    ids = torch.randint(0, tiny_model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(4))
    torch.manual_seed(9)
    fast = loss_and_grads(lambda: module.part_losses(ids), lens)
    torch.manual_seed(9)
    keep = torch.randperm(16)[:5]
    residuals, logits = capture_residuals(tiny_model, ids)
    teacher = logits.flatten(0, 1)[keep].float().log_softmax(-1)
    slow = loss_and_grads(lambda: lens_kl_loss_reference(lens, unembed, residuals.flatten(1, 2)[:, keep], teacher), lens)
    assert_same(fast, slow)


@pytest.mark.parametrize("unembed_bias", [False, True])
def test_layer_stats_match_the_per_token_statistics(tiny_model, unembed_bias):
    """The evaluation's fused statistics (KL through ``p W``, one logsumexp) equal ``lens_token_stats``."""
    from lens.core.metrics import Reading, lens_layer_stats, lens_token_stats

    lens, unembed = random_lens(tiny_model), Unembed(tiny_model)
    if unembed_bias:
        unembed = with_unembed_bias(unembed)
    ids = torch.randint(0, tiny_model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(5))
    residuals, _ = capture_residuals(tiny_model, ids)
    reading = Reading.scored(residuals, unembed(residuals[-1]), ids)
    slow = lens_token_stats(lens, unembed, reading)
    fast = lens_layer_stats(lens, unembed, reading, chunk=7)
    for name in ("ce", "kl", "entropy"):
        torch.testing.assert_close(fast[name], slow[name], rtol=1e-4, atol=2e-5)
    assert (fast["kl"][-1] == 0).all() and fast["kl"][:-1].min() >= 0
    rough = lens_layer_stats(lens, unembed, reading, chunk=7, entropy=False, matmul_dtype=torch.bfloat16)
    assert "entropy" not in rough
    for name in ("ce", "kl"):  # bf16 inputs: each logit off by ~2^-9 of its terms
        torch.testing.assert_close(rough[name].mean(-1), slow[name].mean(-1), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_stats_match_float64(dtype):
    """The compiled two-pass row statistics against float64 log-softmax, on logits spread wide
    enough (up to ~±300) that an entropy taken as ``lse - E_q[z]`` unshifted would lose digits."""
    from lens.core.metrics import row_stats

    g = torch.Generator().manual_seed(3)
    z = (torch.randn(37, 5003, generator=g) * torch.logspace(-1, 2, 37)[:, None]).to(dtype)
    target = torch.randint(0, 5003, (37, 1), generator=g)
    lse, target_logit, entropy = row_stats(z, target)
    log_q = z.double().log_softmax(-1)
    torch.testing.assert_close(lse - target_logit, -log_q.gather(-1, target)[:, 0].float(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(entropy, -(log_q.exp() * log_q).sum(-1).float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, torch.logsumexp(z.double(), -1).float(), rtol=1e-6, atol=1e-4)


def test_row_stats_run_uncompiled_where_compiling_fails(monkeypatch):
    from lens.core import metrics

    def broken(z, target):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(metrics, "_compiled_row_stats", broken)
    z, target = torch.randn(4, 50), torch.zeros(4, 1, dtype=torch.long)
    with pytest.warns(UserWarning, match="no C\\+\\+ compiler.*uncompiled"):
        got = metrics.row_stats(z, target)
    assert metrics._compiled_row_stats is metrics._row_stats  # warned once, then eager for the process
    for a, b in zip(got, metrics._row_stats(z, target)):
        assert torch.equal(a, b)


def test_residuals_at_kept_positions_are_those_of_the_full_pass(tiny_model):
    ids = torch.randint(0, tiny_model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(6))
    full, _ = capture_residuals(tiny_model, ids)
    keep = torch.tensor([17, 0, 5, 9])
    kept, _ = capture_residuals(tiny_model, ids, logits=False, positions=keep)
    assert torch.equal(kept, full.flatten(1, 2)[:, keep])
    with pytest.raises(ValueError, match="logits=False"):
        capture_residuals(tiny_model, ids, positions=keep)
