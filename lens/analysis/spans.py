"""Scoring spans of blocks: how much the model loses when a span is skipped, and how much a span
translator standing in for it wins back (next-token CE, and KL to the intact model)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from lens.core.metrics import kl_to_teacher, next_token_ce
from lens.core.translators import check_span
from lens.interventions.surgery import LayerProgram

Span = tuple[int, int]


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


@torch.no_grad()
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
    for span in spans:
        check_span(model, *span)
    ce, kl = {}, {}  # (span, variant) -> summed nats
    intact = 0.0
    n_ce = n_kl = 0
    for first in tqdm(range(0, len(sequences), batch_size), desc=f"scoring {len(spans)} spans"):
        ids = sequences[first : first + batch_size].to(model.device)  # [b, T]
        logits = model(ids, use_cache=False).logits
        teacher_logp = logits.float().log_softmax(-1)  # [b, T, V]
        intact += next_token_ce(logits, ids).sum().item()
        n_ce, n_kl = n_ce + ids[:, 1:].numel(), n_kl + ids.numel()
        for span in spans:
            variants = {"skip": LayerProgram.skip(model, *span)}
            if span in translators:
                variants["translator"] = LayerProgram.replace(model, *span, translators[span])
            for name, program in variants.items():
                with program:
                    out = model(ids, use_cache=False).logits
                ce[span, name] = ce.get((span, name), 0.0) + next_token_ce(out, ids).sum().item()
                kl[span, name] = kl.get((span, name), 0.0) + kl_to_teacher(teacher_logp, out).sum().item()
    result = SpanEvaluation(n_ce, intact / n_ce)
    for span in spans:
        row = SpanScore(span[0], span[1], ce[span, "skip"] / n_ce, kl[span, "skip"] / n_kl)
        if (span, "translator") in ce:
            row.translator_ce, row.translator_kl = ce[span, "translator"] / n_ce, kl[span, "translator"] / n_kl
            damage = row.skip_ce - result.intact_ce
            row.repaired_fraction = (row.skip_ce - row.translator_ce) / damage if damage > 0 else None
        result.spans.append(row)
    return result
