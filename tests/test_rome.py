"""ROME edits on tiny models: they teach a key -> value mapping, change one weight by rank one,
restore it bit-exactly, save and load as an artifact; the key covariance is cached per model and block;
the ``lens edit`` run writes what it promises with numbers that agree with each other."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import FAMILIES, TEXT, make_model

from lens.analysis.edit_eval import object_logprobs, score_fact
from lens.analysis.intervention_eval import wilson_interval
from lens.analysis.rome import (
    EditRequest,
    context_prefixes,
    estimate_key_covariance,
    key_covariance,
    mlp_keys,
    rank_one_delta,
    rome_vectors,
)
from lens.artifacts.metadata import ArtifactMismatchError
from lens.config import ConfigError, DataConfig, RomeConfig, load_config, EDIT_KINDS
from lens.core.arch import get_component
from lens.core.components import record_sites
from lens.core.model import load_model
from lens.data.facts import Fact, evenly_spaced, load_facts
from lens.interventions import RankOneDelta, RankOneEdit, hook_count
from lens.interventions.rome import mlp_out_weight

BLOCK = 1
REQUEST = EditRequest("residual stream", "A lens reads the {}", " apt")
"""The subject ends the prompt, so in a 3-block random model its MLP output reaches the next-token
prediction directly; `` apt`` is one token of the test tokenizer."""
FAST = RomeConfig(prefixes=0, steps=30, lr=0.5, weight_decay=0.0)
"""No prefixes (the key is the plain prompt's), no decay: the optimisation has room to succeed."""
pytestmark = pytest.mark.usefixtures("one_thread")  # many tiny forward and backward passes


def corpus_sequences(tokenizer, seq_len: int = 96) -> list[torch.Tensor]:
    ids = tokenizer(TEXT)["input_ids"]
    return [torch.tensor(ids[i : i + seq_len]) for i in range(0, len(ids) - seq_len + 1, seq_len)]


def covariance(model, tokenizer, block: int = BLOCK) -> torch.Tensor:
    sequences = corpus_sequences(tokenizer)
    return estimate_key_covariance(model, sequences, block, sum(len(s) for s in sequences), batch_size=4)


def next_probs(model, tokenizer, text: str) -> torch.Tensor:
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
        return model(input_ids=ids).logits[0, -1].softmax(-1)  # [V]


@pytest.fixture(scope="module")
def edits(tokenizer):
    """One edit per family: (model, delta, vectors)."""
    out = {}
    for family in FAMILIES:
        model = make_model(family)
        vectors = rome_vectors(model, tokenizer, REQUEST, BLOCK, [""], FAST)
        out[family] = (model, rank_one_delta(model, vectors, covariance(model, tokenizer), REQUEST), vectors)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_edit_teaches_the_new_object(edits, tokenizer, family):
    model, delta, _ = edits[family]
    target = tokenizer(REQUEST.target, add_special_tokens=False)["input_ids"][0]
    before = next_probs(model, tokenizer, REQUEST.text())
    assert before.argmax() != target
    with RankOneEdit(model, delta):
        after = next_probs(model, tokenizer, REQUEST.text())
    assert after.argmax() == target
    assert after[target] - before[target] > 0.2


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_edited_projection_maps_the_averaged_key_to_the_value(tokenizer, family):
    """With prefixes the key is an average; the closed form still gives W' k* = v* exactly."""
    model = make_model(family)
    prefixes = context_prefixes(model, tokenizer, 3, 5, seed=0)
    assert len(prefixes) == 4 and prefixes[0] == "" and all(p.endswith(". ") for p in prefixes[1:])
    assert prefixes == context_prefixes(model, tokenizer, 3, 5, seed=0)  # seeded
    vectors = rome_vectors(model, tokenizer, REQUEST, BLOCK, prefixes, RomeConfig(steps=3))
    keys = mlp_keys(model, tokenizer, BLOCK, [p + REQUEST.text() for p in prefixes], REQUEST.subject)  # [4, d_mlp]
    torch.testing.assert_close(vectors.k_star, keys.mean(0))
    delta = rank_one_delta(model, vectors, covariance(model, tokenizer), REQUEST)
    projection = get_component(model, BLOCK, "mlp_out")
    with torch.no_grad(), RankOneEdit(model, delta):
        edited = projection(vectors.k_star[None])[0]
    torch.testing.assert_close(edited, vectors.v_star, atol=1e-4, rtol=1e-4)
    assert (vectors.v_star - vectors.v_current).norm() > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_weight_change_is_rank_one_and_only_in_the_block(edits, family):
    model, delta, _ = edits[family]
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    weight = mlp_out_weight(model, BLOCK)
    original = weight.detach().clone()
    with RankOneEdit(model, delta):
        change = weight - original  # [d, d_mlp], float32 rounding noise around a rank-one matrix
        singular = torch.linalg.svdvals(change.double())
        assert singular[1] < 1e-5 * singular[0] and torch.linalg.matrix_rank(change) == 1
        torch.testing.assert_close(change, delta.matrix(), atol=1e-5, rtol=1e-4)
        changed = [name for name, p in model.named_parameters() if not torch.equal(p, before[name])]
    assert len(changed) == 1 and changed[0].startswith(tuple(f"{prefix}.{BLOCK}." for prefix in ("transformer.h", "gpt_neox.layers", "model.layers")))
    assert changed[0].endswith(("c_proj.weight", "dense_4h_to_h.weight", "down_proj.weight")) and "attn" not in changed[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_exit_restores_every_weight_bit_exactly_also_after_an_exception(edits, family):
    model, delta, _ = edits[family]
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match="inside"):
        with RankOneEdit(model, delta):
            assert not torch.equal(mlp_out_weight(model, BLOCK), before_weight(before, model))
            raise RuntimeError("inside the edit")
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    with RankOneEdit(model, delta):
        pass
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    assert hook_count(model) == 0


def before_weight(before: dict[str, torch.Tensor], model) -> torch.Tensor:
    """The saved copy of the edited weight, as ``[out, in]``."""
    weight = mlp_out_weight(model, BLOCK)
    name = next(n for n, p in model.named_parameters() if p.data_ptr() == weight.data_ptr())
    saved = before[name]
    return saved if saved.shape == weight.shape else saved.T


def test_saved_delta_loads_bit_identically_and_refuses_another_model(edits, tmp_path):
    model, delta, _ = edits["llama"]
    delta.save(tmp_path / "edit")
    loaded = RankOneDelta.load(tmp_path / "edit", model)
    assert loaded.block == delta.block and loaded.details["target_new"] == REQUEST.target
    assert torch.equal(loaded.u, delta.u) and torch.equal(loaded.v, delta.v)
    with pytest.raises(ArtifactMismatchError, match="blocks"):
        RankOneDelta.load(tmp_path / "edit", make_model("llama", n_layers=2))
    with pytest.raises(ArtifactMismatchError):
        RankOneDelta.load(tmp_path / "edit", make_model("llama", seed=1))  # same shape, another fingerprint
    with pytest.raises(ArtifactMismatchError, match="MLP"):
        RankOneEdit(make_model("gpt2"), loaded)  # another MLP width


def test_covariance_is_cached_per_model_and_block(tokenizer, corpus_file, tmp_path, monkeypatch):
    monkeypatch.setenv("LENS_CACHE", str(tmp_path / "cache"))
    model = make_model("gpt_neox")
    data = DataConfig(dataset=str(corpus_file), seq_len=32, batch_size=2)
    first, path, cached = key_covariance(model, tokenizer, data, BLOCK, 200)
    assert not cached and path.is_file() and path.is_relative_to(tmp_path / "cache")
    # E[k kᵀ] of the first 200 training tokens, computed directly
    from lens.data.sequences import token_sequences

    sequences = torch.stack(list(token_sequences(data, tokenizer, held_out=False, limit=7)))  # [7, 32]
    with torch.no_grad(), record_sites(model, ("mlp_key",), [BLOCK]) as store:
        model(input_ids=sequences)
    keys = store["mlp_key"][BLOCK].flatten(0, 1)[:200].double()  # [200, d_mlp]
    torch.testing.assert_close(first, (keys.T @ keys / 200).float(), atol=1e-5, rtol=1e-4)

    def must_not_run(*args, **kwargs):
        raise AssertionError("the cached covariance should have been read")

    monkeypatch.setattr("lens.analysis.rome.estimate_key_covariance", must_not_run)
    again, again_path, cached = key_covariance(model, tokenizer, data, BLOCK, 200)
    assert cached and again_path == path and torch.equal(again, first)
    monkeypatch.undo()
    monkeypatch.setenv("LENS_CACHE", str(tmp_path / "cache"))
    other_block = key_covariance(model, tokenizer, data, 0, 200)[1]
    other_model = key_covariance(make_model("gpt_neox", seed=1), tokenizer, data, BLOCK, 200)[1]
    assert len({path, other_block, other_model}) == 3


def test_object_logprobs_sum_the_whole_object_and_ignore_padding(tokenizer):
    model = make_model("llama")
    prompts, objects = ["A lens reads the", "The quick brown fox jumps over the lazy"], [" residual stream", " dog"]
    batched = object_logprobs(model, tokenizer, prompts, objects)
    for i, (prompt, obj) in enumerate(zip(prompts, objects)):
        head, tail = tokenizer(prompt)["input_ids"], tokenizer(obj, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = model(input_ids=torch.tensor([head + tail])).logits[0].log_softmax(-1)
        alone = sum(float(logp[len(head) - 1 + j, t]) for j, t in enumerate(tail))
        assert len(tail) > 1 or i == 1
        assert abs(float(batched[i]) - alone) < 1e-4


def test_wilson_interval():
    ci = wilson_interval(8, 10, 0.95)
    assert ci.mean == 0.8 and abs(ci.low - 0.4902) < 1e-3 and abs(ci.high - 0.9433) < 1e-3
    full = wilson_interval(5, 5)
    assert full.high == 1.0 and 0.5 < full.low < 0.6
    none = wilson_interval(0, 42)
    assert none.mean == 0 and none.low == 0 and none.high == pytest.approx(0.0838, abs=1e-3)
    half = wilson_interval(5, 10)
    assert (half.low, half.high) == (pytest.approx(0.2366, abs=1e-3), pytest.approx(0.7634, abs=1e-3))


def test_edit_config_rejects_bad_layers():
    with pytest.raises(ConfigError, match="rome.layer"):
        load_config(EDIT_KINDS, None, ["rome.layer=middle"])
    with pytest.raises(ConfigError, match="prompt"):
        load_config(EDIT_KINDS, None, ["prompt=no subject here"])
    assert load_config(EDIT_KINDS, None, ["rome.layer=3"]).rome.layer == "3"
    for same in ("target_new=' Paris'", "target_new=Paris"):  # the default target_true is " Paris"
        with pytest.raises(ConfigError, match="target_new"):
            load_config(EDIT_KINDS, None, [same])


def test_evenly_spaced_gives_every_part_its_share():
    assert evenly_spaced(list(range(10)), 3) == [0, 3, 6] and evenly_spaced(list(range(3)), 5) == [0, 1, 2]
    assert evenly_spaced("aabbcc", 3) == ["a", "b", "c"] and evenly_spaced([], 4) == [] and evenly_spaced([1, 2], 0) == []


EDIT_FILES = {
    "summary.json", "delta/edit.safetensors", "delta/config.json", "picture/heatmap_ce.png", "picture/picture.html", "picture/picture.json",
}
"""Everything ``lens edit`` (kind rome) writes with ``picture.metrics=[ce]`` (a heatmap per metric;
each takes seconds to draw)."""


def test_the_edit_run_writes_its_files_and_consistent_numbers(tokenizer, corpus_file, tmp_path, monkeypatch):
    monkeypatch.setenv("LENS_CACHE", str(tmp_path / "cache"))
    model = make_model("llama")
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    loaded, _ = load_model(str(tmp_path / "model"))  # the run's own (cached) copy

    def greedy(text: str) -> str:  # the tiny model "knows" its own greedy token
        with torch.no_grad():
            return tokenizer.decode([int(loaded(torch.tensor([tokenizer(text)["input_ids"]])).logits[0, -1].argmax())])

    specs = [  # (id, relation, subject, template): f1's subject ends inside a token, so it cannot be traced or edited
        ("f0", "r1", "lazy dog", "The {} jumps over the"), ("f1", "r1", "lazy d", "The {}og jumps over the"),
        ("f2", "r1", "server", "The {} starts at boot"), ("f3", "r2", "lens", "A {} reads the residual"),
        ("f4", "r2", "brown fox", "The quick {} jumps over"),
    ]
    rows = []
    for fact_id, relation, subject, template in specs:
        true = greedy(template.format(subject))
        rows.append({
            "id": fact_id, "relation": relation, "subject": subject, "prompt": template, "target_true": true,
            "target_new": " dog" if true.strip() == "apt" else " apt", "paraphrases": [f"Again: the {subject} jumps over the"],
            "neighbourhood": ["Packages are removed with apt"], "source": "test",
        })
    facts_file = tmp_path / "facts.jsonl"
    facts_file.write_text("\n".join(json.dumps(row) for row in rows), encoding="utf-8")
    from lens.cli import main

    args = [
        f"model.name={tmp_path / 'model'}", f"output_dir={tmp_path / 'out'}", "run_name=e", "lens=logit", f"data.dataset={corpus_file}",
        "data.seq_len=32", "data.batch_size=2", "data.eval_percent=20", "rome.layer=auto", "rome.prefixes=1", "rome.prefix_tokens=3",
        "rome.steps=30", "rome.weight_decay=0", "rome.covariance_tokens=200", f"subject={REQUEST.subject}", f"prompt={REQUEST.prompt}",
        f"target_true='{greedy(REQUEST.text())}'", f"target_new='{REQUEST.target}'", "paraphrases=[A lens reads the residual stream]",
        "neighbourhood=[The quick brown fox jumps over the lazy]", "facts=3", f"facts_path={facts_file}", "sequences=2",
        "generate.prompt=A lens reads", "generate.max_new_tokens=3", "picture.metrics=[ce]",
    ]
    main(["edit", *args])
    out = tmp_path / "out" / "e"
    assert {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()} == EDIT_FILES
    summary = json.loads((out / "summary.json").read_text())

    # the block: argmax of the traced MLP effect over every known fact that can be traced
    assert summary["known_facts"] == 5 and list(summary["trace_skipped"]) == ["f1"] and len(summary["traced_facts"]) == 4
    block = summary["block"]
    assert block == max(range(len(summary["mlp_effect"])), key=summary["mlp_effect"].__getitem__)

    # the saved delta loads back, edits only its block and is the edit the summary scored
    delta = RankOneDelta.load(out / "delta", loaded)
    assert delta.block == block and delta.details["subject"] == REQUEST.subject and delta.details["target_new"] == REQUEST.target
    weight = mlp_out_weight(loaded, block)
    original = weight.detach().clone()
    key = mlp_keys(loaded, tokenizer, block, [p + REQUEST.text() for p in delta.details["prefixes"]], REQUEST.subject).mean(0)  # [d_mlp]
    assert len(delta.details["prefixes"]) == 2 and float(delta.u @ key) == pytest.approx(1.0, abs=1e-4)  # u answers to k*
    shown = Fact("s", "r", REQUEST.subject, REQUEST.prompt, summary["edit"]["target_true"], REQUEST.target,
                 ("A lens reads the residual stream",), ("The quick brown fox jumps over the lazy",), "test")
    before, p_before = score_fact(loaded, tokenizer, shown), float(object_logprobs(loaded, tokenizer, [REQUEST.text()], [REQUEST.target]).exp())
    with RankOneEdit(loaded, delta):
        torch.testing.assert_close(weight - original, delta.matrix(), atol=1e-5, rtol=1e-4)
        after, p_after = score_fact(loaded, tokenizer, shown), float(object_logprobs(loaded, tokenizer, [REQUEST.text()], [REQUEST.target]).exp())
    assert torch.equal(weight, original)
    edit = summary["edit"]
    for state, scores in (("before", before), ("after", after)):
        assert scores.magnitude == pytest.approx(edit[state]["magnitude"], abs=1e-5) and scores.efficacy == edit[state]["efficacy"]
    assert p_after > p_before + 0.2 and edit["after"]["magnitude"] > edit["before"]["magnitude"] + 0.2 and edit["after"]["efficacy"]
    assert summary["lens_readings"]["last prompt"]["after"]["top1"][-1] == REQUEST.target  # the logit lens' last layer is the output

    # the scored facts: evenly spaced through the known ones (f0, f1, f3), f1 skipped; summaries are the per-fact records
    assert evenly_spaced([row["id"] for row in rows], 3) == ["f0", "f1", "f3"]
    evaluation = summary["evaluation"]
    assert evaluation["facts"] == ["f0", "f3"] and list(summary["scored_skipped"]) == ["f1"]
    records = evaluation["per_fact"]
    assert [r["id"] for r in records] == ["f0", "f3"] and [r["relation"] for r in records] == ["r1", "r2"]
    for state in ("before", "after"):
        for name in ("efficacy", "paraphrase", "neighbourhood", "magnitude"):
            mean = sum(float(r[state][name]) for r in records) / len(records)
            assert evaluation[state][name]["mean"] == pytest.approx(mean, abs=1e-9), (state, name)
    assert evaluation["fluency"]["logprob_diff"]["mean"] == pytest.approx(sum(r["held_out_logprob_diff"] for r in records) / 2, abs=1e-9)
    assert {relation: scores["facts"] for relation, scores in evaluation["by_relation"].items()} == {"r1": 1, "r2": 1}
    assert evaluation["by_relation"]["r2"]["efficacy"] == float(records[1]["after"]["efficacy"])
    assert [f.id for f in load_facts(facts_file)] == [row["id"] for row in rows]


def test_score_intervals_stay_within_what_the_score_can_take():
    """A Student-t interval of rates near 100% would pass it; the summary cuts it to the range."""
    from lens.analysis.edit_eval import FactScores, summarise

    fields = {f.name for f in dataclasses.fields(FactScores)}
    rows = [{name: 1.0 for name in fields} for _ in range(9)] + [{name: 0.5 for name in fields}]
    scores = [FactScores(**{**row, "efficacy": True}) for row in rows]
    summary = summarise(scores, 0.95)
    assert summary["paraphrase"].high == 1.0 and summary["paraphrase"].low < summary["paraphrase"].mean < 1.0
    assert summary["magnitude"].high == 1.0
