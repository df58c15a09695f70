"""The per-token loss picture, its figures, the steered-model evaluation and the steer CLI, on tiny models."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lens.report.html import write_html
from lens.interventions import ActAdd, LayerProgram, hook_count
from lens.analysis.picture import build_picture
from lens.report.plots import plot_final_token_loss, plot_token_heatmaps
from lens.analysis.intervention_eval import evaluate_intervention, mean_difference_ci, program_losses, sequence_logprobs, t_quantile
from lens.cli import main as lens_cli
from lens.core.translators import TunedLens, logit_lens_for
from conftest import N_LAYERS, make_model

TEXT = "Love and hate, anger and calm: a steering vector adds one to the other."
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def steer(model, tokenizer, coefficient: float = 8.0, layer: int = 1) -> ActAdd:
    return ActAdd(model, tokenizer, pairs=[("Love", "Hate")], layer=layer, coefficient=coefficient)


def test_arrays_have_layers_by_tokens_and_final_row_is_the_models_loss(tiny_model, tokenizer):
    act = steer(tiny_model, tokenizer)
    pic = build_picture(tiny_model, tokenizer, TEXT, logit_lens_for(tiny_model), lambda: act, top_k=3)
    n_tok = len(tokenizer(TEXT)["input_ids"])
    assert len(pic.tokens) == n_tok
    for stats in (pic.base, pic.intervened):
        for arr in (stats.ce, stats.kl, stats.entropy):
            assert arr.shape == (N_LAYERS + 1, n_tok)
        assert stats.top_ids.shape == stats.top_probs.shape == (N_LAYERS + 1, n_tok, 3)
    assert torch.isnan(pic.base.ce[:, -1]).all()  # the last token has no next token to score
    ids = torch.tensor([pic.token_ids])
    logits = tiny_model(input_ids=ids).logits[0, :-1]
    own_loss = F.cross_entropy(logits, ids[0, 1:], reduction="none")
    torch.testing.assert_close(pic.base.ce[-1, :-1], own_loss, atol=1e-4, rtol=1e-4)
    assert (pic.base.kl[-1] == 0).all()  # the final layer is the model's own distribution
    assert hook_count(tiny_model) == 0


def test_steering_changes_the_steered_models_per_token_loss(tiny_model, tokenizer):
    layer = 1
    act = steer(tiny_model, tokenizer, layer=layer)
    pic = build_picture(tiny_model, tokenizer, TEXT, logit_lens_for(tiny_model), lambda: act)
    diff = pic.panels("ce")["diff"]  # [L+1, T]
    assert torch.equal(diff[:layer, :-1], torch.zeros_like(diff[:layer, :-1]))  # before the injection
    assert diff[-1, :-1].abs().max() > 1e-2  # the model's own per-token loss moved
    unsteered = build_picture(tiny_model, tokenizer, TEXT, logit_lens_for(tiny_model), lambda: steer(tiny_model, tokenizer, 0.0))
    assert torch.equal(unsteered.intervened.ce.nan_to_num(), unsteered.base.ce.nan_to_num())


def test_figures_html_and_json_are_written(tokenizer, tmp_path):
    tiny_model = make_model("gpt_neox")  # drawing does not depend on the family
    lens = TunedLens.for_model(tiny_model)
    with torch.no_grad():
        lens.bias.normal_()  # a tuned lens that is not the logit lens
    act = steer(tiny_model, tokenizer)
    pic = build_picture(tiny_model, tokenizer, TEXT, lens, lambda: act, top_k=4)
    assert pic.lens_kind == "tuned"
    paths = [
        plot_token_heatmaps(pic, tmp_path / "heat.png", metric="kl", unit="bits"),
        plot_final_token_loss(pic, tmp_path / "final.png"),
    ]
    for path in paths:
        assert path.read_bytes()[:8] == PNG_MAGIC
    page = write_html(pic, tmp_path / "p.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and "__DATA__" not in page
    summary = json.loads(json.dumps(pic.summary("bits"), allow_nan=False))
    assert summary["diff"]["ce"][0][-1] is None  # NaN becomes null, not invalid JSON
    base, inter = np.array(summary["base"]["kl"], float), np.array(summary["intervened"]["kl"], float)
    np.testing.assert_allclose(np.array(summary["diff"]["kl"], float), inter - base, atol=2e-4)
    np.testing.assert_allclose(base, pic.base.kl.numpy() / math.log(2), atol=1e-4)


def test_picture_rejects_bad_input(tiny_model, tokenizer):
    lens = logit_lens_for(tiny_model)
    with pytest.raises(ValueError, match="at least 2"):
        build_picture(tiny_model, tokenizer, "a", lens)
    with pytest.raises(ValueError, match="top_k"):
        build_picture(tiny_model, tokenizer, TEXT, lens, top_k=0)
    with pytest.raises(ValueError, match="valid: \\['nats', 'bits'\\]"):
        build_picture(tiny_model, tokenizer, TEXT, lens).panels("ce", unit="furlongs")
    with pytest.raises(ValueError, match="program_rows"):  # a skip changes the rows the lens reads
        build_picture(tiny_model, tokenizer, TEXT, lens, lambda: LayerProgram.skip(tiny_model, 0, 1))
    assert hook_count(tiny_model) == 0


def test_t_quantile_matches_tables():
    for df, table in [(1, 12.7062), (4, 2.7764), (15, 2.1314), (120, 1.9799)]:
        assert t_quantile(0.975, df) == pytest.approx(table, abs=1e-3)


def test_logprob_difference_ci_matches_the_direct_formula():
    gen = torch.Generator().manual_seed(0)
    diffs = torch.randn(12, generator=gen) * 0.3 + 0.1
    ci = mean_difference_ci(diffs, confidence=0.95).to_json()
    x = diffs.double().numpy()
    half = 2.200985 * x.std(ddof=1) / math.sqrt(len(x))  # t_{0.975, 11} from tables
    assert ci["mean"] == pytest.approx(x.mean(), abs=1e-12)
    assert (ci["low"], ci["high"]) == pytest.approx((x.mean() - half, x.mean() + half), abs=1e-5)
    with pytest.raises(ValueError, match="at least 2"):
        mean_difference_ci(diffs[:1])


def test_evaluate_steering_numbers_agree_with_direct_log_probs(tokenizer):
    model = make_model("llama")
    seqs = [torch.tensor(tokenizer(t)["input_ids"]) for t in (TEXT, "The server starts at boot time.", "Packages are installed with apt.")]
    act = steer(model, tokenizer)
    res = evaluate_intervention(model, seqs, lambda: act, lens=logit_lens_for(model)).to_json()
    base = sequence_logprobs(model, seqs)
    with act:
        steered = sequence_logprobs(model, seqs)
    per_seq = torch.stack([(s - b).mean() for s, b in zip(steered, base)])
    assert res["logprob_diff"]["mean"] == pytest.approx(float(per_seq.mean()), abs=1e-6)
    nll_b, nll_s = -float(torch.cat(base).mean()), -float(torch.cat(steered).mean())
    assert res["perplexity"]["ratio"] == pytest.approx(math.exp(nll_s - nll_b), rel=1e-6, abs=1e-7)
    assert res["lens_shift"]["ce"]["shift"][-1] == pytest.approx(nll_s - nll_b, abs=1e-4)  # final row: model loss
    assert res["lens_shift"]["ce"]["shift"][0] == pytest.approx(0.0, abs=1e-6)  # before the injection
    losses = program_losses(model, seqs, {"skip 1": lambda: LayerProgram.skip(model, 1, 2)}).to_json()
    assert losses["intact"] == pytest.approx(nll_b, abs=1e-6)
    assert losses["programs"]["skip 1"]["increase"] != 0.0
    assert hook_count(model) == 0


def test_steer_cli_writes_its_outputs(tokenizer, tmp_path, monkeypatch):
    model_dir = tmp_path / "tiny"
    make_model("gpt2").save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT * 40, encoding="utf-8")
    monkeypatch.chdir(tmp_path)  # lens=auto looks for checkpoints/<model>/ here: there is none
    lens_cli([
        "steer", f"model.name={model_dir}", "run_name=r", "steering.layer=1", "steering.coefficient=-6",
        f"data.dataset={corpus}", "data.eval_percent=100", "data.seq_len=16", "eval.sequences=3",
        "generate.max_new_tokens=4", "picture.text='Love and hate: anger and calm.'", "eval.texts=[Love is all,Hate is all]",
        "eval.lens_shift=false", "picture.metrics=[ce]", "eval.skips=[[0,1]]",
    ])
    out = tmp_path / "eval/out/steer/r"
    names = {p.name for p in out.iterdir()}
    assert {"heatmap_ce.png", "final_loss.png", "picture.html", "picture.json", "summary.json"} <= names
    summary = json.loads((out / "summary.json").read_text())
    assert summary["lens"] == "logit" and summary["eval"]["held_out"]["sequences"] == 3
    assert summary["picture"]["final_ce_mean"]["diff"] != 0.0
    assert summary["eval_programs"]["programs"]["skip 0..1"]["loss"] > 0
