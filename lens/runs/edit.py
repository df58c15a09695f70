"""``lens edit --config configs/edit_smollm2.yaml``: one ROME edit read through the lens, and its scores over the fact set.

Writes into ``<output_dir>/<run_name>/``: the saved edit (``delta/``: ``edit.safetensors`` +
``config.json``), the lens picture of the edit prompt followed by the new object before vs after
(``picture/``: heatmaps, page, arrays), and ``summary.json``: the block and why it was chosen, the
covariance cache file, the value optimisation, the lens readings (from which layer the new object is
the lens' top-1 at the last subject token and at the last prompt token), continuations, and the
efficacy / paraphrase / neighbourhood / fluency scores of ``facts`` edits, one per known fact, the
facts evenly spaced through the known ones (so every relation has its share), also per relation.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lens.analysis.edit_eval import EditEvaluation, evaluate_edits, lens_readings, score_fact
from lens.analysis.known_facts import first_token, known_facts
from lens.analysis.picture import build_picture
from lens.analysis.rome import EditRequest, context_prefixes, key_covariance, rank_one_delta, rome_vectors, subject_ids
from lens.analysis.tracing import mean_effect_at_last_subject, trace_facts, traceable_facts
from lens.artifacts.files import write_json
from lens.artifacts.registry import run_model_and_lens
from lens.config import EditConfig, InputError, to_dict
from lens.data.facts import Fact, evenly_spaced, load_facts
from lens.interventions import RankOneEdit
from lens.runs.steer import continuations, held_out_sequences, write_picture

TRACE_FACTS = 20
"""Known facts (evenly spaced through them) traced when ``rome.layer=auto``, whatever ``facts`` scores."""
TRACE_SAMPLES = 5
"""Noise draws per traced fact (3 x the embedding std, as ROME)."""


def trace_block(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, facts: list[Fact], seed: int) -> tuple[int, dict[str, Any]]:
    """The block whose MLP output, restored at the last subject token, brings back the most of the
    true object on average over ``TRACE_FACTS`` of ``facts`` (causal tracing), and what the run records
    of it: the mean effect per block, the facts traced and those skipped."""
    traces, skipped = trace_facts(model, tokenizer, facts, TRACE_FACTS, samples=TRACE_SAMPLES, seed=seed)
    if not traces:
        raise InputError(f"rome.layer=auto found no known fact to trace ({len(facts)} known, skipped: {skipped}): give rome.layer=N")
    effect = mean_effect_at_last_subject(traces, "mlp")  # [n_blocks]
    block = int(effect.argmax())
    return block, {
        "block_source": f"auto: argmax of the mean MLP effect at the last subject token over {len(traces)} traced known facts "
        f"(evenly spaced, {TRACE_SAMPLES} noise draws each)",
        "mlp_effect": [round(float(x), 6) for x in effect],
        "traced_facts": [t.prompt for t in traces],
        "trace_skipped": skipped,
    }


@dataclass
class EditResult:
    """Everything an edit run measured; ``summary.json`` is its ``to_json()``."""

    run_dir: Path
    record: dict[str, Any] = field(default_factory=dict)
    evaluation: EditEvaluation | None = None

    def to_json(self) -> dict[str, Any]:
        return {**self.record, "evaluation": self.evaluation.to_json() if self.evaluation else None}

    def lines(self) -> list[str]:
        r = self.record
        out = [f"block {r['block']} ({r['block_source']}); key covariance from {r['covariance']['tokens']} tokens"]
        edit = r["edit"]
        out.append(f"{edit['text']}: P(new) - P(true) {edit['before']['magnitude']:+.3f} -> {edit['after']['magnitude']:+.3f}")
        for where, reading in r["lens_readings"].items():
            new, first = r["edit"]["target_new"], (reading["before"]["top1_from"], reading["after"]["top1_from"])
            out.append(f"  lens top-1 is {new!r} at the {where} token from layer: before {first[0]}, after {first[1]}")
        if "generation" in r:
            out += [f"  before: {r['generation']['prompt']}{r['generation']['base'][0]!r}", f"  after:  {r['generation']['prompt']}{r['generation']['steered'][0]!r}"]
        out += self.evaluation.lines() if self.evaluation else []
        return out


def edit(cfg: EditConfig) -> EditResult:
    """The configured edit, its picture and readings, and one edit per known fact with their scores."""
    torch.manual_seed(cfg.seed)
    model, tokenizer, lens = run_model_and_lens(cfg)
    facts = known_facts(model, tokenizer, load_facts(cfg.facts_path)) if cfg.facts or cfg.rome.layer == "auto" else []
    result = EditResult(cfg.run_dir, {"config": to_dict(cfg), "lens": lens.origin, "known_facts": len(facts)})
    if cfg.rome.layer == "auto":
        block, traced = trace_block(model, tokenizer, facts, cfg.seed)
        result.record.update(traced)
    else:
        block = int(cfg.rome.layer)
        result.record["block_source"] = "rome.layer in the config"
    result.record["block"] = block
    covariance, path, cached = key_covariance(model, tokenizer, cfg.data, block, cfg.rome.covariance_tokens)
    result.record["covariance"] = {"file": str(path), "read_from_cache": cached, "tokens": cfg.rome.covariance_tokens}
    prefixes = context_prefixes(model, tokenizer, cfg.rome.prefixes, cfg.rome.prefix_tokens, cfg.seed)
    result.record["prefixes"] = {"source": f"sampled by the model from BOS, top-5, seed {cfg.seed}", "texts": prefixes}

    request = EditRequest(cfg.subject, cfg.prompt, cfg.target_new)
    vectors = rome_vectors(model, tokenizer, request, block, prefixes, cfg.rome)
    delta = rank_one_delta(model, vectors, covariance, request)
    delta.save(cfg.run_dir / "delta")
    intervention = lambda: RankOneEdit(model, delta)  # noqa: E731
    shown = Fact(
        "pictured-edit", "as configured", cfg.subject, cfg.prompt, cfg.target_true, cfg.target_new,
        tuple(cfg.paraphrases), tuple(cfg.neighbourhood), "the run's config",
    )
    before = score_fact(model, tokenizer, shown)
    with intervention():
        after = score_fact(model, tokenizer, shown)
    result.record["edit"] = {
        "text": request.text(), "target_true": cfg.target_true, "target_new": cfg.target_new, "before": vars(before), "after": vars(after),
        "value_optimisation": vectors.losses, "delta_norm": float(delta.v.norm()), "v_current_norm": float(vectors.v_current.norm()),
    }

    label = f"ROME edit {cfg.subject}: {cfg.target_true.strip()} -> {cfg.target_new.strip()} at block {block}"
    text = request.text() + cfg.target_new
    ids = torch.tensor([tokenizer(text)["input_ids"]])  # [1, T]
    picture = build_picture(model, tokenizer, text, lens, intervention, cfg.picture.top_k, input_ids=ids)
    write_picture(picture, cfg.run_dir / "picture", cfg.model.name, lens.origin, label, replace(cfg.picture, text=text), rows="every layer")
    _, last_subject = subject_ids(tokenizer, request.text(), cfg.subject)
    positions = {"last subject": last_subject, "last prompt": len(tokenizer(request.text())["input_ids"]) - 1}
    new_id = first_token(tokenizer, cfg.target_new)
    readings = {"before": lens_readings(model, tokenizer, lens, ids, new_id, positions, "before")}
    with intervention():
        readings["after"] = lens_readings(model, tokenizer, lens, ids, new_id, positions, "after")
    result.record["lens_readings"] = {where: {state: readings[state][where].to_json() for state in readings} for where in positions}
    if cfg.generate.max_new_tokens > 0:
        result.record["generation"] = vars(continuations(model, tokenizer, intervention, cfg.generate.prompt, cfg.generate, cfg.seed))

    if cfg.facts:
        chosen, skipped = traceable_facts(tokenizer, evenly_spaced(facts, cfg.facts))
        result.record["scored_skipped"] = skipped
        held_out = held_out_sequences(cfg.data, tokenizer, cfg.sequences, prepend_bos=False)

        def edit_for(fact: Fact):
            fact_request = EditRequest(fact.subject, fact.prompt, fact.target_new)
            fact_delta = rank_one_delta(model, rome_vectors(model, tokenizer, fact_request, block, prefixes, cfg.rome), covariance, fact_request)
            return lambda: RankOneEdit(model, fact_delta)

        result.evaluation = evaluate_edits(model, tokenizer, chosen, edit_for, held_out, cfg.confidence)
    write_json(result.to_json(), cfg.run_dir / "summary.json")
    return result
