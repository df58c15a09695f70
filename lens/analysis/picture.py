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
from lens.core.metrics import Reading, lens_token_stats, nats_to_bits, next_token_targets
from lens.core.residuals import capture_residuals
from lens.core.translators import Lens, Unembed

InterventionFactory = Callable[[], AbstractContextManager[Any]]
"""Builds the context manager that applies an intervention for one ``with`` block."""

METRICS = {"ce": "cross-entropy vs next token", "kl": "KL(final || lens)", "entropy": "entropy of lens prediction"}
"""Per layer x token arrays of a picture, with the label used on axes and colour bars."""

UNITS: tuple[str, ...] = get_args(Unit)


@dataclass
class TokenStats:
    """Lens statistics of one model state, in nats: metrics ``[L+1, T]``, top-k ``[L+1, T, k]``."""

    ce: torch.Tensor  # [L+1, T], NaN at the last token (no next token)
    kl: torch.Tensor  # [L+1, T], to this model state's own final distribution
    entropy: torch.Tensor  # [L+1, T]
    top_ids: torch.Tensor  # [L+1, T, k]
    top_probs: torch.Tensor  # [L+1, T, k]

    def metric(self, name: str, unit: str = "nats") -> torch.Tensor:
        """One metric array ``[L+1, T]`` in ``unit``."""
        if name not in METRICS:
            raise ValueError(f"unknown metric {name!r}; valid: {sorted(METRICS)}")
        values = getattr(self, name)
        return nats_to_bits(values) if _check_unit(unit) == "bits" else values


@dataclass
class LossPicture:
    """Base and (optionally) intervened lens statistics for one text, plus the strings to show them."""

    text: str
    token_ids: list[int]  # [T]
    tokens: list[str]  # [T] display strings of the input tokens
    lens_kind: str
    base: TokenStats
    intervened: TokenStats | None
    labels: dict[int, str]  # display string of every id in any top-k list

    @property
    def n_rows(self) -> int:
        """Layers shown: ``L+1`` (embedding output ... last block's output)."""
        return self.base.ce.shape[0]

    def panels(self, metric: str, unit: str = "nats") -> dict[str, torch.Tensor]:
        """``base`` / ``intervened`` / ``diff`` (intervened - base) arrays ``[L+1, T]`` in ``unit``."""
        out = {"base": self.base.metric(metric, unit)}
        if self.intervened is not None:
            out["intervened"] = self.intervened.metric(metric, unit)
            out["diff"] = out["intervened"] - out["base"]
        return out

    def top1_labels(self, state: str) -> list[list[str]]:
        """Top-1 token strings ``[L+1][T]`` of ``base`` or ``intervened``."""
        stats = self.base if state == "base" else self.intervened
        if stats is None:
            raise ValueError("this picture has no intervened model state")
        return [[self.labels[int(i)] for i in row] for row in stats.top_ids[..., 0]]

    def summary(self, unit: str = "nats") -> dict[str, Any]:
        """JSON-ready arrays and per-layer / final-layer means, NaN written as null."""
        out: dict[str, Any] = {
            "text": self.text,
            "tokens": self.tokens,
            "token_ids": self.token_ids,
            "lens": self.lens_kind,
            "unit": _check_unit(unit),
            "layers": self.n_rows,
            "cell": "row l, column t: the lens on the residual after l blocks at token t, predicting token t+1",
        }
        states = ["base"] + (["intervened"] if self.intervened is not None else [])
        for state in states + (["diff"] if self.intervened is not None else []):
            block: dict[str, Any] = {}
            for metric in METRICS:
                arr = self.panels(metric, unit)[state]  # [L+1, T]
                block[metric] = json_array(arr)
                block[f"{metric}_layer_mean"] = json_array(arr.nanmean(dim=1))
            block["final_ce"] = json_array(self.panels("ce", unit)[state][-1])
            block["final_ce_mean"] = json_float(float(self.panels("ce", unit)[state][-1].nanmean()))
            if state != "diff":
                block["top1"] = self.top1_labels(state)
            out[state] = block
        return out


def token_label(tokenizer: PreTrainedTokenizerBase, token_id: int) -> str:
    """A readable string for one token: decoded text, control characters escaped, never empty."""
    text = tokenizer.decode([token_id])
    text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
    if not text:
        return f"<{token_id}>"
    return text if text.strip() else text.replace(" ", "\u2423")  # a lone space shows as an open box


@torch.no_grad()
def token_stats(model: PreTrainedModel, lens: Lens, input_ids: torch.Tensor, top_k: int) -> TokenStats:
    """Lens statistics of the model as it is hooked right now, for ``input_ids`` ``[1, T]``."""
    residuals, logits = capture_residuals(model, input_ids)  # [L+1, 1, T, d], [1, T, V]
    if residuals.shape[0] != lens.n_layers + 1:
        raise ValueError(
            f"the model ran {residuals.shape[0] - 1} blocks but the lens reads {lens.n_layers}: a picture "
            "needs the original depth (steering, permuting or translator-replacing programs); "
            "compare the final loss of depth-changing programs with lens.analysis.intervention_eval.program_losses"
        )
    ids = input_ids[0]
    targets = next_token_targets(ids)  # [T]
    stats = lens_token_stats(lens, Unembed(model), Reading(residuals[:, 0].float(), logits[0], targets), top_k=top_k)
    return TokenStats(stats["ce"], stats["kl"], stats["entropy"], stats["top_ids"], stats["top_probs"])


def build_picture(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    lens: Lens,
    intervention: InterventionFactory | None = None,
    top_k: int = 5,
) -> LossPicture:
    """Run ``text`` through the base model and, if given, the intervened model; read both with ``lens``."""
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    input_ids = tokenizer(text, return_tensors="pt")["input_ids"].to(model.device)  # [1, T]
    if input_ids.shape[1] < 2:
        raise InputError(
            f"text {text!r} tokenizes to {input_ids.shape[1]} token(s); a picture needs at least 2 "
            "(every cell scores the prediction of the next token)"
        )
    base = token_stats(model, lens, input_ids, top_k)
    intervened = None
    if intervention is not None:
        with intervention():
            intervened = token_stats(model, lens, input_ids, top_k)
    seen = {int(i) for s in (base, intervened) if s is not None for i in s.top_ids.unique()}
    ids = input_ids[0].tolist()
    return LossPicture(
        text=text,
        token_ids=ids,
        tokens=[token_label(tokenizer, i) for i in ids],
        lens_kind=lens.kind,
        base=base,
        intervened=intervened,
        labels={i: token_label(tokenizer, i) for i in sorted(seen)},
    )


def _check_unit(unit: str) -> str:
    if unit not in UNITS:
        raise ValueError(f"unknown unit {unit!r}; valid: {list(UNITS)}")
    return unit
