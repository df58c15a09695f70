"""One artifact layer: every kind shares one metadata record, files follow the umask, old folders load."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from safetensors.torch import save_file

from conftest import make_model, make_tokenizer
from lens.artifacts.metadata import FORMAT_VERSION, ArtifactError, model_fingerprint
from lens.artifacts.registry import convert, load_lens, read_artifact, save_lens, save_span_translator
from lens.artifacts.files import write_json
from lens.core.translators import SpanTranslator, TunedLens
from lens.interventions import SteeringVector


def saved_kinds(tmp_path):
    model, tok = make_model("llama"), make_tokenizer()
    save_lens(TunedLens.for_model(model), tmp_path / "lens", model, {"seed": 1}, train_seconds=1.5)
    save_span_translator(SpanTranslator.for_span(model, 1, 2), tmp_path / "span", model)
    SteeringVector.from_contrast(model, tok, ["Love"], ["Hate"], layer=1).save(tmp_path / "vector")
    return model


def test_every_kind_shares_one_record(tmp_path):
    model = saved_kinds(tmp_path)
    records = {name: json.loads((tmp_path / name / "config.json").read_text()) for name in ("lens", "span", "vector")}
    assert len({tuple(sorted(r)) for r in records.values()}) == 1  # the same keys for every kind
    expected_kinds = {"lens": "tuned_lens", "span": "span_translator", "vector": "steering_vector"}
    for name, record in records.items():
        assert record["kind"] == expected_kinds[name] and record["format_version"] == FORMAT_VERSION
        assert record["unembed_sha256"] == model_fingerprint(model) and record["base_model"] == "llama"
        assert (record["num_layers"], record["hidden_size"]) == (3, 32)
        assert {"lens", "torch", "transformers", "safetensors"} <= set(record["versions"])
        artifact = read_artifact(tmp_path / name, model=model)
        assert {k: list(v.shape) for k, v in artifact.tensors.items()} == record["tensors"]
    assert records["lens"]["tensors"] == {"weight": [3, 32, 32], "bias": [3, 32]}
    assert records["lens"]["train_config"] == {"seed": 1} and records["lens"]["details"] == {"train_seconds": 1.5}
    assert records["span"]["details"] == {"start": 1, "end": 2}
    assert records["vector"]["details"]["layer"] == 1 and records["vector"]["details"]["positives"] == ["Love"]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_files_get_the_permissions_the_umask_asks_for(tmp_path, umask):
    old = os.umask(umask)
    try:
        saved_kinds(tmp_path)
        write_json({"a": 1}, tmp_path / "eval.json")
        convert(tmp_path / "lens", tmp_path / "converted")
    finally:
        os.umask(old)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) >= 9
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path
    assert stat.S_IMODE((tmp_path / "converted").stat().st_mode) == 0o777 & ~umask


def test_format_1_folders_still_load(tmp_path):
    """Lenses trained before the shared record (``lens_type`` and flat keys) keep loading and checking."""
    model = make_model("gpt2")
    lens = TunedLens.for_model(model)
    with torch.no_grad():
        lens.bias.normal_()
    folder = tmp_path / "old"
    folder.mkdir()
    save_file({"weight": lens.weight.detach(), "bias": lens.bias.detach()}, str(folder / "lens.safetensors"))
    v1 = {"format_version": 1, "lens_type": "tuned", "num_layers": 3, "hidden_size": 32, "base_model": "gpt2",
          "unembed_sha256": model_fingerprint(model), "train_seconds": 2.0, "versions": {"torch": "2.4"}}
    (folder / "config.json").write_text(json.dumps(v1))
    assert torch.equal(load_lens(folder, model).bias, lens.bias)
    assert read_artifact(folder).meta.details == {"train_seconds": 2.0}
    with pytest.raises(ValueError, match="made for gpt2"):
        load_lens(folder, make_model("gpt2", seed=3))


@pytest.mark.parametrize(
    "record, message",
    [
        ({}, r"lacks \['kind', 'num_layers', 'hidden_size', 'tensors'\]"),
        ([1, 2], "should hold a JSON object"),
        ({"kind": "tuned_lens", "num_layers": "3", "hidden_size": 32, "tensors": {}}, "'num_layers' should be a positive integer"),
        ({"kind": "probe", "num_layers": 3, "hidden_size": 32, "tensors": {}}, "kind 'probe' is none of"),
        ({"format_version": 9, "kind": "tuned_lens", "num_layers": 3, "hidden_size": 32, "tensors": {}}, "format 9 is newer"),
    ],
)
def test_broken_records_are_named(tmp_path, record, message):
    save_lens(TunedLens(3, 32), tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(record))
    with pytest.raises(ArtifactError, match=message):
        load_lens(tmp_path)


def test_tensors_must_match_the_record(tmp_path):
    save_lens(TunedLens(3, 32), tmp_path)
    save_file({"weight": torch.zeros(3, 32, 32), "bias": torch.zeros(3, 31)}, str(tmp_path / "lens.safetensors"))
    with pytest.raises(ArtifactError, match=r"'bias' should have shape \(3, 32\)"):
        load_lens(tmp_path)
    save_file({"weight": torch.zeros(3, 32, 32)}, str(tmp_path / "lens.safetensors"))
    with pytest.raises(ArtifactError, match=r"tensors \['weight'\] do not match"):
        load_lens(tmp_path)
