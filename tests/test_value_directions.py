"""Value-space directions among ROME edits on the tiny models: the regression separates separable
deltas and is at chance on shuffled ones, the split never puts a subject on both sides, steering adds
exactly the vector at the last subject token, the weight-delta form restores bit-exactly, and the
attribute set's loader names what is wrong."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import make_model
from lens.analysis.value_directions import (
    AttributeEdit,
    LogisticFit,
    SubjectAdd,
    ValueDeltas,
    ahead_from,
    attribute_edits,
    collect_deltas,
    fit_direction,
    fit_logistic,
    flip_rate,
    label_margins,
    ngram_entropy,
    positions_for,
    probe_cases,
    split_by_subject,
    subject_delta,
)
from lens.analysis.rome import EditRequest
from lens.config import EDIT_KINDS, ConfigError, DirectionConfig, InputError, RomeConfig, load_config
from lens.core.arch import get_component
from lens.core.components import out_in_weight, record_sites
from lens.data.attributes import SHIPPED, load_attributes
from lens.interventions import hook_count
from lens.interventions.rome import RankOneEdit

BLOCK = 1


pytestmark = pytest.mark.usefixtures("one_thread")  # many tiny passes


def separable(n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[n, d]`` points whose label is the sign of their projection on a hidden unit direction, with a margin."""
    g = torch.Generator().manual_seed(seed)
    truth = torch.randn(d, generator=g, dtype=torch.float64)
    truth /= truth.norm()
    labels = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    x = x - (x @ truth)[:, None] * truth + (2.0 * labels - 1)[:, None] * (1.0 + torch.rand(n, 1, generator=g, dtype=torch.float64)) * truth
    return x, labels, truth


def test_logistic_regression_separates_separable_deltas_and_finds_their_direction():
    x, y, truth = separable(400, 16, seed=0)
    fit = fit_logistic(x[:200], y[:200], l2=1e-3, steps=200)
    assert fit.accuracy(x[200:], y[200:], 0.95).mean == 1.0
    assert float(fit.weight @ truth) / float(fit.weight.norm()) > 0.95


def test_logistic_regression_on_shuffled_labels_is_at_chance():
    x, y, _ = separable(2000, 16, seed=1)
    shuffled = y[:1000][torch.randperm(1000, generator=torch.Generator().manual_seed(0))]
    accuracy = fit_logistic(x[:1000], shuffled, l2=1e-3, steps=200).accuracy(x[1000:], y[1000:], 0.95)
    assert 0.4 < accuracy.mean < 0.6


def test_logistic_regression_minimises_its_objective():
    x, y, _ = separable(100, 8, seed=2)
    fit = fit_logistic(x, y, l2=0.1, steps=300)
    w = fit.weight.clone().requires_grad_(True)
    b = torch.tensor(fit.bias, dtype=torch.float64, requires_grad=True)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y.double()) + 0.05 * w.pow(2).sum()
    loss.backward()
    assert float(loss.detach()) == pytest.approx(fit.loss, abs=1e-12)
    assert float(w.grad.norm()) < 1e-6 and abs(float(b.grad)) < 1e-6


def test_logistic_regression_needs_both_labels():
    with pytest.raises(InputError, match="both labels"):
        fit_logistic(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), 1e-3, 10)


def test_the_split_by_subject_puts_no_subject_on_both_sides():
    subjects = [name for name in "ABCDEFGHIJ" for _ in range(2)]
    train, test = split_by_subject(subjects, held_out=0.3, seed=3)
    assert sorted(train + test) == list(range(len(subjects)))
    assert not {subjects[i] for i in train} & {subjects[i] for i in test}
    assert len({subjects[i] for i in test}) == 3
    assert split_by_subject(subjects, 0.3, seed=3) == (train, test)
    with pytest.raises(InputError, match="at least 4 subjects"):
        split_by_subject(["A", "A", "B", "B", "C"], 0.3, 0)


def synthetic_values(n_subjects: int, d: int, seed: int) -> ValueDeltas:
    """Two edits per subject sharing ``v`` (as both labels of a subject share the prompt), deltas separable by label."""
    g = torch.Generator().manual_seed(seed)
    edits = [AttributeEdit(f"s{i}", label, EditRequest(f"s{i}", "{} is a", " x")) for i in range(n_subjects) for label in (0, 1)]
    labels = torch.tensor([e.label for e in edits])
    deltas = torch.randn(len(edits), d, generator=g) + 3.0 * (2.0 * labels - 1)[:, None] * torch.eye(d)[0]
    values = torch.randn(n_subjects, d, generator=g).repeat_interleave(2, dim=0)
    return ValueDeltas(1, edits, deltas, values, torch.randn(len(edits), 5, generator=g), [0.0] * len(edits))


def test_fit_direction_generalises_to_held_out_subjects_and_v_alone_is_exactly_chance():
    fitted = fit_direction(synthetic_values(40, 12, seed=4), held_out=0.25, l2=1e-3, steps=200, seed=0, confidence=0.95)
    assert fitted.held_out_accuracy.mean == 1.0 and fitted.held_out_accuracy.n == 20
    assert fitted.baselines["current_value_only"].mean == 0.5, "both labels of a subject share v: no classifier on v can beat chance"
    assert fitted.baselines["shuffled_labels"].mean < 0.85
    assert float(fitted.direction.norm()) == pytest.approx(1.0, abs=1e-6)
    assert fitted.direction[0] > 0.9 and fitted.cosine_mean_difference > 0.9


def test_flip_rate_counts_only_probes_that_preferred_the_other_label():
    before, after = torch.tensor([-1.0, -2.0, 3.0, 0.5]), torch.tensor([1.0, -1.0, 4.0, -0.5])
    towards_one = flip_rate(before, after, +1, 0.95)
    assert (towards_one.mean, towards_one.n) == (0.5, 2)
    towards_zero = flip_rate(before, after, -1, 0.95)
    assert (towards_zero.mean, towards_zero.n) == (0.5, 2)
    assert flip_rate(torch.tensor([1.0]), torch.tensor([2.0]), +1, 0.95) is None


def test_ahead_from_and_ngram_entropy():
    assert ahead_from([0.1, 0.5, 0.2, 0.6, 0.7], [0.2, 0.1, 0.3, 0.1, 0.1]) == 3
    assert ahead_from([0.1, 0.5], [0.2, 0.6]) is None
    assert ngram_entropy([7] * 10, 2) == 0.0
    assert ngram_entropy(list(range(9)), 2) == pytest.approx(math.log2(8))


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "llama"])
def test_steering_adds_exactly_the_vector_to_the_mlp_output_at_the_subject_token_only(family):
    model = make_model(family)
    ids = torch.randint(1, 200, (2, 7))  # [B, T]
    vector = torch.randn(model.config.hidden_size)
    with record_sites(model, ("mlp",), [BLOCK]) as store:
        model(input_ids=ids)
        base = store["mlp"][BLOCK].clone()  # [B, T, d]
    with SubjectAdd(model, BLOCK, vector, [2, 5]), record_sites(model, ("mlp",), [BLOCK]) as store:  # recorded after the edit
        model(input_ids=ids)
        steered = store["mlp"][BLOCK]
    expected = base.clone()
    expected[0, 2] = base[0, 2] + vector
    expected[1, 5] = base[1, 5] + vector
    assert torch.equal(steered, expected)
    assert hook_count(model) == 0
    with pytest.raises(InputError, match="without a KV cache"), SubjectAdd(model, BLOCK, vector, [2]):
        model(input_ids=ids)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_the_weight_delta_writes_the_vector_for_the_subject_key_and_restores_bit_exactly(family):
    model = make_model(family)
    ids = torch.randint(1, 200, (1, 6))
    with record_sites(model, ("mlp_key", "mlp"), [BLOCK]) as store:
        model(input_ids=ids)
        key, base = store["mlp_key"][BLOCK][0, 3].clone(), store["mlp"][BLOCK][0].clone()  # [d_mlp], [T, d]
        keys = torch.randn(500, key.shape[0], generator=torch.Generator().manual_seed(0))
        covariance = keys.T @ keys / 500
        vector = torch.randn(model.config.hidden_size)
        delta = subject_delta(model, BLOCK, key, covariance, vector, "s")
        weight = out_in_weight(get_component(model, BLOCK, "mlp_out"))
        original = weight.detach().clone()
        with RankOneEdit(model, delta):
            model(input_ids=ids)
            edited = store["mlp"][BLOCK][0]
        assert torch.equal(weight, original)
    torch.testing.assert_close(edited[3], base[3] + vector, rtol=1e-4, atol=1e-4)
    assert float(delta.u.double() @ key.double()) == pytest.approx(1.0, abs=1e-5)
    assert delta.details["method"] == "value-direction"


def test_both_edits_of_a_subject_share_its_key_and_value_and_differ_in_their_delta(tokenizer):
    model = make_model("llama")
    attributes = load_attributes()
    edits = attribute_edits(attributes, 4, seed=0)
    assert [e.label for e in edits] == [0, 1] * 4 and all(a.request.prompt == b.request.prompt for a, b in zip(edits[::2], edits[1::2]))
    values = collect_deltas(model, tokenizer, edits, BLOCK, [""], RomeConfig(prefixes=0, steps=2, lr=0.5))
    assert values.deltas.shape == (8, model.config.hidden_size) and values.keys.shape[0] == 8
    assert torch.equal(values.values[0::2], values.values[1::2]) and torch.equal(values.keys[0::2], values.keys[1::2])
    assert (values.deltas[0::2] - values.deltas[1::2]).norm(dim=-1).min() > 0
    with pytest.raises(InputError, match="give 4.."):
        attribute_edits(attributes, 3, seed=0)


def test_label_margins_see_the_steering_at_each_row_and_nothing_else(tokenizer):
    model = make_model("llama")
    cases = probe_cases(tokenizer, load_attributes(), ["Alex", "Jordan"])
    assert [c.text for c in cases[:2]] == ["Alex said that", "Yesterday Alex told me that"]
    before = label_margins(model, tokenizer, cases)
    with SubjectAdd(model, BLOCK, torch.zeros(model.config.hidden_size), positions_for(cases)):
        torch.testing.assert_close(label_margins(model, tokenizer, cases), before, rtol=0, atol=1e-5)
    with SubjectAdd(model, BLOCK, 5 * torch.randn(model.config.hidden_size), positions_for(cases)):
        assert (label_margins(model, tokenizer, cases) - before).abs().max() > 1e-3


def test_the_shipped_attribute_set_loads():
    attributes = load_attributes()
    assert attributes.labels == ("male", "female") and len(attributes.subjects) >= 40
    assert all(len(pair) == 2 for relation in attributes.relations for pair in relation.pairs)


def write_set(tmp_path, **change):
    raw = json.loads(SHIPPED.read_text())
    raw.update(change)
    path = tmp_path / "set.json"
    path.write_text(json.dumps(raw))
    return path


@pytest.mark.parametrize(
    "change, message",
    [
        ({"labels": ["male"]}, "two different values"),
        ({"subjects": ["A", "B", "C", "A"]}, "repeat \\['A'\\]"),
        ({"subjects": ["A", "B", "C"]}, "at least 4 names"),
        ({"relations": [{"prompt": "works as a", "pairs": [[" waiter", " waitress"]]}]}, "exactly one \\{\\}"),
        ({"relations": [{"prompt": "{} works as a", "pairs": [["waiter", " waitress"]]}]}, "must start with exactly one space"),
        ({"relations": [{"prompt": "{} works as a", "pairs": [[" waiter"]]}]}, "must list 2 objects"),
        ({"probes": [{"prompt": "{} said that", "targets": [" he", " he"]}]}, "repeats an object"),
        ({"probes": [{"prompt": "{} said that"}]}, "exactly the keys"),
        ({"relations": []}, "non-empty list"),
    ],
)
def test_a_bad_attribute_set_names_the_fix(tmp_path, change, message):
    with pytest.raises(InputError, match=message):
        load_attributes(write_set(tmp_path, **change))


def test_a_missing_or_broken_attribute_file_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_attributes(tmp_path / "none.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(InputError, match="not valid UTF-8 JSON"):
        load_attributes(broken)
    extra = write_set(tmp_path, colour="red")
    with pytest.raises(InputError, match="exactly the keys"):
        load_attributes(extra)


def test_the_direction_config_loads_as_an_edit_kind_and_needs_a_block_index():
    cfg = load_config(EDIT_KINDS, overrides=["kind=direction", "rome.layer=3"])
    assert isinstance(cfg, DirectionConfig) and cfg.rome.layer == "3"
    with pytest.raises(ConfigError, match="needs rome.layer to be a block index"):
        load_config(EDIT_KINDS, overrides=["kind=direction", "rome.layer=auto"])
    with pytest.raises(ConfigError, match="coefficients"):
        load_config(EDIT_KINDS, overrides=["kind=direction", "coefficients=[0]"])


def test_a_logistic_fit_scores_in_float64():
    fit = LogisticFit(torch.tensor([1.0, -1.0], dtype=torch.float64), 0.5, 0.0)
    assert fit.scores(torch.tensor([[1.0, 2.0]])).tolist() == [-0.5]


def test_the_lens_figure_draws_one_panel_per_reading(tmp_path):
    from lens.analysis.value_directions import LensFlip
    from lens.report.plots import plot_direction_lens

    probs = {"before": [0.1, 0.2, 0.3], "after": [0.1, 0.4, 0.6]}
    readings = [LensFlip(form, 4.0, sign, ["A said that"], [True], probs, probs, {"before": [None], "after": [2]}, {"before": [None], "after": [1]})
                for form in ("steering vector", "weight delta") for sign in (1, -1)]
    assert readings[0].median_layer("top1_from", "after") == 2.0 and readings[0].median_layer("top1_from", "before") is None
    path = plot_direction_lens(readings[:3], ["male", "female"], tmp_path / "lens.png", "title")
    assert path.stat().st_size > 10_000 and path.read_bytes()[:4] == b"\x89PNG"


def test_reused_values_must_match_the_configured_edits(tmp_path):
    from safetensors.torch import save_file

    from lens.runs.direction import saved_values

    edits = attribute_edits(load_attributes(), 4, seed=0)
    tensors = {"deltas": torch.randn(8, 6), "values": torch.randn(8, 6), "keys": torch.randn(8, 10), "labels": torch.tensor([0, 1] * 4),
               "final_nll": torch.rand(8)}
    save_file(tensors, tmp_path / "values.safetensors")
    values = saved_values(str(tmp_path / "values.safetensors"), edits, 1, 6)
    assert torch.equal(values.deltas, tensors["deltas"]) and values.subjects[:2] == [edits[0].subject] * 2
    with pytest.raises(InputError, match="same model, subjects"):
        saved_values(str(tmp_path / "values.safetensors"), edits, 1, 7)
    save_file({k: v for k, v in tensors.items() if k != "final_nll"}, tmp_path / "old.safetensors")
    with pytest.raises(InputError, match="lacks \\['final_nll'\\]"):
        saved_values(str(tmp_path / "old.safetensors"), edits, 1, 6)
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(InputError, match="cannot be read"):
        saved_values(str(tmp_path / "junk.safetensors"), edits, 1, 6)


def test_the_direction_run_writes_its_files_and_reuses_its_edits(tokenizer, corpus_file, tmp_path, monkeypatch):
    """``lens edit kind=direction`` end to end on a tiny model: its files, edits in label pairs split by
    subject, every (coefficient, sign, form) applied, and ``values_from`` reproducing the fit exactly."""
    from lens.cli import main

    monkeypatch.setenv("LENS_CACHE", str(tmp_path / "cache"))
    make_model("llama").save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    attributes = {
        "attribute": "animal", "source": "test", "labels": ["fox", "dog"],
        "subjects": ["Packages", "Love", "The server", "A lens", "Anger", "The quick"],
        "relations": [{"prompt": "{} jumps over the", "pairs": [[" fox", " dog"], [" apt", " lens"]]}],
        "probes": [{"prompt": "{} reads the", "targets": [" fox", " dog"]}],
    }
    attributes_file = tmp_path / "attributes.json"
    attributes_file.write_text(json.dumps(attributes), encoding="utf-8")
    common = [
        "kind=direction", f"model.name={tmp_path / 'model'}", f"output_dir={tmp_path / 'out'}", "lens=logit",
        f"data.dataset={corpus_file}", "data.seq_len=32", "data.batch_size=2", "data.eval_percent=20", "rome.layer=1",
        "rome.prefixes=1", "rome.prefix_tokens=3", "rome.steps=5", "rome.covariance_tokens=200", f"attributes_path={attributes_file}",
        "subjects=6", "held_out=0.34", "coefficients=[0.5,2.0]", "sequences=2", "max_new_tokens=3", "fit_steps=50",
    ]
    main(["edit", *common, "run_name=first"])
    first = tmp_path / "out" / "first"
    assert {p.name for p in first.iterdir()} <= {"values.safetensors", "summary.json", "direction_lens.png"}
    assert {"values.safetensors", "summary.json"} <= {p.name for p in first.iterdir()}
    summary = json.loads((first / "summary.json").read_text())
    edits = summary["per_edit"]
    assert summary["edits"] == len(edits) == 12 and summary["block"] == 1
    by_subject: dict[str, list[dict]] = {}
    for edit in edits:
        by_subject.setdefault(edit["subject"], []).append(edit)
    assert len(by_subject) == 6
    for pair in by_subject.values():  # one edit per label, both on the same side of the split
        assert sorted(e["label"] for e in pair) == ["dog", "fox"] and pair[0]["held_out"] == pair[1]["held_out"]
    held_out = sum(e["held_out"] for e in edits)
    assert summary["fit"]["held_out_rows"] == held_out and summary["fit"]["train_rows"] == 12 - held_out
    forms = {(a["form"], a["coefficient"], a["sign"]) for a in summary["applications"]}
    assert forms == {(f, c, s) for f in ("steering vector", "weight delta", "steering vector, random direction (control)")
                     for c in (0.5, 2.0) for s in (1, -1)}

    main(["edit", *common, "run_name=second", f"values_from={first / 'values.safetensors'}"])
    again = json.loads((tmp_path / "out" / "second" / "summary.json").read_text())
    assert again["fit"] == summary["fit"] and again["applications"] == summary["applications"]
