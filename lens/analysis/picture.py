"""The per-token loss picture: what a lens reads at every layer and token, before and after an intervention.

An intervention is passed as a zero-argument factory returning a context manager that hooks the
model (``lambda: ActAdd(model, tok, pairs, layer, c)``), so every forward pass gets a fresh,
always-restored hook and one factory serves the picture, generation and evaluation alike.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Callable, get_args

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lens.analysis.layers import json_array, json_float
from lens.config import InputError, Unit
from lens.core.metrics import Reading, lens_token_stats, nats_to_bits, next_token_ce, next_token_targets
from lens.core.residuals import capture_residuals
from lens.core.translators import Lens, Unembed
from lens.interventions.surgery import LayerProgram

InterventionFactory = Callable[[], AbstractContextManager[Any]]
"""Builds the context manager that applies an intervention for one ``with`` block."""

METRICS = {"ce": "cross-entropy vs next token", "kl": "KL(final || lens)", "entropy": "entropy of lens prediction"}
"""Per layer x token arrays of a picture, with the label used on axes and colour bars."""

UNITS: tuple[str, ...] = get_args(Unit)


@dataclass(frozen=True)
class Row:
    """One row of a picture: a residual, read with the lens translator of the original layer it stands for."""

    layer: int
    """Original layer (residual after that many blocks of the intact model) whose translator reads it."""
    label: str
    """How the row is named on axes: the layer, and what the program put there."""


def identity_rows(n_layers: int) -> list[Row]:
    """The intact model's rows: layer ``l`` is the residual after ``l`` blocks."""
    return [Row(layer, str(layer)) for layer in range(n_layers + 1)]


def program_rows(program: LayerProgram, n_layers: int) -> list[Row]:
    """Rows of a model running ``program`` (one per captured residual: the input of every slot, then
    the output), each read as the layer the model now treats it as. The residual entering block
    ``b`` stands for layer ``b``: after a skipped span that is the span's end, on a second visit the
    row is a repeat; the residual entering a translator for ``start..end`` stands for ``start``, the
    one leaving it for ``end``. The output stands for the layer after the last slot, so the intact
    program ``0..L-1`` gives the intact rows ``0..L``."""
    steps = program.program

    def span(position: int) -> tuple[int, int]:  # a translator's span: its own, else from its neighbours
        before = next((s + 1 for s in reversed(steps[:position]) if isinstance(s, int)), 0)
        after = next((s for s in steps[position + 1 :] if isinstance(s, int)), n_layers)
        return getattr(steps[position], "start", before), getattr(steps[position], "end", after)

    rows: list[Row] = []
    here, seen, translated = 0, set(), None  # the layer the current residual stands for; what made it
    for position, step in enumerate(steps):
        if isinstance(step, int):
            if step in seen:
                note = " (repeat)"
            elif step > here and not seen & set(range(here, step)):
                note = f" (block {here} skipped)" if step == here + 1 else f" (blocks {here}..{step - 1} skipped)"
            else:
                note = f" (translator {translated[0]}..{translated[1]})" if translated else ""
            rows.append(Row(step, f"{step}{note}"))
            seen.add(step)
            here, translated = step + 1, None
        else:
            translated = span(position)
            rows.append(Row(translated[0], f"{translated[0]} (into translator {translated[0]}..{translated[1]})"))
            here = translated[1]
    note = f" (translator {translated[0]}..{translated[1]})" if translated else ""
    rows.append(Row(here, f"{here}{note}"))
    return rows


@dataclass
class TokenStats:
    """Lens statistics of one model state, in nats: metrics ``[R, T]``, top-k ``[R, T, k]`` for its rows."""

    ce: torch.Tensor  # [R, T], NaN at the last token (no next token)
    kl: torch.Tensor  # [R, T], to this model state's own final distribution
    entropy: torch.Tensor  # [R, T]
    top_ids: torch.Tensor  # [R, T, k]
    top_probs: torch.Tensor  # [R, T, k]
    output_ce: torch.Tensor  # [T]: the loss of this model state's own output, NaN at the last token
    rows: list[Row]

    def metric(self, name: str, unit: str = "nats") -> torch.Tensor:
        """One metric array ``[R, T]`` in ``unit``."""
        if name not in METRICS:
            raise ValueError(f"unknown metric {name!r}; valid: {sorted(METRICS)}")
        values = getattr(self, name)
        return nats_to_bits(values) if _check_unit(unit) == "bits" else values


@dataclass
class LossPicture:
    """Base and (optionally) intervened lens statistics for one text, plus the strings to show them.

    The intervened state may have other rows than the base (a layer program): ``aligned`` says, for
    each base row, which intervened row stands for the same original layer (its last visit), or None
    where the program removed that layer.
    """

    text: str
    token_ids: list[int]  # [T]
    tokens: list[str]  # [T] display strings of the input tokens
    lens_kind: str
    base: TokenStats
    intervened: TokenStats | None
    labels: dict[int, str]  # display string of every id in any top-k list

    @classmethod
    def labelled(
        cls, tokenizer: PreTrainedTokenizerBase, text: str, token_ids: list[int], lens_kind: str, base: TokenStats, intervened: TokenStats | None = None
    ) -> "LossPicture":
        """A picture with the display strings of its input tokens and of every token in a top-k list."""
        seen = {int(i) for stats in (base, intervened) if stats is not None for i in stats.top_ids.unique()}
        labels = {i: token_label(tokenizer, i) for i in sorted(seen)}
        return cls(text, token_ids, [token_label(tokenizer, i) for i in token_ids], lens_kind, base, intervened, labels)

    @property
    def n_rows(self) -> int:
        """Rows of the base picture: ``L+1`` (embedding output ... last block's output)."""
        return self.base.ce.shape[0]

    @property
    def aligned(self) -> list[int | None]:
        """For each base row, the intervened row read as the same layer (the last visit), or None if removed."""
        if self.intervened is None:
            return list(range(self.n_rows))
        last = {row.layer: index for index, row in enumerate(self.intervened.rows)}
        return [last.get(row.layer) for row in self.base.rows]

    def panels(self, metric: str, unit: str = "nats") -> dict[str, torch.Tensor]:
        """``base`` ``[L+1, T]``, ``intervened`` ``[R, T]`` and ``diff`` (intervened - base, aligned by
        original layer, NaN rows where the program removed a layer) ``[L+1, T]``, in ``unit``."""
        out = {"base": self.base.metric(metric, unit)}
        if self.intervened is not None:
            inter = self.intervened.metric(metric, unit)
            out["intervened"] = inter
            gap = torch.full_like(out["base"][0], torch.nan)
            out["diff"] = torch.stack([gap if i is None else inter[i] - b for i, b in zip(self.aligned, out["base"])])
        return out

    def output_ce(self, state: str, unit: str = "nats") -> torch.Tensor:
        """``[T]``: the loss of the base or intervened model's own output, or of their difference."""
        values = {"base": self.base.output_ce}
        if self.intervened is not None:
            values["intervened"] = self.intervened.output_ce
            values["diff"] = values["intervened"] - values["base"]
        return nats_to_bits(values[state]) if _check_unit(unit) == "bits" else values[state]

    def top1_labels(self, state: str) -> list[list[str]]:
        """Top-1 token strings ``[R][T]`` of ``base`` or ``intervened``."""
        stats = self.base if state == "base" else self.intervened
        if stats is None:
            raise ValueError("this picture has no intervened model state")
        return [[self.labels[int(i)] for i in row] for row in stats.top_ids[..., 0]]

    def row_labels(self, state: str) -> list[str]:
        """Axis labels of ``base``, ``intervened`` or ``diff`` rows (removed layers say so)."""
        if state == "intervened":
            return [row.label for row in self.intervened.rows]  # type: ignore[union-attr]
        labels = [row.label for row in self.base.rows]
        if state == "diff":
            labels = [label if i is not None else f"{label} (removed)" for label, i in zip(labels, self.aligned)]
        return labels

    def summary(self, unit: str = "nats") -> dict[str, Any]:
        """JSON-ready arrays and per-layer / final-output means, NaN written as null."""
        out: dict[str, Any] = {
            "text": self.text,
            "tokens": self.tokens,
            "token_ids": self.token_ids,
            "lens": self.lens_kind,
            "unit": _check_unit(unit),
            "layers": self.n_rows,
            "cell": "row r, column t: the lens on the residual of row r at token t, predicting token t+1",
        }
        states = ["base"] + (["intervened", "diff"] if self.intervened is not None else [])
        for state in states:
            block: dict[str, Any] = {"rows": self.row_labels(state)}
            for metric in METRICS:
                arr = self.panels(metric, unit)[state]  # [R, T]
                block[metric] = json_array(arr)
                block[f"{metric}_layer_mean"] = json_array(arr.nanmean(dim=1))
            final = self.output_ce(state, unit)  # [T]
            block["final_ce"] = json_array(final)
            block["final_ce_mean"] = json_float(float(final.nanmean()))
            if state != "diff":
                block["top1"] = self.top1_labels(state)
            out[state] = block
        if self.intervened is not None:
            out["diff"]["aligned_rows"] = self.aligned
        return out


def token_label(tokenizer: PreTrainedTokenizerBase, token_id: int) -> str:
    """A readable string for one token: decoded text, control characters escaped, never empty."""
    text = tokenizer.decode([token_id])
    text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
    if not text:
        return f"<{token_id}>"
    return text if text.strip() else text.replace(" ", "\u2423")  # a lone space shows as an open box


@torch.no_grad()
def token_stats(model: PreTrainedModel, lens: Lens, input_ids: torch.Tensor, top_k: int, rows: list[Row] | None = None) -> TokenStats:
    """Lens statistics of the model as it is hooked right now, for ``input_ids`` ``[1, T]``; ``rows``
    says which layer each captured residual stands for (default: the intact model's)."""
    residuals, logits = capture_residuals(model, input_ids)  # [R, 1, T, d], [1, T, V]
    rows = identity_rows(lens.n_layers) if rows is None else rows
    if residuals.shape[0] != len(rows):
        raise ValueError(
            f"the model ran {residuals.shape[0] - 1} blocks but {len(rows) - 1} rows were given: "
            "a layer program's picture needs its rows (program_rows)"
        )
    targets = next_token_targets(input_ids[0])  # [T]
    reading = Reading(residuals[:, 0].float(), logits[0], targets)
    stats = lens_token_stats(lens, Unembed(model), reading, top_k=top_k, layers=[row.layer for row in rows])
    output = next_token_ce(logits[0], input_ids[0])  # [T-1]
    output_ce = torch.cat([output, output.new_full((1,), torch.nan)]).cpu()
    return TokenStats(stats["ce"], stats["kl"], stats["entropy"], stats["top_ids"], stats["top_probs"], output_ce, rows)


def build_picture(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    lens: Lens,
    intervention: InterventionFactory | None = None,
    top_k: int = 5,
    rows: list[Row] | None = None,
    input_ids: torch.Tensor | None = None,
) -> LossPicture:
    """Run ``text`` through the base model and, if given, the intervened model; read both with ``lens``.

    ``rows`` names what each residual of the intervened model stands for (``program_rows`` for a
    layer program; default: the intact model's rows). ``input_ids`` ``[1, T]`` overrides how ``text``
    is tokenised (a steering run that prepends BOS)."""
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if input_ids is None:
        input_ids = tokenizer(text, return_tensors="pt")["input_ids"]
    input_ids = input_ids.to(model.device)  # [1, T]
    if input_ids.shape[1] < 2:
        raise InputError(
            f"text {text!r} tokenizes to {input_ids.shape[1]} token(s); a picture needs at least 2 "
            "(every cell scores the prediction of the next token)"
        )
    base = token_stats(model, lens, input_ids, top_k)
    intervened = None
    if intervention is not None:
        with intervention():
            intervened = token_stats(model, lens, input_ids, top_k, rows)
    return LossPicture.labelled(tokenizer, text, input_ids[0].tolist(), lens.kind, base, intervened)


def _check_unit(unit: str) -> str:
    if unit not in UNITS:
        raise ValueError(f"unknown unit {unit!r}; valid: {list(UNITS)}")
    return unit
