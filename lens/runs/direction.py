"""``lens edit --config configs/direction_smollm2.yaml``: an attribute direction among ROME edits' values, applied.

Writes into ``<output_dir>/<run_name>/``: ``values.safetensors`` (every edit's ``v* − v``, ``v``,
``k*`` and the direction), ``summary.json`` (the edits, the fit: held-out accuracy with its Wilson
interval and baselines, the direction's cosine with the class-mean difference; per coefficient and
sign, the flip rate and mean margin shift of the steering vector and of the weight delta, with the
weight delta's held-out corpus log-prob change; a random direction of the same norm as control;
greedy continuations with their n-gram entropy and intact-model log-prob; the lens readings) and
``direction_lens.png`` (the lens at the probes' final token, intact vs steered).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lens.analysis.intervention_eval import mean_difference_ci, per_sequence_shift, sequence_logprobs
from lens.analysis.picture import InterventionFactory
from lens.analysis.rome import context_prefixes, key_covariance
from lens.analysis.value_directions import (
    Application,
    AttributeEdit,
    Continuation,
    LensFlip,
    ProbeCase,
    SubjectAdd,
    ValueDeltas,
    attribute_edits,
    collect_deltas,
    continue_probes,
    fit_direction,
    flip_rate,
    label_margins,
    positions_for,
    probe_cases,
    read_flips,
    subject_delta,
)
from lens.artifacts.files import write_bytes, write_json
from lens.artifacts.registry import run_model_and_lens
from lens.config import DirectionConfig, InputError, to_dict
from lens.data.attributes import load_attributes
from lens.interventions.rome import RankOneDelta, RankOneEdit
from lens.report.plots import figure_title, plot_direction_lens
from lens.runs.steer import held_out_sequences

FORMS = ("steering vector", "weight delta")


@dataclass
class DirectionResult:
    """Everything a direction run measured; ``summary.json`` is its ``to_json()``."""

    run_dir: Path
    record: dict[str, Any] = field(default_factory=dict)
    applications: list[Application] = field(default_factory=list)
    readings: list[LensFlip] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {**self.record, "applications": [a.to_json() for a in self.applications], "lens_readings": [r.to_json() for r in self.readings]}

    def lines(self) -> list[str]:
        fit, labels = self.record["fit"], self.record["labels"]

        def rate(ci: dict[str, Any] | None) -> str:
            return "n/a (no probe preferred the other label)" if ci is None else f"{ci['mean']:.1%} [{ci['low']:.1%}, {ci['high']:.1%}] of {ci['n']}"

        out = [
            f"{self.record['edits']} ROME edits at block {self.record['block']} ({self.record['subjects']} subjects x 2 labels); "
            f"value NLL median {self.record['value_nll_median']:.3f} nats/token",
            f"held-out accuracy {rate(fit['held_out_accuracy'])}; shuffled labels {rate(fit['baselines']['shuffled_labels'])}; "
            f"v alone {rate(fit['baselines']['current_value_only'])}; cosine with class-mean difference {fit['cosine_mean_difference']:.3f}",
        ]
        for a in self.applications:
            towards = labels[1] if a.sign > 0 else labels[0]
            fluency = f", corpus log-prob {a.fluency.mean:+.4f} nats/token [{a.fluency.low:+.4f}, {a.fluency.high:+.4f}]" if a.fluency else ""
            out.append(f"  {a.form} c={a.coefficient:g} towards {towards}: flip rate {rate(a.flip.to_json() if a.flip else None)}, "
                       f"margin shift {a.mean_margin_shift:+.2f} nats{fluency}")
        for name, cont in self.record.get("continuations", {}).items():
            entropy, logprob = cont["entropy_change_bits"], cont["intact_logprob_change_nats_per_token"]
            out.append(f"  greedy continuations, {name}: n-gram entropy {entropy['mean']:+.3f} bits [{entropy['low']:+.3f}, {entropy['high']:+.3f}], "
                       f"intact-model log-prob {logprob['mean']:+.3f} nats/token [{logprob['low']:+.3f}, {logprob['high']:+.3f}]")
        for r in self.readings:
            medians = r.to_json()["median_over_flipped"]
            out.append(f"  lens, {r.form} c={r.coefficient:g} towards {labels[1] if r.sign > 0 else labels[0]}: {sum(r.flipped)}/{len(r.flipped)} flipped; "
                       f"median layer from which the new pronoun is top-1 {medians['top1_from']['after']}, ahead of the old {medians['ahead_from']['after']}")
        return out


def scaled(unit: RankOneDelta, factor: float) -> RankOneDelta:
    """The same ``u`` with ``v`` multiplied by ``factor``."""
    return RankOneDelta(unit.block, unit.u, unit.v * factor, {**unit.details, "factor": factor}, unit.built_for)


def saved_values(path: str, edits: list[AttributeEdit], block: int, width: int) -> ValueDeltas:
    """The edits' keys and values from an earlier run's ``values.safetensors``, checked against ``edits``."""
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as err:
        raise InputError(f"values_from={path} cannot be read ({err}): give the values.safetensors of a direction run") from err
    missing = {"deltas", "values", "keys", "labels", "final_nll"} - set(tensors)
    if missing:
        raise InputError(f"values_from={path} lacks {sorted(missing)}: give the values.safetensors of a direction run")
    labels = torch.tensor([edit.label for edit in edits])
    if tensors["deltas"].shape != (len(edits), width) or not torch.equal(tensors["labels"], labels):
        raise InputError(
            f"values_from={path} holds {tuple(tensors['deltas'].shape)} deltas, but {len(edits)} edits of width {width} are configured: "
            "reuse values only from a run with the same model, subjects, attribute set and seed"
        )
    return ValueDeltas(block, edits, tensors["deltas"], tensors["values"], tensors["keys"], tensors["final_nll"].tolist())


def continuation_json(rows: Sequence[Continuation], base: Sequence[Continuation], cases: Sequence[ProbeCase], confidence: float) -> dict[str, Any]:
    """Each probe's continuation next to the intact one, and the mean changes of entropy and intact log-prob."""
    entropy = torch.tensor([r.entropy - b.entropy for r, b in zip(rows, base)])
    logprob = torch.tensor([r.intact_logprob - b.intact_logprob for r, b in zip(rows, base)])
    return {
        "entropy_change_bits": mean_difference_ci(entropy, confidence).to_json(),
        "intact_logprob_change_nats_per_token": mean_difference_ci(logprob, confidence).to_json(),
        "texts": [{"probe": c.text, "intact": b.text, "edited": r.text} for c, r, b in zip(cases, rows, base)],
    }


def direction(cfg: DirectionConfig) -> DirectionResult:
    """Edits, fit, applications, lens readings and figure of one direction config."""
    torch.manual_seed(cfg.seed)
    model, tokenizer, lens = run_model_and_lens(cfg)
    attributes = load_attributes(cfg.attributes_path)
    block = int(cfg.rome.layer)
    covariance, path, cached = key_covariance(model, tokenizer, cfg.data, block, cfg.rome.covariance_tokens)
    prefixes = context_prefixes(model, tokenizer, cfg.rome.prefixes, cfg.rome.prefix_tokens, cfg.seed)
    edits = attribute_edits(attributes, cfg.subjects, cfg.seed)
    if cfg.values_from is None:
        values = collect_deltas(model, tokenizer, edits, block, prefixes, cfg.rome)
    else:
        values = saved_values(cfg.values_from, edits, block, model.config.hidden_size)
    fitted = fit_direction(values, cfg.held_out, cfg.l2, cfg.fit_steps, cfg.seed, cfg.confidence)
    tensors = {
        "deltas": values.deltas, "values": values.values, "keys": values.keys, "labels": values.labels, "direction": fitted.direction,
        "final_nll": torch.tensor(values.final_nll),
    }
    write_bytes(save({k: v.contiguous() for k, v in tensors.items()}), cfg.run_dir / "values.safetensors")

    result = DirectionResult(cfg.run_dir)
    result.record = {
        "config": to_dict(cfg), "lens": lens.origin, "attributes": attributes.path, "labels": list(attributes.labels), "block": block,
        "covariance": {"file": str(path), "read_from_cache": cached, "tokens": cfg.rome.covariance_tokens},
        "prefixes": prefixes, "subjects": cfg.subjects, "edits": len(values.edits), "values_from": cfg.values_from,
        "value_nll_median": float(torch.tensor(values.final_nll).median()),
        "per_edit": [
            {"subject": e.subject, "label": attributes.labels[e.label], "prompt": e.request.prompt, "target": e.request.target, "final_nll": nll,
             "delta_norm": float(d.norm()), "held_out": i in fitted.held_out}
            for i, (e, nll, d) in enumerate(zip(values.edits, values.final_nll, values.deltas))
        ],
        "fit": fitted.to_json(),
    }
    subjects = sorted({values.subjects[i] for i in fitted.held_out})
    keys = {values.subjects[i]: values.keys[i] for i in fitted.held_out}
    cases = probe_cases(tokenizer, attributes, subjects)
    before = label_margins(model, tokenizer, cases)
    result.record["probes"] = {"cases": [c.text for c in cases], "margin_before": before.tolist(), "prefers_label1_before": int((before > 0).sum())}
    held_out = held_out_sequences(cfg.data, tokenizer, cfg.sequences, prepend_bos=False)
    base_logprobs = sequence_logprobs(model, held_out)
    units = {s: subject_delta(model, block, keys[s], covariance, fitted.direction, s) for s in subjects}

    def steering_for(vector: torch.Tensor) -> Callable[[ProbeCase], InterventionFactory]:
        return lambda case: (lambda: SubjectAdd(model, block, vector, [case.subject_position]))

    def weight_for(factor: float) -> Callable[[ProbeCase], InterventionFactory]:
        return lambda case: (lambda: RankOneEdit(model, scaled(units[case.subject], factor)))

    def steer(vector: torch.Tensor, c: float, sign: int, form: str) -> Application:
        with SubjectAdd(model, block, vector, positions_for(cases)):
            after = label_margins(model, tokenizer, cases)
        return Application(form, c, sign, flip_rate(before, after, sign, cfg.confidence), float((after - before).mean()), extra={"margin_after": after.tolist()})

    generator = torch.Generator().manual_seed(cfg.seed)
    control = torch.randn(fitted.direction.shape, generator=generator)
    control /= control.norm()
    for c in tqdm(cfg.coefficients, desc="coefficients", unit="c"):
        for sign in (1, -1):
            factor = sign * c * fitted.scale
            result.applications.append(steer(factor * fitted.direction, c, sign, "steering vector"))
            result.applications.append(weight_application(model, tokenizer, cases, subjects, units, factor, before, held_out, base_logprobs, cfg, c, sign))
            result.applications.append(steer(factor * control, c, sign, "steering vector, random direction (control)"))

    c = max(cfg.coefficients)
    appliers = {
        "steering vector": lambda sign: steering_for(sign * c * fitted.scale * fitted.direction),
        "weight delta": lambda sign: weight_for(sign * c * fitted.scale),
    }
    if cfg.max_new_tokens > 0:
        base = continue_probes(model, tokenizer, cases, cfg.max_new_tokens)
        result.record["continuations"] = {
            f"{form}, c={c:g}, sign {sign:+d}": continuation_json(
                continue_probes(model, tokenizer, cases, cfg.max_new_tokens, make(sign)), base, cases, cfg.confidence
            )
            for form, make in appliers.items()
            for sign in (1, -1)
        }
        result.record["continuations_intact"] = [asdict(b) for b in base]
    for form, make in appliers.items():
        for sign in (1, -1):
            reading = read_flips(model, tokenizer, lens, cases, before, sign, make(sign), form, c)
            if reading is not None:
                result.readings.append(reading)
    if result.readings:
        intervention = f"value-space {attributes.attribute} direction at block {block}, {c:g} x mean |v* - v|"
        title = figure_title(cfg.model.name, "p of each pronoun at the final token", lens.origin, intervention, cases[0].text + " ...")
        plot_direction_lens(result.readings, list(attributes.labels), cfg.run_dir / "direction_lens.png", title)
    write_json(result.to_json(), cfg.run_dir / "summary.json")
    return result


def weight_application(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    cases: Sequence[ProbeCase],
    subjects: Sequence[str],
    units: dict[str, RankOneDelta],
    factor: float,
    before: torch.Tensor,
    held_out: Sequence[torch.Tensor],
    base_logprobs: Sequence[torch.Tensor],
    cfg: DirectionConfig,
    c: float,
    sign: int,
) -> Application:
    """Each held-out subject's weight delta alone: its own probes' margins, the other subjects'
    margin change (specificity) and the held-out corpus log-prob change (one observation per subject)."""
    after = before.clone()
    shifts, others = [], []
    for subject in subjects:
        own = torch.tensor([case.subject == subject for case in cases])
        with RankOneEdit(model, scaled(units[subject], factor)):
            margins = label_margins(model, tokenizer, cases)
            shifts.append(float(per_sequence_shift(sequence_logprobs(model, held_out), base_logprobs).mean()))
        after[own] = margins[own]
        others.append(float((margins[~own] - before[~own]).abs().mean()))
    return Application(
        "weight delta", c, sign, flip_rate(before, after, sign, cfg.confidence), float((after - before).mean()),
        mean_difference_ci(torch.tensor(shifts), cfg.confidence),
        {"margin_after": after.tolist(), "other_subjects_mean_abs_margin_shift": float(torch.tensor(others).mean())},
    )
