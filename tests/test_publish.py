"""Shipping and publishing lenses: ``lens push`` writes a hub-ready folder whose card carries the run's
numbers, ``load_pretrained`` reads it (and the shipped lens) back, offline failures say what to do."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch

from tiny_run import REPO, config, write_tiny_inputs, overrides
from lens.artifacts.metadata import ArtifactMeta, ArtifactNotFoundError
from lens.artifacts.pretrained import hub_cache
from lens.artifacts.registry import load_lens, load_pretrained, resolve_lens
from lens.cli import main as cli_main
from lens.config import SHIPPED_LENSES, ConfigError, PushConfig, SteerConfig, TrainConfig, load_config
from lens.core.model import load_model
from lens.report.card import model_card
from lens.runs.push import push
from lens.training.lens_run import train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny lens trained and evaluated by ``train``: lens, config, eval.json, eval.png."""
    folder = tmp_path_factory.mktemp("run")
    inputs = write_tiny_inputs(folder)
    cfg = config(overrides(inputs, folder / "out", "tiny", "eval.enabled=true", "eval.sequences=2", "optim.num_steps=4"))
    train(cfg)
    return cfg.run_dir, inputs / "model"


def test_push_writes_the_hub_folder_and_stops_offline(trained_run, tmp_path, monkeypatch, capsys):
    run, _ = trained_run
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "hub"
    result = push(load_config(PushConfig, None, [f"run={run}", "repo_id=someone/tiny-lens", f"out={out}"]))
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "eval.json", "eval.png", "lens.safetensors", "train_config.yaml"]
    assert any("not uploaded (HF_HUB_OFFLINE is set)" in line and "huggingface-cli upload someone/tiny-lens" in line for line in result.lines())
    card = (out / "README.md").read_text()
    evaluation = json.loads((run / "eval.json").read_text())
    tuned, logit = evaluation["lenses"]["tuned"], evaluation["lenses"]["logit"]
    assert f"| 1 | {tuned['kl'][1]:.3f} | {logit['kl'][1]:.3f} | {tuned['ce'][1]:.3f} | {logit['ce'][1]:.3f} |" in card
    assert f"**{tuned['mean_kl']:.3f}**" in card and 'load_pretrained("someone/tiny-lens"' in card
    assert f"({evaluation['tokens']:,} tokens of held-out pages" in card
    # the configuration as run trains the same lens: what the card's "Reproduce" line promises
    again = load_config(TrainConfig, out / "train_config.yaml", [f"output_dir={tmp_path / 'again'}", "eval.enabled=false"])
    train(again)
    original = load_lens(run)
    torch.testing.assert_close(load_lens(again.run_dir).weight, original.weight, atol=1e-6, rtol=0)


@pytest.mark.parametrize("storage, rtol", [("float32", 0.0), ("bfloat16", 2**-8), ("float16", 2**-10)])
def test_load_pretrained_reads_the_pushed_folder(trained_run, tmp_path, monkeypatch, storage, rtol):
    run, model_dir = trained_run
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / storage
    push(load_config(PushConfig, None, [f"run={run}", "repo_id=someone/tiny-lens", f"out={out}", f"storage={storage}"]))
    model, _ = load_model(str(model_dir))
    original, loaded = load_lens(run), load_pretrained(str(out), model=model)
    assert loaded.weight.dtype == torch.float32
    torch.testing.assert_close(loaded.weight, original.weight, rtol=rtol, atol=1e-7 if rtol else 0.0)  # fp16 subnormals: 6e-8 apart
    torch.testing.assert_close(loaded.bias, original.bias, rtol=rtol, atol=1e-7 if rtol else 0.0)
    assert (out / "lens.safetensors").stat().st_size < (run / "lens.safetensors").stat().st_size * (0.6 if storage != "float32" else 1.01)


def test_a_published_lens_loads_from_the_cache_and_offline_says_where_to_put_it(trained_run, tmp_path, monkeypatch):
    run, _ = trained_run
    monkeypatch.setenv("LENS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ArtifactNotFoundError, match=r"https://huggingface.co/someone/tiny-lens/resolve/main/.*" + str(hub_cache("someone/tiny-lens"))):
        load_pretrained("someone/tiny-lens")
    assert not hub_cache("someone/tiny-lens").exists()  # nothing half-downloaded stays behind
    push(load_config(PushConfig, None, [f"run={run}", "repo_id=someone/tiny-lens", f"out={hub_cache('someone/tiny-lens')}"]))
    torch.testing.assert_close(load_pretrained("someone/tiny-lens").weight, load_lens(run).weight, atol=0, rtol=0)


def test_push_refuses_a_run_without_an_evaluation(trained_run, tmp_path, capsys):
    run, _ = trained_run
    bare = tmp_path / "bare"
    shutil.copytree(run, bare, ignore=shutil.ignore_patterns("eval.*", "resume", "tensorboard"))
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["push", str(bare), "someone/x", f"out={tmp_path / 'never'}"])
    assert exit_info.value.code == 2
    assert "eval.json is missing" in capsys.readouterr().err and not (tmp_path / "never").exists()


def test_pretrained_needs_a_shipped_lens_for_the_model_before_anything_loads():
    with pytest.raises(ConfigError, match="no lens ships for 'gpt2'.*smollm2-135m"):
        load_config(SteerConfig, None, ["model.name=gpt2", "lens=pretrained"])
    with pytest.raises(ArtifactNotFoundError, match="no pretrained lens 'nothing-here'"):
        load_pretrained("nothing-here")


def test_the_shipped_lens_loads_offline_in_one_line():
    """``checkpoints/pretrained/smollm2-135m`` is committed: it loads with no model, no network, no training."""
    lens = load_pretrained("smollm2-135m")
    meta = json.loads((REPO / "checkpoints" / SHIPPED_LENSES["smollm2-135m"] / "config.json").read_text())
    assert (lens.n_layers, lens.d_model) == (meta["num_layers"], meta["hidden_size"]) == (30, 576)
    assert torch.isfinite(lens.weight).all() and lens.weight.abs().max() > 0
    assert meta["unembed_sha256"] and "closed form" in lens.origin
    card = (REPO / "checkpoints" / SHIPPED_LENSES["smollm2-135m"] / "README.md").read_text()
    assert "lens train --config train_config.yaml" in card and "CC-BY-SA 3.0" in card


@pytest.mark.parametrize("init, optimizer, weight_decay, says", [
    ("lstsq", "sgd", 0.0, ["closed-form ridge regression", "over 180,224 tokens", "SGD Nesterov", "no weight decay"]),
    ("zero", "adam", 0.001, ["translators started at zero", "AdamW, lr 1.0 × 1e-3, weight decay 0.001"]),
])
def test_the_card_says_how_the_lens_was_trained(init, optimizer, weight_decay, says):
    """The recipe line follows the recorded config: the start, the optimizer and its weight decay, the step count."""
    folder = REPO / "checkpoints" / SHIPPED_LENSES["smollm2-135m"]
    meta = ArtifactMeta.from_json(json.loads((folder / "config.json").read_text()), str(folder))
    train = {**meta.train_config, "lens": {**meta.train_config["lens"], "init": init},
             "optim": {**meta.train_config["optim"], "optimizer": optimizer, "weight_decay": weight_decay, "num_steps": 2560}}
    card = model_card(replace(meta, train_config=train), json.loads((folder / "eval.json").read_text()), "someone/x", None, "float16")
    recipe = next(line for line in card.splitlines() if line.startswith("- **Recipe**"))
    assert f"2,560 KL steps, {'Adam' if optimizer == 'adam' else 'SGD'})" in recipe and all(s in recipe for s in says), recipe
    assert ("closed-form" in recipe) == (init == "lstsq")


def test_resolve_pretrained_checks_the_model(trained_run):
    _, model_dir = trained_run
    model, _ = load_model(str(model_dir))
    with pytest.raises(Exception, match="does not fit|blocks"):
        resolve_lens("pretrained", model, "smollm2-135m")
