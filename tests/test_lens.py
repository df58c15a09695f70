"""Lenses: identity at init, training beats the logit lens, exact safetensors round trip, clear errors."""

import json

import pytest
import torch

from conftest import make_model
from lens.config import ConfigError, OptimConfig, TrainConfig, load_config
from lens.artifacts.registry import load_lens, save_lens
from lens.core.translators import logit_lens_for
from lens.core.metrics import Reading, lens_token_stats
from lens.core.residuals import capture_residuals
from lens.training.lens_run import train
from lens.training.module import make_optimizer
from lens.core.translators import TunedLens, Unembed


def test_untrained_tuned_lens_equals_logit_lens(tiny_model):
    residuals, logits = capture_residuals(tiny_model, torch.randint(0, 300, (2, 9)))
    residuals = residuals.flatten(1, 2)
    unembed = Unembed(tiny_model)
    reading = Reading(residuals, logits.flatten(0, 1))
    tuned = lens_token_stats(TunedLens.for_model(tiny_model), unembed, reading, top_k=3)
    logit = lens_token_stats(logit_lens_for(tiny_model), unembed, reading, top_k=3)
    for key in tuned:
        assert torch.equal(tuned[key], logit[key]), key
    # The final layer read by any lens is the model's own prediction, exactly.
    assert (tuned["kl"][-1] == 0).all()
    assert tuned["kl"][:-1].mean() > 0.1


def test_safetensors_round_trip_is_exact(tiny_model, tmp_path):
    lens = TunedLens.for_model(tiny_model)
    with torch.no_grad():
        lens.weight.normal_(std=0.1)
        lens.bias.normal_()
    save_lens(lens, tmp_path / "run", tiny_model)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["config.json", "lens.safetensors"]
    loaded = load_lens(tmp_path / "run", model=tiny_model)
    residuals, _ = capture_residuals(tiny_model, torch.randint(0, 300, (1, 7)))
    assert torch.equal(lens.translate(residuals), loaded.translate(residuals))
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["num_layers"] == 3 and config["hidden_size"] == 32 and "torch" in config["versions"]
    assert config["kind"] == "tuned_lens" and config["tensors"] == {"weight": [3, 32, 32], "bias": [3, 32]}


def test_mismatched_lens_and_model_fail_clearly(tmp_path):
    model = make_model("llama", n_layers=3)
    model.config.name_or_path = "tiny-3"
    save_lens(TunedLens.for_model(model), tmp_path / "l3", model)
    with pytest.raises(ValueError, match=r"tiny-3.*blocks: 3 vs model 2"):
        load_lens(tmp_path / "l3", model=make_model("llama", n_layers=2))


def test_missing_and_corrupt_lens_files(tmp_path, tiny_model):
    with pytest.raises(FileNotFoundError, match="nothing is not a folder: a saved tuned_lens is a folder"):
        load_lens(tmp_path / "nothing")
    folder = save_lens(TunedLens.for_model(tiny_model), tmp_path / "run")
    data = (folder / "lens.safetensors").read_bytes()
    (folder / "lens.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_lens(folder)


def test_bad_config_key_names_it():
    with pytest.raises(ConfigError, match=r"optim\.lr_sclae.*lr_scale"):
        load_config(TrainConfig, None, ["optim.lr_sclae=2"])
    with pytest.raises(ConfigError, match=r"optim\.num_steps"):
        load_config(TrainConfig, None, ["optim.num_steps=many"])
    cfg = load_config(TrainConfig, None, ["optim.num_steps=7", "data.seq_len=32"])
    assert cfg.optim.num_steps == 7 and cfg.data.seq_len == 32


@pytest.fixture
def tiny_run(tmp_path, tokenizer, corpus_file):
    """A tiny model and tokenizer saved as a local folder, the way a user points train.py at one."""
    model_dir = tmp_path / "tiny-llama"
    make_model("llama").save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)

    def overrides(*extra: str) -> TrainConfig:
        base = [
            f"model.name={model_dir}", f"data.dataset={corpus_file}", f"output_dir={tmp_path / 'out'}",
            "data.seq_len=16", "data.batch_size=4", "data.eval_percent=20", "data.max_eval_sequences=6",
            "eval.sequences=6", "trainer.accelerator=cpu", "trainer.progress_bar=false", "trainer.val_every_n_steps=20",
        ]
        return load_config(TrainConfig, None, base + list(extra))

    return overrides


def test_training_beats_logit_lens_on_held_out(tiny_run, tmp_path):
    cfg = tiny_run("run_name=zero", "lens.init=zero", "optim.num_steps=40")
    results = train(cfg).evaluation
    tuned, logit = results.lenses["tuned"], results.lenses["logit"]
    assert tuned.mean_kl < 0.8 * logit.mean_kl
    run_dir = tmp_path / "out" / "zero"
    assert {"lens.safetensors", "config.json", "eval.json", "eval.png", "tensorboard"} <= {p.name for p in run_dir.iterdir()}
    assert json.loads((run_dir / "eval.json").read_text())["lenses"]["tuned"]["mean_kl"] == tuned.mean_kl
    assert list(run_dir.glob("*.tmp")) == []


def test_closed_form_start_beats_logit_lens_without_steps(tiny_run):
    results = train(tiny_run("run_name=lstsq", "lens.init=lstsq", "optim.num_steps=0", "lens.lstsq_sequences=16")).evaluation
    assert results.lenses["tuned"].mean_kl < 0.8 * results.lenses["logit"].mean_kl


def test_default_optimizer_keeps_a_closed_form_start_where_the_kl_gradient_is_zero():
    """Weight decay would pull a closed-form fit toward zero on every step (docs/learning_curves.md): the default has none."""
    def after_steps(optim: OptimConfig) -> torch.Tensor:
        fit = torch.nn.Parameter(torch.full((4, 4), 3.0))
        opt = make_optimizer([fit], optim)
        for _ in range(10):
            fit.grad = torch.zeros_like(fit)  # the KL is at its optimum here
            opt.step()
        return fit.detach()

    assert torch.equal(after_steps(OptimConfig()), torch.full((4, 4), 3.0))
    decayed = after_steps(OptimConfig(weight_decay=1e-3))  # the published recipe's value
    assert (decayed < 3.0).all()


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_fused_optimizers_update_as_the_textbook_loop_does(optimizer):
    """The fused updates save the whole-weight temporaries; the translators must move as the plain loop moves them."""
    torch.manual_seed(0)
    start, grads = torch.randn(3, 8, 8), [torch.randn(3, 8, 8) for _ in range(20)]
    optim = OptimConfig(optimizer=optimizer, weight_decay=1e-3)

    def run(fused: bool) -> torch.Tensor:
        w = torch.nn.Parameter(start.clone())
        opt = make_optimizer([w], optim)
        assert opt.defaults["fused"] is True
        if not fused:
            opt.defaults["fused"] = opt.param_groups[0]["fused"] = False
        for g in grads:
            w.grad = g.clone()
            opt.step()
        return w.detach()

    fused, plain = run(True), run(False)
    assert not torch.equal(fused, start)
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-6)
