"""Scoring layer programs on held-out text: how much the model loses when blocks are skipped,
repeated or reordered, how much a span translator standing in for removed blocks wins back, and
what the lens reads at the cut (next-token CE, and KL to the intact model, nats per token)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Hashable, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from lens.analysis.picture import InterventionFactory, token_label
from lens.core.metrics import Reading, kl_to_teacher, lens_token_stats, next_token_ce
from lens.core.residuals import capture_residuals
from lens.core.translators import Lens, Unembed, check_span
from lens.interventions.surgery import LayerProgram

Span = tuple[int, int]


@dataclass
class ProgramScores:
    """Summed over held-out text, then divided: the intact model's CE and each program's CE, KL to the
    intact model and (where asked) the lens' CE at a row of the program's run."""

    tokens: int
    """Positions with a next token (what CE averages over)."""
    intact_ce: float
    ce: dict[Hashable, float] = field(default_factory=dict)
    kl: dict[Hashable, float] = field(default_factory=dict)
    lens_ce: dict[Hashable, float] = field(default_factory=dict)


@torch.no_grad()
def score_programs(
    model: PreTrainedModel,
    sequences: torch.Tensor,  # [n, T]
    programs: Mapping[Hashable, InterventionFactory],
    batch_size: int = 4,
    lens: Lens | None = None,
    lens_rows: Mapping[Hashable, tuple[int, int]] | None = None,
) -> ProgramScores:
    """One pass over ``sequences``; ``lens_rows[key] = (row, layer)`` also reads row ``row`` of the
    residuals of program ``key``'s run with the lens translator of ``layer`` (a cut's residual, read
    as the layer it stands for)."""
    lens_rows = lens_rows or {}
    unembed = Unembed(model)
    sums: dict[str, dict[Hashable, float]] = {"ce": {}, "kl": {}, "lens_ce": {}}
    intact, n_ce, n_kl = 0.0, 0, 0
    for first in tqdm(range(0, len(sequences), batch_size), desc=f"scoring {len(programs)} programs"):
        ids = sequences[first : first + batch_size].to(model.device)  # [b, T]
        logits = model(ids, use_cache=False).logits
        teacher_logp = logits.float().log_softmax(-1)  # [b, T, V]
        intact += next_token_ce(logits, ids).sum().item()
        n_ce, n_kl = n_ce + ids[:, 1:].numel(), n_kl + ids.numel()
        for key, make in programs.items():
            with make():
                if key in lens_rows:
                    residuals, out = capture_residuals(model, ids)  # [R, b, T, d], [b, T, V]
                else:
                    out = model(ids, use_cache=False).logits
            sums["ce"][key] = sums["ce"].get(key, 0.0) + next_token_ce(out, ids).sum().item()
            sums["kl"][key] = sums["kl"].get(key, 0.0) + kl_to_teacher(teacher_logp, out).sum().item()
            if key in lens_rows:
                row, layer = lens_rows[key]
                if lens is None or (layer == lens.n_layers and row != residuals.shape[0] - 1):
                    raise ValueError(f"{key}: reading row {row} as layer {layer} needs a lens, and layer {layer} only for the last row")
                reading = Reading.scored(residuals[row : row + 1], out, ids)
                ce = lens_token_stats(lens, unembed, reading, layers=[layer])["ce"]
                sums["lens_ce"][key] = sums["lens_ce"].get(key, 0.0) + ce.sum().item()
    return ProgramScores(
        n_ce,
        intact / n_ce,
        {k: v / n_ce for k, v in sums["ce"].items()},
        {k: v / n_kl for k, v in sums["kl"].items()},
        {k: v / n_ce for k, v in sums["lens_ce"].items()},
    )


@dataclass
class SpanScore:
    """Blocks ``start..end-1`` removed: nats per token, plain skip and (if given) its translator."""

    start: int
    end: int
    skip_ce: float
    skip_kl: float
    translator_ce: float | None = None
    translator_kl: float | None = None
    repaired_fraction: float | None = None
    """Share of the skip's CE damage the translator repairs (None without translator or damage)."""


@dataclass
class SpanEvaluation:
    tokens: int
    intact_ce: float
    spans: list[SpanScore] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        rows = [asdict(row) for row in self.spans]
        for row in rows:
            if row["translator_ce"] is None:  # plain skip only: no translator columns
                del row["translator_ce"], row["translator_kl"], row["repaired_fraction"]
        return {"unit": "nats per token", "tokens": self.tokens, "intact_ce": self.intact_ce, "spans": rows}

    def lines(self) -> list[str]:
        out = [f"intact model: CE {self.intact_ce:.3f} nats per token ({self.tokens} held-out tokens)"]
        for row in self.spans:
            fixed = f", translator {row.translator_ce:.3f}" if row.translator_ce is not None else ""
            out.append(f"skip {row.start:>2}..{row.end:<2}: CE {row.skip_ce:.3f}{fixed}")
        return out


def evaluate_spans(
    model: PreTrainedModel,
    sequences: torch.Tensor,  # [n, T]
    spans: Sequence[Span],
    translators: dict[Span, nn.Module] | None = None,
    batch_size: int = 4,
) -> SpanEvaluation:
    """Mean next-token CE and KL to the intact model (nats per token) for each span skipped, and
    replaced by its translator where one is given; plus the intact model's CE."""
    translators = translators or {}
    programs: dict[Hashable, InterventionFactory] = {}
    for span in spans:
        check_span(model, *span)
        programs[span, "skip"] = lambda span=span: LayerProgram.skip(model, *span)
        if span in translators:
            programs[span, "translator"] = lambda span=span: LayerProgram.replace(model, *span, translators[span])
    scores = score_programs(model, sequences, programs, batch_size)
    result = SpanEvaluation(scores.tokens, scores.intact_ce)
    for span in spans:
        row = SpanScore(span[0], span[1], scores.ce[span, "skip"], scores.kl[span, "skip"])
        if (span, "translator") in scores.ce:
            row.translator_ce, row.translator_kl = scores.ce[span, "translator"], scores.kl[span, "translator"]
            damage = row.skip_ce - result.intact_ce
            row.repaired_fraction = (row.skip_ce - row.translator_ce) / damage if damage > 0 else None
        result.spans.append(row)
    return result


@dataclass
class Losses:
    """Per program (or variant): next-token CE and KL(intact || it), nats per token."""

    ce: dict[str, float]
    kl: dict[str, float]


@dataclass
class ProgramEvaluation(Losses):
    """Programs that keep every block (repeats, swaps, ablations), on ``tokens`` held-out tokens."""

    tokens: int
    intact_ce: float

    def to_json(self) -> dict[str, Any]:
        programs = {name: {"ce": self.ce[name], "kl": self.kl[name]} for name in self.ce}
        return {"unit": "nats per token", "tokens": self.tokens, "intact_ce": self.intact_ce, "programs": programs}

    def lines(self) -> list[str]:
        return [f"{name}: CE {ce:.3f} (intact {self.intact_ce:.3f})" for name, ce in self.ce.items()]


def evaluate_programs(
    model: PreTrainedModel, sequences: torch.Tensor, programs: dict[str, InterventionFactory], batch_size: int = 4
) -> ProgramEvaluation:
    scores = score_programs(model, sequences, programs, batch_size)
    return ProgramEvaluation(ce=scores.ce, kl=scores.kl, tokens=scores.tokens, intact_ce=scores.intact_ce)  # type: ignore[arg-type]


@dataclass
class TokenCost:
    """How much harder one next token gets to predict under an intervention, over held-out text."""

    token: str
    count: int
    mean_increase: float
    """Mean CE increase (nats) where this token is the next one."""
    total_increase: float


@torch.no_grad()
def token_costs(
    model: PreTrainedModel,
    tokenizer: Any,
    sequences: torch.Tensor,  # [n, T]
    programs: Mapping[str, InterventionFactory],
    top: int = 12,
    batch_size: int = 4,
) -> dict[str, list[TokenCost]]:
    """Per program, the next tokens whose prediction loses most in total (CE increase summed over held-out text)."""
    totals: dict[str, dict[int, float]] = {name: {} for name in programs}
    counts: dict[int, int] = {}
    for first in range(0, len(sequences), batch_size):
        ids = sequences[first : first + batch_size].to(model.device)  # [b, T]
        intact = next_token_ce(model(ids, use_cache=False).logits, ids)  # [b, T-1]
        targets = ids[:, 1:].flatten().tolist()
        for target in targets:
            counts[target] = counts.get(target, 0) + 1
        for name, make in programs.items():
            with make():
                increase = (next_token_ce(model(ids, use_cache=False).logits, ids) - intact).flatten().tolist()
            for target, value in zip(targets, increase):
                totals[name][target] = totals[name].get(target, 0.0) + value
    out = {}
    for name, total in totals.items():
        worst = sorted(total, key=total.get, reverse=True)[:top]  # type: ignore[arg-type]
        out[name] = [TokenCost(token_label(tokenizer, t), counts[t], total[t] / counts[t], total[t]) for t in worst]
    return out


@dataclass
class SweepEvaluation:
    """A sweep: skipped spans (with their translators), programs that keep every block, and the
    per-token costs of the blocks asked about."""

    spans: SpanEvaluation | None = None
    programs: ProgramEvaluation | None = None
    explained: dict[str, list[TokenCost]] = field(default_factory=dict)

    def lines(self) -> list[str]:
        out = (self.spans.lines() if self.spans else []) + (self.programs.lines() if self.programs else [])
        for name, costs in self.explained.items():
            worst = ", ".join(f"{c.token!r} +{c.mean_increase:.1f} (x{c.count})" for c in costs[:5])
            out.append(f"{name}: hardest next tokens {worst}")
        return out


@dataclass
class CutScore(Losses):
    """``removed`` blocks cut from the ``end`` (``last`` or ``first``): the losses of ``plain`` removal and
    of each translator standing in for the blocks, and what the lens reads at the cut."""

    end: str
    removed: int
    lens_ce: float
    """The lens' CE reading the plain cut model's residual at the cut as the layer it stands for."""


@dataclass
class TruncationCurves:
    tokens: int
    intact_ce: float
    lens: str
    cuts: list[CutScore] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"unit": "nats per token", "tokens": self.tokens, "intact_ce": self.intact_ce, "lens": self.lens, "cuts": [asdict(c) for c in self.cuts]}

    def lines(self) -> list[str]:
        out = [f"intact model: CE {self.intact_ce:.3f} nats per token ({self.tokens} held-out tokens); lens: {self.lens}"]
        for cut in self.cuts:
            variants = ", ".join(f"{name} {ce:.2f}" for name, ce in cut.ce.items())
            out.append(f"{cut.end:>5} {cut.removed:>2} removed: {variants}; lens at the cut {cut.lens_ce:.2f}")
        return out
