"""Causal tracing on the tiny models: zero noise recovers everything, restoring a whole residual
recovers the clean probability, states before the subject carry nothing, seeds, bad subjects, hooks."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import make_model, make_tokenizer
from lens.analysis.tracing import (
    LensReading,
    corrupt,
    mean_effect_at_last_subject,
    read_runs,
    subject_span,
    trace_corruption,
    trace_fact,
    trace_facts,
    window_blocks,
)
from lens.analysis.known_facts import known_facts
from lens.config import InputError
from lens.core.arch import get_unembed
from lens.core.model import load_model
from lens.core.translators import logit_lens_for
from lens.data.facts import Fact, load_facts
from lens.interventions import hook_count

PROMPT = "The lazy dog jumps over the"
SUBJECT = "lazy dog"
ATOL = 1e-6
pytestmark = pytest.mark.usefixtures("one_thread")  # hundreds of tiny forward passes


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def test_subject_span_covers_exactly_the_subject(tok):
    ids, (start, end) = subject_span(tok, PROMPT, SUBJECT)
    assert start > 0, "the tests below need tokens before the subject"
    assert tok.decode(ids[start:end]).strip() == SUBJECT
    assert tok.decode(ids[:start]).strip() == "The" and tok.decode(ids[end:]).strip() == "jumps over the"


@pytest.mark.parametrize("subject, fix", [("cat", "does not occur in prompt"), ("lazy d", "give subject='lazy do'"), ("he lazy", "give subject='The lazy'")])
def test_a_bad_subject_is_an_input_error_naming_the_fix(tok, subject, fix):
    model = make_model("llama")
    with pytest.raises(InputError, match=fix):
        trace_fact(model, tok, PROMPT, subject)
    assert hook_count(model) == 0


def test_zero_noise_recovers_the_clean_probability_everywhere(tok, family):
    model = make_model(family)
    trace = trace_fact(model, tok, PROMPT, SUBJECT, noise=0.0, samples=2, window=2)
    assert set(trace.scores) == {"block_out", "mlp", "attention", "mlp_window", "attention_window"}
    assert trace.corrupted_prob == pytest.approx(trace.clean_prob, abs=ATOL)
    for kind, scores in trace.scores.items():
        assert scores.shape == (len(trace.tokens), 3)
        torch.testing.assert_close(scores, torch.full_like(scores, trace.clean_prob), rtol=0, atol=ATOL, msg=kind)
    assert hook_count(model) == 0


def test_restoring_a_whole_residual_recovers_the_clean_probability(tok, family):
    model = make_model(family)
    c = corrupt(model, tok, PROMPT, SUBJECT, noise=3.0, samples=3, seed=1)
    corrupted = float(c.probs(model, [{}])[0])
    assert corrupted == pytest.approx(c.corrupted_prob, abs=ATOL)
    assert abs(corrupted - c.clean_prob) > 1e-3, "the noise must change the prediction for this test to mean anything"
    every_token = range(len(c.input_ids))
    restored = c.probs(model, [{("block_out", block): every_token} for block in range(3)])  # [3]
    torch.testing.assert_close(restored, torch.full((3,), c.clean_prob), rtol=0, atol=ATOL)
    # the last block's residual at the last token alone is the whole output
    assert float(c.probs(model, [{("block_out", 2): [len(c.input_ids) - 1]}])[0]) == pytest.approx(c.clean_prob, abs=ATOL)


def test_states_before_the_subject_carry_nothing(tok, family):
    model = make_model(family)
    trace = trace_fact(model, tok, PROMPT, SUBJECT, samples=3, window=2)
    start, _ = trace.subject_span
    assert abs(trace.corrupted_prob - trace.clean_prob) > 1e-3
    for kind, scores in trace.scores.items():
        torch.testing.assert_close(scores[:start], torch.full_like(scores[:start], trace.corrupted_prob), rtol=0, atol=ATOL, msg=kind)
        assert (trace.indirect_effect(kind)[:start].abs() < ATOL).all()
    # restoring the subject's own residual after the last block touches only that position's output
    assert trace.scores["block_out"][trace.last_subject, -1] == pytest.approx(trace.corrupted_prob, abs=ATOL)
    assert trace.scores["block_out"][-1, -1] == pytest.approx(trace.clean_prob, abs=ATOL)


def test_starting_at_the_first_restored_block_changes_nothing(tok, family):
    """A batch that restores only blocks >= b starts at block b from the corrupted run's residual; a
    batch holding an empty plan runs every block: both give the same probabilities."""
    model = make_model(family)
    c = corrupt(model, tok, PROMPT, SUBJECT, samples=3)
    plans = [{("mlp", 2): [c.last_subject]}, {("attention", 1): [c.last_subject], ("block_out", 2): [2]}]
    skipped = c.probs(model, plans)  # starts at block 1
    full = c.probs(model, [*plans, {}])[:2]  # starts at block 0
    torch.testing.assert_close(skipped, full, rtol=0, atol=ATOL)
    assert not torch.allclose(full, torch.full_like(full, float(c.probs(model, [{}])[0])), atol=1e-4)
    assert hook_count(model) == 0 and model.config.num_hidden_layers == 3


def test_seeds_make_traces_reproducible(tok):
    model = make_model("gpt2")
    a = trace_fact(model, tok, PROMPT, SUBJECT, samples=2, seed=5, kinds=["mlp"], window=1)
    b = trace_fact(model, tok, PROMPT, SUBJECT, samples=2, seed=5, kinds=["mlp"], window=1)
    other = corrupt(model, tok, PROMPT, SUBJECT, samples=2, seed=6)
    assert list(a.scores) == ["mlp"] and torch.equal(a.scores["mlp"], b.scores["mlp"]) and a.corrupted_prob == b.corrupted_prob
    assert other.corrupted_prob != a.corrupted_prob


def test_window_scores_restore_the_clipped_window(tok):
    assert list(window_blocks(0, 10, 3)) == [0, 1, 2] and list(window_blocks(15, 10, 30)) == list(range(10, 20))
    assert list(window_blocks(29, 10, 30)) == list(range(24, 30)) and list(window_blocks(4, 1, 30)) == [4]
    model = make_model("llama")
    c = corrupt(model, tok, PROMPT, SUBJECT, samples=2)
    trace = trace_corruption(model, c, kinds=["attention"], window=2)
    t = trace.last_subject
    expected = c.probs(model, [{("attention", 0): [t], ("attention", 1): [t]}])[0]  # window of 2 centred on block 1
    assert trace.scores["attention_window"][t, 1] == pytest.approx(float(expected), abs=ATOL)
    assert trace.scores["attention_window"][t, 1] != pytest.approx(float(trace.scores["attention"][t, 1]), abs=1e-4)


def test_positions_limit_the_trace_and_effects_average(tok):
    model = make_model("gpt_neox")
    c = corrupt(model, tok, PROMPT, SUBJECT, samples=2)
    trace = trace_corruption(model, c, kinds=["mlp"], window=1, positions=[c.last_subject])
    traced = ~trace.scores["mlp"].isnan()
    assert traced[c.last_subject].all() and traced.sum() == 3
    other = trace_fact(model, tok, "The quick lazy dog jumps", SUBJECT, samples=2, kinds=["mlp"], window=1)
    mean = mean_effect_at_last_subject([trace, other], "mlp")
    manual = (trace.indirect_effect("mlp")[trace.last_subject] + other.indirect_effect("mlp")[other.last_subject]) / 2
    torch.testing.assert_close(mean, manual)
    json.dumps(trace.to_json(), allow_nan=False)
    with pytest.raises(InputError, match="positions"):
        trace_corruption(model, c, positions=[99])


def test_trace_facts_spreads_the_choice_and_skips_subjects_off_token_boundaries(tok):
    model = make_model("llama")
    specs = [("lazy dog", "The {} jumps over the"), ("lazy d", "The {}og jumps over the"), ("server", "The {} starts at boot"), ("lens", "A {} reads the")]
    facts = [Fact(f"f{i}", "r", subject, template, " the", " apt", (f"{subject}?",), ("other",), "test") for i, (subject, template) in enumerate(specs)]
    traces, skipped = trace_facts(model, tok, facts, 2, samples=2)  # facts 0 and 2
    assert [t.subject for t in traces] == ["lazy dog", "server"] and skipped == {}
    traces, skipped = trace_facts(model, tok, facts, 4, samples=2, kinds=["mlp", "attention"], positions="both")
    assert [t.subject for t in traces] == ["lazy dog", "server", "lens"] and list(skipped) == ["f1"] and "token boundaries" in skipped["f1"]
    for trace in traces:
        traced = sorted({trace.last_subject, len(trace.tokens) - 1})
        assert set(trace.scores) == {"mlp", "attention"} and (~trace.scores["mlp"].isnan()).any(1).nonzero().flatten().tolist() == traced
    alone = trace_fact(model, tok, facts[2].text(), "server", " the", samples=2, kinds=["mlp"], window=1)
    rows = [alone.last_subject, len(alone.tokens) - 1]
    torch.testing.assert_close(traces[1].scores["mlp"][rows], alone.scores["mlp"][rows], rtol=0, atol=ATOL)
    with pytest.raises(InputError, match="positions"):
        trace_facts(model, tok, facts, 1, positions="first")  # type: ignore[arg-type]


def test_no_hook_is_left_behind_after_an_error(tok, monkeypatch):
    model = make_model("llama")
    c = corrupt(model, tok, PROMPT, SUBJECT, samples=2)
    with pytest.raises(InputError, match="out of range"):
        c.probs(model, [{("mlp", 7): [0]}])  # fails after the noise hook is in place
    assert hook_count(model) == 0

    def broken(*args, **kwargs):
        raise RuntimeError("unembedding failed")

    monkeypatch.setattr(get_unembed(model), "forward", broken)
    with pytest.raises(RuntimeError, match="unembedding failed"):
        c.probs(model, [{("mlp", 1): [c.last_subject]}])  # fails mid-forward, with every hook in place
    assert hook_count(model) == 0


def test_lens_reading_of_the_traced_runs(tok):
    model = make_model("gpt2")
    c = corrupt(model, tok, PROMPT, SUBJECT, samples=3)
    last = len(c.input_ids) - 1
    runs = {"clean": None, "corrupted": {}, "restored": {("block_out", 1): list(range(last + 1))}}
    readings = read_runs(model, tok, logit_lens_for(model), c, runs, [c.last_subject, last])
    final = {r.run: r.prob[-1] for r in readings if r.position == last}
    corrupted = float(c.probs(model, [{}])[0])
    assert final["clean"] == pytest.approx(c.clean_prob, abs=1e-5) and final["restored"] == pytest.approx(c.clean_prob, abs=1e-5)
    assert final["corrupted"] == pytest.approx(corrupted, abs=1e-5)
    assert hook_count(model) == 0
    reading = LensReading("x", 0, "a", [0.1, 0.5, 0.2, 0.6], ["b", "a", "c", "a"], [False, True, False, True])
    assert reading.top1_from == 3 and reading.first_top1 == 1
    assert LensReading("x", 0, "a", [0.1, 0.5], ["a", "b"], [True, False]).top1_from is None


def test_the_trace_run_writes_its_figures_pages_and_numbers(tok, tmp_path):
    model = make_model("llama")
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    prompts = [("lazy dog", "The {} jumps over the"), ("server", "The {} starts at boot"), ("lens", "A {} reads the residual")]
    rows = []
    for i, (subject, template) in enumerate(prompts):
        ids = torch.tensor([tok(template.format(subject))["input_ids"]])
        greedy = tok.decode([int(model(ids).logits[0, -1].argmax())])  # the tiny model "knows" its own greedy token
        rows.append({
            "id": f"f{i}", "relation": "r", "subject": subject, "prompt": template, "target_true": greedy, "target_new": greedy + "x",
            "paraphrases": [f"{subject} again"], "neighbourhood": ["another one"], "source": "test",
        })
    facts_file = tmp_path / "facts.jsonl"
    facts_file.write_text("\n".join(json.dumps(row) for row in rows), encoding="utf-8")
    from lens.cli import main

    args = [f"model.name={tmp_path / 'model'}", f"output_dir={tmp_path / 'out'}", "run_name=t", "lens=logit", f"prompt={PROMPT}",
            f"subject={SUBJECT}", "samples=2", "window=2", "facts=2", "fact_samples=2", f"facts_path={facts_file}"]
    main(["trace", *args])
    out = tmp_path / "out" / "t"
    assert {p.name for p in out.iterdir()} >= {"trace.png", "trace.html", "trace.json", "lens_reading.json", "lens_reading.png", "facts.json", "facts.png"}
    saved = json.loads((out / "trace.json").read_text())
    loaded, _ = load_model(str(tmp_path / "model"))  # the run's own (cached) copy: attention kernels may differ from the built one
    expected = trace_fact(loaded, tok, PROMPT, SUBJECT, samples=2, window=2)
    assert saved["clean_prob"] == pytest.approx(expected.clean_prob, abs=1e-6) and saved["target"] == expected.target
    torch.testing.assert_close(torch.tensor(saved["scores"]["mlp_window"]), expected.scores["mlp_window"], rtol=0, atol=1e-6)
    reading = json.loads((out / "lens_reading.json").read_text())["readings"]
    clean_final = next(r for r in reading if r["run"] == "clean" and r["position"] == len(expected.tokens) - 1)
    assert clean_final["prob"][-1] == pytest.approx(expected.clean_prob, abs=1e-5)
    facts = json.loads((out / "facts.json").read_text())
    known = known_facts(loaded, tok, load_facts(facts_file))
    assert len(known) == 3 and facts["known"] == 3 and len(facts["traced"]) == 2 and not facts["skipped"]
    for at in ("last_subject", "last"):
        assert set(facts["effects"][at]) == set(expected.scores) and all(len(v) == 3 for v in facts["effects"][at].values())
    page = (out / "trace.html").read_text()
    assert "lens-data" in page and "mlp_window" in page and "</script>" in page


def test_the_trace_page_draws_every_cell_and_hovers(tok, tmp_path):
    from test_html_browser import BROWSER, dump_dom, texts_of

    if BROWSER is None:
        pytest.skip("no headless browser")
    from lens.report.html import write_grid_html
    from lens.runs.trace import trace_grids

    trace = trace_fact(make_model("gpt2"), tok, PROMPT, SUBJECT, samples=2, kinds=["mlp"], window=1)
    page = write_grid_html(trace_grids(trace), tmp_path / "trace.html", title="a <b>trace</b>", note="note & more")
    probe = """<script>window.addEventListener("load", () => {
      const cell = document.querySelector("td.cell");
      cell.dispatchEvent(new MouseEvent("mousemove", {bubbles: true, clientX: 5, clientY: 5}));
      const out = document.createElement("pre"); out.className = "probe"; out.textContent = document.getElementById("tip").textContent;
      document.body.appendChild(out);
    });</script>"""
    probed = tmp_path / "probed.html"
    probed.write_text(page.read_text(encoding="utf-8").replace("</body>", probe + "</body>"), encoding="utf-8")
    dom = dump_dom(probed, tmp_path / "profile")
    assert len(texts_of(dom, "td", "cell")) == len(trace.tokens) * 3
    rows = texts_of(dom, "th", "row")
    assert rows[-1] == "0 The" and rows[0] == f"{len(trace.tokens) - 1} {trace.tokens[-1]}"  # drawn top-down, last token first
    tip = texts_of(dom, "pre", "probe")
    assert tip[0].startswith(f"token {rows[0]}, block 0") and "p(" in tip[0]
    assert "<b>trace</b>" not in dom
