"""Evaluation in depth: bits per byte, agreement, depth histogram, transfer matrix, streaming."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import TEXT, clear_argmax, make_model, random_lens

from lens.analysis.evaluate import evaluate_lenses
from lens.analysis.depth import evaluate_depth
from lens.cli import main as lens_cli
from lens.artifacts.registry import save_lens
from lens.core.translators import logit_lens_for
from lens.core.residuals import capture_residuals
from lens.core.translators import TunedLens, Unembed


@pytest.fixture
def setup(tokenizer):
    model = make_model("gpt_neox")
    lens = random_lens(model, seed=5, bias_std=0.3)
    ids = torch.tensor(tokenizer(TEXT)["input_ids"][: 5 * 12]).reshape(5, 12)  # [n, T]
    return model, lens, ids


def test_depth_metrics_match_direct_computation(setup, tokenizer):
    model, lens, seqs = setup
    lenses = {"tuned": lens, "logit": logit_lens_for(model)}
    got = evaluate_depth(model, tokenizer, lenses, iter(list(seqs)), batch_size=2, transfer_tokens=15, progress=False).to_json()
    unembed = Unembed(model)
    residuals, logits = capture_residuals(model, seqs)  # [L+1, n, T, d], [n, T, V]
    h = residuals[:, :, :-1].flatten(1, 2)  # [L+1, N, d]: every position that has a next token
    targets = seqs[:, 1:].flatten()  # [N]
    final_top = logits[:, :-1].flatten(0, 1).argmax(-1)
    n_bytes = sum(len(tokenizer.decode(s[1:], skip_special_tokens=True).encode()) for s in seqs)
    assert got["tokens"] == len(targets) and got["bytes"] == n_bytes
    res = got["lenses"]["tuned"]
    final_clear = clear_argmax(logits[:, :-1].flatten(0, 1))  # [N]
    with torch.no_grad():
        for layer in range(lens.n_layers + 1):
            log_q = unembed(lens.translate_layer(h[layer], layer)).double().log_softmax(-1)
            ce = -log_q.gather(-1, targets[:, None]).mean().item()
            assert res["ce"][layer] == pytest.approx(ce, rel=1e-5, abs=1e-6)
            assert res["ce_bpb"][layer] == pytest.approx(ce * len(targets) / n_bytes / math.log(2), rel=1e-5, abs=1e-6)
            entropy = -(log_q.exp() * log_q).sum(-1).mean().item()
            assert res["entropy"][layer] == pytest.approx(entropy, rel=1e-4, abs=1e-6)
            agree = int((log_q.argmax(-1) == final_top).sum())
            near_ties = int((~(clear_argmax(log_q) & final_clear)).sum())
            assert abs(res["agreement"][layer] * len(targets) - agree) <= near_ties + 1e-6
    assert res["agreement"][-1] == 1.0  # the final layer agrees with itself by definition
    assert sum(res["depth_histogram"]) == len(targets)
    # the transfer matrix: translator i at layer j, on the first 15 scored tokens
    t = got["transfer"]
    assert t["layers"] == list(range(lens.n_layers)) and t["tokens"] == 15
    first = h[:, :15]
    with torch.no_grad():
        for i, j in ((0, 0), (1, 2), (2, 0)):
            log_q = unembed(lens.translate_layer(first[j], i)).double().log_softmax(-1)
            assert t["ce"][i][j] == pytest.approx(-log_q.gather(-1, targets[:15, None]).mean().item(), rel=1e-5, abs=1e-6)
    assert evaluate_depth(model, tokenizer, {"logit": lenses["logit"]}, iter(list(seqs)), progress=False).transfer is None


def near_tie_cells(model, lens, seqs) -> torch.Tensor:
    """Per layer, how many scored tokens have a lens or final top-1 that nearly ties (``[L+1]``): only
    there may two batchings disagree on agreement or prediction depth."""
    residuals, logits = capture_residuals(model, seqs)
    h, final = residuals[:, :, :-1].flatten(1, 2), logits[:, :-1].flatten(0, 1)  # [L+1, N, d], [N, V]
    unembed = Unembed(model)
    with torch.no_grad():
        lens_clear = torch.stack([clear_argmax(unembed(lens.translate_layer(x, i))) for i, x in enumerate(h)])
    return (~(lens_clear & clear_argmax(final))).sum(-1)


def test_streaming_batches_and_foundation_agree(setup, tokenizer):
    model, lens, seqs = setup
    lenses = {"tuned": lens}
    one = evaluate_depth(model, tokenizer, lenses, (s for s in seqs), batch_size=5, transfer_tokens=0, progress=False).to_json()
    many = evaluate_depth(model, tokenizer, lenses, (s for s in seqs), batch_size=2, transfer_tokens=0, progress=False).to_json()
    a, b = one["lenses"]["tuned"], many["lenses"]["tuned"]
    # the final layer's KL to itself is 0 up to rounding in either batching (clamped at 0, never below)
    for metric in ("ce", "kl", "entropy"):
        assert a[metric] == pytest.approx(b[metric], rel=1e-6, abs=1e-7), metric
    assert min(a["kl"] + b["kl"]) >= 0.0
    ties = near_tie_cells(model, lens, seqs)  # 0 for this fixture: then the integer statistics agree exactly
    n_tokens = one["tokens"]
    for layer, n_ties in enumerate(ties.tolist()):
        assert abs(a["agreement"][layer] - b["agreement"][layer]) * n_tokens <= n_ties + 1e-6
    shifted = sum(abs(x - y) for x, y in zip(a["depth_histogram"], b["depth_histogram"]))
    assert shifted <= 2 * int(ties.sum())  # each flipped token moves one count from one bin to another
    base = evaluate_lenses(model, lenses, seqs, batch_size=2, progress=False).to_json()["lenses"]["tuned"]
    assert a["ce"] == pytest.approx(base["ce"], rel=1e-6, abs=1e-7)
    assert a["kl"] == pytest.approx(base["kl"], rel=1e-5, abs=1e-7)
    with pytest.raises(ValueError, match="empty"):
        evaluate_depth(model, tokenizer, lenses, iter([]), progress=False)


def test_eval_command_on_a_corpus(tmp_path, tokenizer, corpus_file, capsys):
    model = make_model("llama")
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    save_lens(TunedLens.for_model(model), tmp_path / "lens")
    out = tmp_path / "out" / "run"
    lens_cli(
        [
            "eval", f"model.name={tmp_path / 'model'}", f"lens={tmp_path / 'lens'}", f"data.dataset={corpus_file}",
            "data.seq_len=16", "data.eval_percent=50", "sequences=6", "data.batch_size=4", "transfer_tokens=20",
            "transfer_stride=2", f"output_dir={tmp_path / 'out'}", "run_name=run",
        ]
    )
    assert f"wrote {out}" in capsys.readouterr().out
    results = json.loads((out / "eval_depth.json").read_text())
    assert set(results["lenses"]) == {"tuned", "logit"}
    assert results["tokens"] == 6 * 15 and results["bytes"] > 0
    assert results["transfer"]["layers"] == [0, 2]
    # an untrained tuned lens is the logit lens
    assert results["lenses"]["tuned"]["ce"] == pytest.approx(results["lenses"]["logit"]["ce"], rel=1e-6, abs=1e-7)
    for name in ("eval_depth.png", "transfer.png"):
        assert (out / name).stat().st_size > 0
