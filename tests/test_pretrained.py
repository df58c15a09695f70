"""Pretrained lenses: the tuned-lens layout, conversion, fingerprints, and every kind of bad input."""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from conftest import D_MODEL, N_LAYERS, make_model

WEIGHTS = "lens.safetensors"
from torch import nn

from lens.artifacts.metadata import CONFIG, ArtifactMismatchError, ArtifactNotFoundError, model_fingerprint, unembed_fingerprint
from lens.artifacts.registry import convert, load_lens, read_artifact
from lens.artifacts.tuned_lens import hub_folder
from lens.cli import main as lens_cli
from lens.core.residuals import capture_residuals
from lens.core.translators import Unembed


def reference_state(n_layers: int = N_LAYERS, d: int = D_MODEL, seed: int = 1) -> dict[str, torch.Tensor]:
    """What tuned-lens' ``layer_translators.state_dict()`` holds: nn.Linear weights keyed '{i}.weight'."""
    torch.manual_seed(seed)
    state = {}
    for i in range(n_layers):
        state[f"{i}.weight"] = torch.randn(d, d) * 0.2
        state[f"{i}.bias"] = torch.randn(d) * 0.2
    return state


def write_tuned_lens(folder: Path, state: dict, n_layers: int = N_LAYERS, d: int = D_MODEL, **config) -> Path:
    """A folder in the tuned-lens layout, written the way its ``TunedLens.save`` does."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / "params.pt")
    fields = {
        "base_model_name_or_path": "tiny",
        "d_model": d,
        "num_hidden_layers": n_layers,
        "bias": True,
        "base_model_revision": None,
        "unembed_hash": "0" * 64,
        "lens_type": "linear_tuned_lens",
        **config,
    }
    (folder / "config.json").write_text(json.dumps(fields))
    return folder


@pytest.fixture
def tl_folder(tmp_path: Path) -> Path:
    return write_tuned_lens(tmp_path / "tl", reference_state())


def reference_logits(model, state: dict, h: torch.Tensor, layer: int) -> torch.Tensor:
    """The reference formula: unembed(h + Linear_i(h)), with a real nn.Linear holding the saved weights."""
    linear = nn.Linear(D_MODEL, D_MODEL)
    linear.load_state_dict({"weight": state[f"{layer}.weight"], "bias": state[f"{layer}.bias"]})
    return Unembed(model)(h + linear(h))


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "llama"])
def test_converted_lens_matches_tuned_lens_formula(family, tl_folder, tmp_path):
    model = make_model(family)
    state = reference_state()
    out = convert(tl_folder, tmp_path / "ours", model)
    assert sorted(p.name for p in out.iterdir()) == [CONFIG, WEIGHTS]
    record = read_artifact(out).meta.model
    assert record.unembed_sha256 == model_fingerprint(model)
    assert (record.num_layers, record.hidden_size) == (N_LAYERS, D_MODEL)
    lens = load_lens(out, model)
    ids = torch.randint(0, 300, (2, 9))
    residuals, _ = capture_residuals(model, ids)  # [L+1, 2, 9, d]
    unembed = Unembed(model)
    with torch.no_grad():
        for layer in range(N_LAYERS):
            ours = unembed(lens.translate_layer(residuals[layer], layer))
            expected = reference_logits(model, state, residuals[layer], layer)
            torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
            # the translator does something: the logit lens would be far off
            assert (unembed(residuals[layer]) - expected).abs().max() > 1e-2
    direct = load_lens(tl_folder, model)  # the tuned-lens folder loads without conversion too
    torch.testing.assert_close(direct.weight, lens.weight)
    torch.testing.assert_close(direct.bias, lens.bias)


def test_convert_cli_with_model_folder(tl_folder, tmp_path, tokenizer, capsys):
    model = make_model("gpt2")
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    lens_cli(["convert", str(tl_folder), str(tmp_path / "ours"), f"model={tmp_path / 'model'}"])
    assert "fingerprint" in capsys.readouterr().out
    assert read_artifact(tmp_path / "ours").meta.model.unembed_sha256 == model_fingerprint(model)
    with pytest.raises(SystemExit) as exit_:
        lens_cli(["convert", str(tl_folder), str(tmp_path / "ours")])
    assert exit_.value.code == 2 and "exists and is not empty" in capsys.readouterr().err


def test_fingerprint_sees_every_weight():
    w = make_model("gpt2").lm_head.weight.detach()
    assert unembed_fingerprint(w) == unembed_fingerprint(w.clone().double())  # dtype-independent
    moved = w.clone()
    moved[w.shape[0] // 2, w.shape[1] // 2] += 1e-4  # a middle element: a printed summary would not show it
    assert unembed_fingerprint(moved) != unembed_fingerprint(w)
    assert unembed_fingerprint(w.reshape(w.shape[1], w.shape[0])) != unembed_fingerprint(w)  # shape is hashed
    assert len(unembed_fingerprint(w)) == 64


def test_lens_for_another_model_is_refused(tl_folder, tmp_path):
    model, other = make_model("gpt2", seed=0), make_model("gpt2", seed=1)  # same shapes, other weights
    out = convert(tl_folder, tmp_path / "ours", model)
    with pytest.raises(ArtifactMismatchError) as err:
        load_lens(out, other)
    message = str(err.value)
    assert model_fingerprint(model)[:16] in message and model_fingerprint(other)[:16] in message
    assert "allow_mismatch" in message
    assert load_lens(out, other, allow_mismatch=True).n_layers == N_LAYERS
    with pytest.raises(ArtifactMismatchError):
        convert(out, tmp_path / "again", other)
    assert not (tmp_path / "again").exists()


def test_shape_mismatch_names_both_sides(tl_folder):
    with pytest.raises(ValueError, match="blocks: 3 vs model 4"):
        load_lens(tl_folder, make_model("gpt2", n_layers=4))


class Payload:
    """Unpickling this would create a file: weights_only loading must never run it."""

    marker = ""

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def bad_params(tmp_path: Path, kind: str) -> Path:
    folder = write_tuned_lens(tmp_path / kind, reference_state())
    params = folder / "params.pt"
    good = params.read_bytes()
    if kind == "truncated":
        params.write_bytes(good[: len(good) // 2])
    elif kind == "empty":
        params.write_bytes(b"")
    elif kind == "garbage":
        params.write_bytes(b"\x00not a torch file" * 50)
    elif kind == "pickled_object":
        payload = Payload()
        payload.marker = str(tmp_path / "executed")
        torch.save({**reference_state(), "0.weight": payload}, params)
    elif kind == "non_tensor_values":
        torch.save({**reference_state(), "0.bias": [0.0] * D_MODEL}, params)
    elif kind == "not_a_dict":
        torch.save([torch.zeros(D_MODEL)], params)
    elif kind == "prefixed_keys":
        torch.save({f"layer_translators.{k}": v for k, v in reference_state().items()}, params)
    elif kind == "wrong_shape":
        torch.save({**reference_state(), "1.weight": torch.zeros(D_MODEL, D_MODEL + 1)}, params)
    elif kind == "nan":
        state = reference_state()
        state["2.bias"][0] = float("nan")
        torch.save(state, params)
    elif kind == "integer_tensor":
        torch.save({**reference_state(), "0.bias": torch.zeros(D_MODEL, dtype=torch.long)}, params)
    return folder


@pytest.mark.parametrize(
    "kind, message",
    [
        ("truncated", "corrupt or truncated"),
        ("empty", "corrupt or truncated"),
        ("garbage", "corrupt or truncated|other than tensors"),
        ("pickled_object", "other than tensors"),
        ("non_tensor_values", "floating-point tensor"),
        ("not_a_dict", "dict of tensors"),
        ("prefixed_keys", "missing keys"),
        ("wrong_shape", "should have shape"),
        ("nan", "NaN"),
        ("integer_tensor", "floating-point tensor"),
    ],
)
def test_bad_params_are_refused_and_nothing_is_written(kind, message, tmp_path):
    folder = bad_params(tmp_path, kind)
    out = tmp_path / "out" / "lens"
    with pytest.raises(ValueError, match=message):
        convert(folder, out)
    assert not out.exists()
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []  # no temp leftovers
    assert not (tmp_path / "executed").exists()  # the pickled payload never ran


@pytest.mark.parametrize(
    "config, message",
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"d_model": D_MODEL}), "num_hidden_layers"),
        (json.dumps({"d_model": D_MODEL, "num_hidden_layers": 3, "lens_type": "other"}), "lens_type"),
    ],
)
def test_bad_tuned_lens_config(config, message, tl_folder):
    (tl_folder / "config.json").write_text(config)
    with pytest.raises(ValueError, match=message):
        load_lens(tl_folder)


def test_truncated_safetensors_is_refused(tl_folder, tmp_path):
    out = convert(tl_folder, tmp_path / "ours")
    weights = out / WEIGHTS
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_lens(out)


def test_failed_write_leaves_nothing(tl_folder, tmp_path, monkeypatch):
    def disk_full(fd: int) -> None:  # the weights are half on disk when the error comes
        raise OSError("disk full")

    monkeypatch.setattr("lens.artifacts.files.os.fsync", disk_full)
    with pytest.raises(OSError, match="disk full"):
        convert(tl_folder, tmp_path / "out" / "lens")
    assert list((tmp_path / "out").iterdir()) == []


def test_overwrite_replaces_whole_folder(tl_folder, tmp_path):
    out = tmp_path / "ours"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with pytest.raises(FileExistsError):
        convert(tl_folder, out)
    assert (out / "stale.txt").exists()
    convert(tl_folder, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [CONFIG, WEIGHTS]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_hub_id_offline_says_what_to_download(tmp_path, monkeypatch):
    monkeypatch.setenv("LENS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ArtifactNotFoundError) as err:
        load_lens("EleutherAI/no-such-model")
    message = str(err.value)
    for part in ("params.pt", "config.json", "AlignmentResearch/tuned-lens", "lens/EleutherAI/no-such-model/"):
        assert part in message
    target = hub_folder("EleutherAI/no-such-model")
    assert str(target) in message
    # following the instructions works, still offline
    write_tuned_lens(target, reference_state())
    assert load_lens("EleutherAI/no-such-model", make_model("gpt2")).n_layers == N_LAYERS


@pytest.mark.parametrize("bad_id", ["../../etc", "a/b/c", "", "gpt2/.."])
def test_odd_ids_are_refused(bad_id, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ArtifactNotFoundError):
        load_lens(bad_id)


def test_folder_without_lens_files(tmp_path):
    with pytest.raises(ArtifactNotFoundError, match="holds none of"):
        load_lens(tmp_path)
