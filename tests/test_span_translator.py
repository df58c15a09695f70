"""Span translators: training repairs a skipped span, files round-trip, train.py and the sweep run."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from conftest import TEXT, make_model
from lens.analysis.spans import evaluate_spans
from lens.artifacts.registry import load_lens, load_span_translator, save_span_translator
from lens.cli import main as lens_cli
from lens.config import OptimConfig, SweepConfig, load_config
from lens.core.closed_form import fit_span_translators
from lens.core.residuals import capture_residuals
from lens.core.translators import SpanTranslator
from lens.interventions import LayerProgram, hook_count
from lens.training.span_module import SpanTranslatorModule
from lens.training.surgery import skip_sweep, sweep_spans


def sequences(tokenizer, n: int = 10, length: int = 24) -> torch.Tensor:
    ids = tokenizer(TEXT).input_ids
    return torch.tensor([ids[i * length : (i + 1) * length] for i in range(n)])  # [n, length]


def fit(model, translator, seqs, loss: str, steps: int = 20) -> None:
    optim = OptimConfig(optimizer="adam", lr_scale=10.0, weight_decay=0.0, num_steps=steps, grad_clip=1.0)
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, gradient_clip_val=1.0,
    )
    trainer.fit(SpanTranslatorModule(model, translator, loss, optim), DataLoader(TensorDataset(seqs), batch_size=4))


def test_kl_training_beats_plain_skip(family, tokenizer):
    model = make_model(family)
    seqs = sequences(tokenizer)
    train, held_out = seqs[:8], seqs[8:]
    span = (1, 2)
    translator = SpanTranslator.for_span(model, *span)
    before = evaluate_spans(model, held_out, [span], {span: translator}).to_json()["spans"][0]
    assert before["translator_kl"] == before["skip_kl"] > 0  # zero init is plain skipping
    fit(model, translator, train, "kl")
    seen = evaluate_spans(model, train, [span], {span: translator}).to_json()["spans"][0]
    unseen = evaluate_spans(model, held_out, [span], {span: translator}).to_json()["spans"][0]
    assert seen["translator_kl"] < 0.7 * seen["skip_kl"], seen
    assert unseen["translator_kl"] < unseen["skip_kl"], unseen  # 8 training sequences: some of it generalises
    # (CE against the next token means little for a random model: the training objective is the KL)
    assert all(not p.requires_grad for p in model.parameters()) and hook_count(model) == 0


def test_mse_training_and_least_squares_approach_true_residual(tokenizer):
    model = make_model("llama")
    seqs = sequences(tokenizer)
    residuals, _ = capture_residuals(model, seqs)  # [L+1, n, T, d]

    def mse(t: SpanTranslator) -> float:
        with torch.no_grad():
            return (t(residuals[1]) - residuals[3]).pow(2).mean().item()

    trained, solved = SpanTranslator.for_span(model, 1, 3), SpanTranslator.for_span(model, 1, 3)
    skip = mse(trained)
    fit(model, trained, seqs, "mse")
    fit_span_translators(model, [solved], seqs, batch_size=4, ridge=1e-6, skip_positions=0)
    assert mse(trained) < 0.8 * skip
    assert mse(solved) <= mse(trained) + 1e-6  # least squares is the optimum of the same objective

    # The default leaves position 0 (the attention sink) out: optimal on the other positions.
    without_first = SpanTranslator.for_span(model, 1, 3)
    fit_span_translators(model, [without_first], seqs, batch_size=4, ridge=1e-6)

    def mse_after_first(t: SpanTranslator) -> float:
        with torch.no_grad():
            return (t(residuals[1, :, 1:]) - residuals[3, :, 1:]).pow(2).mean().item()

    assert mse_after_first(without_first) <= mse_after_first(solved) + 1e-6
    assert not torch.allclose(without_first.weight, solved.weight)


def test_save_load_round_trip_and_mismatch(tokenizer, tmp_path):
    model = make_model("gpt2")
    translator = SpanTranslator.for_span(model, 0, 2)
    with torch.no_grad():
        translator.weight.normal_()
        translator.bias.normal_()
    save_span_translator(translator, tmp_path / "t", model)
    loaded = load_span_translator(tmp_path / "t", model=model)
    assert (loaded.start, loaded.end) == (0, 2) and torch.equal(loaded.weight, translator.weight)
    # usable by path in a layer program, the same as the translator in memory
    ids = torch.tensor([tokenizer(TEXT).input_ids[:12]])
    with LayerProgram.translated(model, translator):
        expected = model(ids, use_cache=False).logits
    with LayerProgram.from_file(model, tmp_path / "t"):
        assert torch.equal(model(ids, use_cache=False).logits, expected)
    assert hook_count(model) == 0 and model.config.n_layer == 3
    with pytest.raises(ValueError, match=r"made for gpt2 \(unembedding sha256 .*but llama has"):
        LayerProgram.from_file(make_model("llama"), tmp_path / "t")
    with pytest.raises(ValueError, match="blocks: 3 vs model 5"):
        load_span_translator(tmp_path / "t", model=make_model("gpt2", n_layers=5))
    with pytest.raises(ValueError, match="holds a span_translator, not a tuned_lens"):
        load_lens(tmp_path / "t")
    with pytest.raises(ValueError, match=r"span 0\.\.2 is not valid: need 0 <= start <= end <= 1"):
        SpanTranslator.for_span(make_model("gpt2", n_layers=1), 0, 2)
    with torch.no_grad():
        translator.bias[0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        save_span_translator(translator, tmp_path / "bad", model)


@pytest.fixture
def saved_model(tmp_path, tokenizer):
    folder = tmp_path / "tiny-llama"
    make_model("llama").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_train_command_translator_and_skip_sweep(saved_model, corpus_file, tmp_path, capsys):
    common = [f"model.name={saved_model}", f"data.dataset={corpus_file}", "data.seq_len=16", "data.batch_size=2",
              "data.eval_percent=20", "data.max_eval_sequences=2", "trainer.accelerator=cpu", f"output_dir={tmp_path / 'runs'}", "trainer.progress_bar=false"]
    lens_cli(["train", "--config", "configs/translator_smollm2.yaml", *common, "span.start=1", "span.end=2",
              "span.lstsq_sequences=4", "optim.num_steps=3", "trainer.val_every_n_steps=3", "eval.sequences=2"])
    run = tmp_path / "runs" / "translator-smollm2-135m-10-12"
    assert "span 1..2" in capsys.readouterr().out
    assert load_span_translator(run).start == 1
    assert json.loads((run / "eval.json").read_text())["spans"][0]["translator_ce"] > 0

    cfg = load_config(SweepConfig, None, [*common, "run_name=sweep", "span_lengths=[1,2]", "lstsq_sequences=4", "sequences=2"])
    results = skip_sweep(cfg).evaluation.spans.to_json()
    assert [(r["start"], r["end"]) for r in results["spans"]] == sweep_spans(3, [1, 2]) == [(0, 1), (1, 2), (2, 3), (0, 2), (1, 3)]
    assert (tmp_path / "runs" / "sweep" / "skip_sweep.png").stat().st_size > 0
    assert json.loads((tmp_path / "runs" / "sweep" / "skip_sweep.json").read_text())["intact_ce"] == results["intact_ce"]
    with pytest.raises(ValueError, match=r"span lengths \[4\] out of range: valid lengths are 1\.\.3"):
        sweep_spans(3, [4])

    # the trained translator, used by path in a surgery config, scores as it did after training
    cfg = load_config(SweepConfig, None, [*common, "run_name=files", "translators=none", f"translator_files=[{run}]", "sequences=2"])
    rows = skip_sweep(cfg).evaluation.spans.to_json()["spans"]
    trained = json.loads((run / "eval.json").read_text())["spans"][0]
    assert [r.get("translator_ce") is not None for r in rows] == [False, True, False]  # only span 1..2 has one
    assert rows[1] == trained
