"""A direction among ROME edits' values: where an attribute (gender) lives in what an MLP writes.

Each subject is edited twice at one block, once to a male and once to a female role noun of the same
relation ("Alex works as a" -> " waiter" / " waitress"). Both edits of a subject share the prompt, so
they share the key ``k*`` and the current value ``v = W k*``; only ``v* − v`` differs, and a classifier
on ``v`` alone is at chance by construction. An L2 logistic regression on ``v* − v`` of the training
subjects gives the direction (the unit normal of its boundary); held-out subjects (never in the fit,
neither edit) give its accuracy.

The direction is then applied to the held-out subjects in pronoun probes ("Alex said that" -> " he" /
" she"), scaled to ``c`` times the mean ``|v* − v|``:

- as a steering vector: added to the block's MLP output at the last subject token (``SubjectAdd``);
- as a weight delta: ROME's rank-one form ``ΔW = v uᵀ`` with ``u = C⁻¹k* / (C⁻¹k*)ᵀk*`` from the
  subject's key, so it fires wherever the subject's key appears (``subject_delta``).

The flip rate counts, among probes whose preferred pronoun is the other label's before, those that
prefer the direction's label after.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lens.analysis.edit_eval import lens_readings, object_logprobs
from lens.analysis.intervention_eval import Interval, wilson_interval
from lens.analysis.known_facts import first_token
from lens.analysis.picture import InterventionFactory
from lens.analysis.rome import EditRequest, RomeVectors, rank_one_delta, rome_vectors, subject_ids
from lens.config import InputError, RomeConfig
from lens.core.components import edit_site
from lens.core.translators import Lens
from lens.data.attributes import AttributeSet
from lens.interventions.base import Intervention
from lens.interventions.rome import RankOneDelta


@dataclass(frozen=True)
class AttributeEdit:
    """One ROME edit that gives ``subject`` the object of label ``label``."""

    subject: str
    label: int
    request: EditRequest


def attribute_edits(attributes: AttributeSet, n_subjects: int, seed: int) -> list[AttributeEdit]:
    """Two edits per subject (the first ``n_subjects``), one per label, of one relation and role pair
    drawn per subject (seeded), so both labels share the subject's prompt and key."""
    if not 4 <= n_subjects <= len(attributes.subjects):
        raise InputError(f"subjects={n_subjects}: the attribute set {attributes.path} has {len(attributes.subjects)} subjects; give 4..{len(attributes.subjects)}")
    rng = random.Random(seed)
    choices = [(relation.prompt, pair) for relation in attributes.relations for pair in relation.pairs]
    edits = []
    for subject in attributes.subjects[:n_subjects]:
        prompt, pair = rng.choice(choices)
        edits += [AttributeEdit(subject, label, EditRequest(subject, prompt, target)) for label, target in enumerate(pair)]
    return edits


@dataclass
class ValueDeltas:
    """What ROME's value step asked of one block for each edit."""

    block: int
    edits: list[AttributeEdit]
    deltas: torch.Tensor  # [n, d]: v* − v
    values: torch.Tensor  # [n, d]: v = W k* (the current value)
    keys: torch.Tensor  # [n, d_mlp]: k*
    final_nll: list[float]
    """The new object's NLL (nats/token) after the last value step of each edit."""

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor([edit.label for edit in self.edits])  # [n]

    @property
    def subjects(self) -> list[str]:
        return [edit.subject for edit in self.edits]


def collect_deltas(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, edits: Sequence[AttributeEdit], block: int, prefixes: Sequence[str], cfg: RomeConfig
) -> ValueDeltas:
    """ROME's key and value (``lens.analysis.rome.rome_vectors``) of every edit at block ``block``."""
    found: list[RomeVectors] = []
    for edit in tqdm(edits, desc=f"ROME values, block {block}", unit="edit"):
        found.append(rome_vectors(model, tokenizer, edit.request, block, prefixes, cfg))
    return ValueDeltas(
        block,
        list(edits),
        torch.stack([v.v_star - v.v_current for v in found]),
        torch.stack([v.v_current for v in found]),
        torch.stack([v.k_star for v in found]),
        [v.losses[-1]["nll"] for v in found],
    )


def split_by_subject(subjects: Sequence[str], held_out: float, seed: int) -> tuple[list[int], list[int]]:
    """Row indices (train, held-out): a seeded share ``held_out`` of the distinct subjects, with all
    their rows, is held out, so no subject is on both sides."""
    names = sorted(set(subjects))
    if len(names) < 4:
        raise InputError(f"a split by subject needs at least 4 subjects, got {len(names)}: edit more subjects")
    n_test = min(len(names) - 2, max(2, round(held_out * len(names))))
    test = set(random.Random(seed).sample(names, n_test))
    return [i for i, s in enumerate(subjects) if s not in test], [i for i, s in enumerate(subjects) if s in test]


@dataclass
class LogisticFit:
    """``P(label 1 | x) = σ(wᵀx + b)``."""

    weight: torch.Tensor  # [d] float64
    bias: float
    loss: float
    """Final training objective: mean log-loss + l2 |w|² / 2."""

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return x.double() @ self.weight + self.bias  # [n]

    def accuracy(self, x: torch.Tensor, labels: torch.Tensor, confidence: float) -> Interval:
        """Share of rows classified right, with its Wilson interval."""
        right = int(((self.scores(x) > 0).long() == labels.long()).sum())
        return wilson_interval(right, len(labels), confidence)


def fit_logistic(x: torch.Tensor, labels: torch.Tensor, l2: float, steps: int) -> LogisticFit:
    """L2-penalised logistic regression of ``labels`` ``[n]`` (0/1) on ``x`` ``[n, d]``, by L-BFGS in
    float64 (the objective is convex, so this is its one minimum up to the tolerance)."""
    if set(labels.tolist()) != {0, 1}:
        raise InputError(f"a logistic regression needs rows of both labels, got labels {sorted(set(labels.tolist()))}")
    x, y = x.double(), labels.double()
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=steps, tolerance_grad=1e-10, tolerance_change=1e-14, line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(x @ w + b, y) + 0.5 * l2 * w.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(objective)
    with torch.no_grad():
        loss = F.binary_cross_entropy_with_logits(x @ w + b, y) + 0.5 * l2 * w.pow(2).sum()
    return LogisticFit(w.detach(), float(b.detach()), float(loss))


@dataclass
class DirectionFit:
    """The attribute direction among the training subjects' ``v* − v`` and how well it generalises."""

    direction: torch.Tensor  # [d] unit, pointing to label 1
    scale: float
    """Mean |v* − v| over the training edits: coefficient 1 adds a vector of this norm."""
    train: list[int]
    held_out: list[int]
    fit: LogisticFit
    train_accuracy: Interval
    held_out_accuracy: Interval
    baselines: dict[str, Interval]
    """Held-out accuracy of the same regression fitted on shuffled labels, and on ``v`` alone."""
    cosine_mean_difference: float
    """Cosine of the direction with mean(v* − v | label 1) − mean(v* − v | label 0) over training edits."""

    def to_json(self) -> dict[str, Any]:
        return {
            "scale_mean_delta_norm": self.scale,
            "train_rows": len(self.train),
            "held_out_rows": len(self.held_out),
            "objective": self.fit.loss,
            "bias": self.fit.bias,
            "weight_norm": float(self.fit.weight.norm()),
            "train_accuracy": self.train_accuracy.to_json(),
            "held_out_accuracy": self.held_out_accuracy.to_json(),
            "baselines": {name: ci.to_json() for name, ci in self.baselines.items()},
            "cosine_mean_difference": self.cosine_mean_difference,
        }


def fit_direction(values: ValueDeltas, held_out: float, l2: float, steps: int, seed: int, confidence: float) -> DirectionFit:
    """Split by subject, fit the regression on the training deltas, score it and its baselines on the held-out ones."""
    train, test = split_by_subject(values.subjects, held_out, seed)
    x, y = values.deltas.double(), values.labels
    fit = fit_logistic(x[train], y[train], l2, steps)
    shuffled = y[train][torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))]
    baselines = {
        "shuffled_labels": fit_logistic(x[train], shuffled, l2, steps).accuracy(x[test], y[test], confidence),
        "current_value_only": fit_logistic(values.values[train].double(), y[train], l2, steps).accuracy(values.values[test], y[test], confidence),
    }
    direction = fit.weight / fit.weight.norm()
    ones, zeros = x[train][y[train] == 1], x[train][y[train] == 0]
    difference = ones.mean(0) - zeros.mean(0)  # [d]
    return DirectionFit(
        direction.float(),
        float(x[train].norm(dim=-1).mean()),
        train,
        test,
        fit,
        fit.accuracy(x[train], y[train], confidence),
        fit.accuracy(x[test], y[test], confidence),
        baselines,
        float(F.cosine_similarity(direction, difference, dim=0)),
    )


class SubjectAdd(Intervention):
    """Add ``vector`` ``[d]`` to block ``block``'s MLP output at one position per row (the last subject
    token): ``positions[i]`` in row ``i`` of every forward pass, whose batch must have ``len(positions)`` rows."""

    def __init__(self, model: PreTrainedModel, block: int, vector: torch.Tensor, positions: Sequence[int]) -> None:
        super().__init__()
        self.model, self.block, self.vector, self.positions = model, block, vector, list(positions)

    def add(self, out: torch.Tensor) -> torch.Tensor:  # [B, T, d]
        if out.shape[0] != len(self.positions) or max(self.positions) >= out.shape[1]:
            raise InputError(
                f"steering at {len(self.positions)} positions (up to {max(self.positions)}) met a batch of shape {tuple(out.shape[:2])}: "
                "run the rows the positions were given for, without a KV cache"
            )
        rows = torch.arange(out.shape[0], device=out.device)
        return out.index_put((rows, torch.tensor(self.positions, device=out.device)), self.vector.to(out.device, out.dtype), accumulate=True)

    def apply(self) -> None:
        stack = ExitStack()
        self.on_exit(stack.close)
        stack.enter_context(edit_site(self.model, self.block, "mlp", self.add))


def subject_delta(model: PreTrainedModel, block: int, key: torch.Tensor, covariance: torch.Tensor, vector: torch.Tensor, subject: str) -> RankOneDelta:
    """ROME's rank-one form with the subject's key: ``ΔW = vector uᵀ``, ``u = C⁻¹k* / (C⁻¹k*)ᵀk*``
    (``lens.analysis.rome.rank_one_delta`` with ``v* − v`` set to ``vector`` ``[d]``)."""
    values = RomeVectors(block, key, vector.float(), torch.zeros_like(vector, dtype=torch.float32), [])
    made = rank_one_delta(model, values, covariance, EditRequest(subject, "{}", " direction"))
    return RankOneDelta(block, made.u, made.v, {"method": "value-direction", "subject": subject}, made.built_for)


@dataclass(frozen=True)
class ProbeCase:
    """One held-out subject in one probe: the text, its last subject token, the two labels' continuations."""

    subject: str
    text: str
    subject_position: int
    targets: tuple[str, ...]


def probe_cases(tokenizer: PreTrainedTokenizerBase, attributes: AttributeSet, subjects: Sequence[str]) -> list[ProbeCase]:
    """Every probe of the set with every subject written in."""
    cases = []
    for subject in subjects:
        for probe in attributes.probes:
            text = probe.prompt.replace("{}", subject)
            cases.append(ProbeCase(subject, text, subject_ids(tokenizer, text, subject)[1], probe.targets))
    return cases


def label_margins(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cases: Sequence[ProbeCase]) -> torch.Tensor:
    """``[N]``: log P(label 1's continuation) − log P(label 0's) after each probe, in one batch (so
    a ``SubjectAdd`` entered around it with ``positions_for(cases)`` hits every row)."""
    prompts = [case.text for case in cases]
    logp = object_logprobs(model, tokenizer, prompts * 2, [c.targets[1] for c in cases] + [c.targets[0] for c in cases], batch_size=2 * len(cases))
    return logp[: len(cases)] - logp[len(cases) :]


def positions_for(cases: Sequence[ProbeCase]) -> list[int]:
    """The last subject token of each row of ``label_margins``' batch (every case twice)."""
    return [case.subject_position for case in cases] * 2


def flip_rate(before: torch.Tensor, after: torch.Tensor, sign: int, confidence: float) -> Interval | None:
    """Among cases preferring the other label before (margin·sign < 0), the share preferring the
    direction's label after (margin·sign > 0); None when no case preferred the other label."""
    eligible = before * sign < 0
    n = int(eligible.sum())
    return wilson_interval(int((after[eligible] * sign > 0).sum()), n, confidence) if n else None


@torch.no_grad()
def greedy_tokens(model: PreTrainedModel, ids: list[int], n: int) -> list[int]:
    """``n`` greedy tokens after ``ids``, each from a full pass without a KV cache, so an edit keyed
    to a position sees the whole text at every step."""
    tokens = list(ids)
    for _ in range(n):
        logits = model(input_ids=torch.tensor([tokens], device=model.device), use_cache=False).logits  # [1, T, V]
        tokens.append(int(logits[0, -1].argmax()))
    return tokens[len(ids) :]


def ngram_entropy(tokens: Sequence[int], n: int) -> float:
    """Entropy (bits) of the distribution of ``n``-grams in ``tokens``: low when a text repeats itself."""
    grams = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    total = sum(grams.values())
    return -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0


@dataclass
class Continuation:
    """One greedy continuation and what it says about fluency."""

    text: str
    entropy: float
    """Mean of the 2- and 3-gram entropies (bits), as ROME's generation entropy weighs them equally here."""
    intact_logprob: float
    """Mean log-prob per token the intact model gives the continuation (nats)."""


@torch.no_grad()
def continue_probes(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    cases: Sequence[ProbeCase],
    n: int,
    intervention_for: Callable[[ProbeCase], InterventionFactory] | None = None,
) -> list[Continuation]:
    """Greedy continuations of each probe (under ``intervention_for(case)()`` when given), scored by the intact model."""
    out = []
    for case in tqdm(cases, desc="greedy continuations", unit="probe", leave=False):
        ids = tokenizer(case.text)["input_ids"]
        if intervention_for is None:
            tokens = greedy_tokens(model, ids, n)
        else:
            with intervention_for(case)():
                tokens = greedy_tokens(model, ids, n)
        full = torch.tensor([ids + tokens], device=model.device)  # [1, T + n]
        logp = model(input_ids=full, use_cache=False).logits[0, len(ids) - 1 : -1].float().log_softmax(-1)  # [n, V]
        scored = float(logp[torch.arange(n), torch.tensor(tokens, device=logp.device)].mean())
        entropy = (ngram_entropy(tokens, 2) + ngram_entropy(tokens, 3)) / 2
        out.append(Continuation(tokenizer.decode(tokens, skip_special_tokens=True), entropy, scored))
    return out


@dataclass
class Application:
    """One way of applying the direction at one coefficient and sign, over the held-out probes."""

    form: str
    coefficient: float
    sign: int
    """+1 adds the direction (towards label 1), -1 subtracts it."""
    flip: Interval | None
    mean_margin_shift: float
    """Mean change of log P(label 1) − log P(label 0) over all held-out probes (nats)."""
    fluency: Interval | None = None
    """Held-out corpus log-prob change per token (edited − intact), one observation per subject's weight delta."""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "form": self.form, "coefficient": self.coefficient, "sign": self.sign,
            "flip_rate": self.flip.to_json() if self.flip else None, "mean_margin_shift": self.mean_margin_shift,
            "fluency_logprob_diff": self.fluency.to_json() if self.fluency else None, **self.extra,
        }


def ahead_from(to_prob: Sequence[float], from_prob: Sequence[float]) -> int | None:
    """First layer from which the lens gives ``to`` more probability than ``from`` at every later layer
    (None: not at the last layer)."""
    ahead = [a > b for a, b in zip(to_prob, from_prob)]
    if not ahead[-1]:
        return None
    layer = len(ahead)
    while layer > 0 and ahead[layer - 1]:
        layer -= 1
    return layer


@dataclass
class LensFlip:
    """The lens at the final token of the held-out probes that preferred the other label, intact vs
    with the direction applied: mean p of the pronoun the direction points to (``to``) and of the one
    preferred before (``from``) per layer, and per probe from which layer ``to`` is top-1 / ahead."""

    form: str
    coefficient: float
    sign: int
    cases: list[str]
    flipped: list[bool]
    """Whether the model itself prefers ``to`` after (the last layer's verdict)."""
    prob_to: dict[str, list[float]]
    """``before`` / ``after``: [L+1] mean lens p(to) over the cases."""
    prob_from: dict[str, list[float]]
    top1_from: dict[str, list[int | None]]
    """Per case: first layer from which ``to`` is the lens' top-1 at every later layer (None: not at the end)."""
    ahead_from: dict[str, list[int | None]]
    """Per case: first layer from which the lens prefers ``to`` over ``from`` at every later layer."""

    def median_layer(self, which: str, state: str) -> float | None:
        """Median over the flipped cases of ``top1_from`` or ``ahead_from`` (None where no flipped case has one)."""
        layers = [x for x, f in zip(getattr(self, which)[state], self.flipped) if f and x is not None]
        return float(torch.tensor(layers, dtype=torch.float64).median()) if layers else None

    def to_json(self) -> dict[str, Any]:
        return {
            "form": self.form, "coefficient": self.coefficient, "sign": self.sign, "cases": self.cases, "flipped": self.flipped,
            "prob_to": self.prob_to, "prob_from": self.prob_from, "top1_from": self.top1_from, "ahead_from": self.ahead_from,
            "median_over_flipped": {
                which: {state: self.median_layer(which, state) for state in ("before", "after")} for which in ("top1_from", "ahead_from")
            },
            "to_top1_at_last_layer_after": sum(x is not None for x in self.top1_from["after"]),
        }


def read_flips(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    lens: Lens,
    cases: Sequence[ProbeCase],
    before: torch.Tensor,
    sign: int,
    intervention_for: Callable[[ProbeCase], InterventionFactory],
    form: str,
    coefficient: float,
) -> LensFlip | None:
    """The lens reading of the cases that preferred the other label before (``before`` ``[N]``
    margins); None when there is none."""
    chosen = [(case, margin) for case, margin in zip(cases, before.tolist()) if margin * sign < 0]
    if not chosen:
        return None
    to_label = 1 if sign > 0 else 0
    probs: dict[str, dict[str, list[list[float]]]] = {"to": {"before": [], "after": []}, "from": {"before": [], "after": []}}
    top1: dict[str, list[int | None]] = {"before": [], "after": []}
    ahead: dict[str, list[int | None]] = {"before": [], "after": []}
    for case, _ in tqdm(chosen, desc=f"lens reading, {form} {sign * coefficient:+g}", unit="probe", leave=False):
        ids = torch.tensor([tokenizer(case.text)["input_ids"]])  # [1, T]
        final = {"final": ids.shape[1] - 1}
        to_id, from_id = first_token(tokenizer, case.targets[to_label]), first_token(tokenizer, case.targets[1 - to_label])
        for state in ("before", "after"):
            with intervention_for(case)() if state == "after" else ExitStack():
                to_reading = lens_readings(model, tokenizer, lens, ids, to_id, final, state)["final"]
                from_reading = lens_readings(model, tokenizer, lens, ids, from_id, final, state)["final"]
            probs["to"][state].append(to_reading.prob)
            probs["from"][state].append(from_reading.prob)
            top1[state].append(to_reading.top1_from)
            ahead[state].append(ahead_from(to_reading.prob, from_reading.prob))

    def mean(rows: list[list[float]]) -> list[float]:
        return [round(float(x), 6) for x in torch.tensor(rows, dtype=torch.float64).mean(0)]

    return LensFlip(
        form, coefficient, sign, [case.text for case, _ in chosen],
        [a > b for a, b in zip((p[-1] for p in probs["to"]["after"]), (p[-1] for p in probs["from"]["after"]))],
        {state: mean(rows) for state, rows in probs["to"].items()},
        {state: mean(rows) for state, rows in probs["from"].items()},
        top1, ahead,
    )
