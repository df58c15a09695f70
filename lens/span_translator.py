"""Learned span translators: an affine map that stands in for a span of blocks.

``SpanTranslator(start, end)`` maps the residual after ``start`` blocks to a guess of the residual
after ``end`` blocks, ``h -> h + A h + b``. A and b start at zero, so an untrained translator *is*
plain skipping of blocks ``start..end-1``; how much of the damage of skipping it repairs is what
``evaluate_spans`` measures. Saved like lenses: ``translator.safetensors`` + ``config.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from lens.closed_form import SINK_POSITIONS, RidgeStats, fit_residuals
from lens.interventions.base import n_layers
from lens.interventions.surgery import LayerProgram, check_span
from lens.io import CONFIG, read_lens_config, save_tensors
from lens.model import model_id

WEIGHTS = "translator.safetensors"

Span = tuple[int, int]


class SpanTranslator(nn.Module):
    """``h + A h + b`` in place of blocks ``start..end-1``; zero-initialised (= plain skip)."""

    kind = "span_affine"

    def __init__(self, d_model: int, start: int, end: int) -> None:
        super().__init__()
        self.d_model, self.start, self.end = d_model, start, end
        self.weight = nn.Parameter(torch.zeros(d_model, d_model))  # A: [d_out, d_in]
        self.bias = nn.Parameter(torch.zeros(d_model))  # b: [d]

    @classmethod
    def for_span(cls, model: PreTrainedModel, start: int, end: int) -> "SpanTranslator":
        check_span(model, start, end)
        return cls(model.config.hidden_size, start, end)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # [..., d] -> [..., d]
        return h + h @ self.weight.to(h.dtype).T + self.bias.to(h.dtype)

    def replacing(self, model: PreTrainedModel) -> LayerProgram:
        """The model with this translator in place of its span, as an intervention."""
        return LayerProgram.replace(model, self.start, self.end, self)


@torch.no_grad()
def fit_least_squares(
    model: PreTrainedModel,
    translators: Sequence[SpanTranslator],
    sequences: torch.Tensor,
    batch_size: int,
    ridge: float = 1e-3,
    skip_positions: int = SINK_POSITIONS,
) -> None:
    """Set each translator to the ridge regression of the residual after its ``end`` on the one after
    its ``start`` (attention-sink positions left out, see ``SINK_POSITIONS``); one pass over
    ``sequences`` serves them all."""
    stats = [RidgeStats(1, t.d_model) for t in translators]
    for residuals in fit_residuals(model, sequences, batch_size, "least-squares start", skip_positions):
        for t, stat in zip(translators, stats):
            stat.update(residuals[[t.start, t.end]])  # [2, N, d]: input, target
    for t, stat in zip(translators, stats):
        weight, bias = stat.solve(ridge)  # [1, d, d], [1, d]
        t.weight.copy_(weight[0])
        t.bias.copy_(bias[0])


def kl_to_teacher(teacher_logp: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per-token KL(teacher || softmax(logits)) in nats: ``[..., V], [..., V] -> [...]``."""
    log_q = logits.float().log_softmax(-1)
    return (teacher_logp.exp() * (teacher_logp - log_q)).sum(-1)


def next_token_ce(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy against the next token: ``[B, T, V], [B, T] -> [B, T-1]``."""
    return F.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none")


@torch.no_grad()
def evaluate_spans(
    model: PreTrainedModel,
    sequences: torch.Tensor,  # [n, T]
    spans: Sequence[Span],
    translators: dict[Span, nn.Module] | None = None,
    batch_size: int = 4,
) -> dict[str, Any]:
    """Mean next-token CE and KL to the intact model (nats per token) for each span skipped, and
    replaced by its translator where one is given; plus the intact model's CE."""
    translators = translators or {}
    for span in spans:
        check_span(model, *span)
    sums: dict[str, float] = {"intact_ce": 0.0}
    for span in spans:
        for variant in ("skip", "translator") if span in translators else ("skip",):
            sums[f"{span}_{variant}_ce"] = sums[f"{span}_{variant}_kl"] = 0.0
    n_ce = n_kl = 0
    for first in tqdm(range(0, len(sequences), batch_size), desc=f"scoring {len(spans)} spans"):
        ids = sequences[first : first + batch_size].to(model.device)  # [b, T]
        logits = model(ids, use_cache=False).logits
        teacher_logp = logits.float().log_softmax(-1)  # [b, T, V]
        sums["intact_ce"] += next_token_ce(logits, ids).sum().item()
        n_ce, n_kl = n_ce + ids[:, 1:].numel(), n_kl + ids.numel()
        for span in spans:
            variants = {"skip": LayerProgram.skip(model, *span)}
            if span in translators:
                variants["translator"] = LayerProgram.replace(model, *span, translators[span])
            for name, program in variants.items():
                with program:
                    out = model(ids, use_cache=False).logits
                sums[f"{span}_{name}_ce"] += next_token_ce(out, ids).sum().item()
                sums[f"{span}_{name}_kl"] += kl_to_teacher(teacher_logp, out).sum().item()
    result: dict[str, Any] = {"unit": "nats per token", "tokens": n_ce, "intact_ce": sums["intact_ce"] / n_ce, "spans": []}
    for span in spans:
        row: dict[str, Any] = {"start": span[0], "end": span[1]}
        for name in ("skip", "translator"):
            if f"{span}_{name}_ce" in sums:
                row[f"{name}_ce"] = sums[f"{span}_{name}_ce"] / n_ce
                row[f"{name}_kl"] = sums[f"{span}_{name}_kl"] / n_kl
        if "translator_ce" in row:
            damage = row["skip_ce"] - result["intact_ce"]
            row["repaired_fraction"] = (row["skip_ce"] - row["translator_ce"]) / damage if damage > 0 else None
        result["spans"].append(row)
    return result


def save_translator(translator: SpanTranslator, folder: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write ``folder/translator.safetensors`` and ``folder/config.json``; returns the folder."""
    config = {
        "translator_type": translator.kind,
        "start": translator.start,
        "end": translator.end,
        "hidden_size": translator.d_model,
        **(metadata or {}),
    }
    return save_tensors(Path(folder), WEIGHTS, dict(translator.named_parameters()), config, "span translator")


def load_translator(folder: str | Path, model: PreTrainedModel | None = None) -> SpanTranslator:
    """Load a span translator; with ``model``, check its width, span and base model fit."""
    folder = Path(folder)
    config = read_lens_config(folder)
    weights = folder / WEIGHTS
    if config.get("translator_type") != SpanTranslator.kind or not weights.is_file():
        raise ValueError(
            f"{folder} does not hold a span translator ({WEIGHTS} + {CONFIG} with translator_type {SpanTranslator.kind!r})"
        )
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{weights} cannot be read ({err}); the file is corrupt or truncated") from err
    d = config["hidden_size"]
    for name, shape in (("weight", (d, d)), ("bias", (d,))):
        if name not in tensors or tuple(tensors[name].shape) != shape:
            raise ValueError(f"{weights}: tensor {name!r} should have shape {shape} per {CONFIG}")
    if model is not None:
        if d != model.config.hidden_size:
            raise ValueError(f"translator {folder} has width {d}, {type(model).__name__} has hidden size {model.config.hidden_size}")
        check_span(model, config["start"], config["end"])
        built_for = config.get("base_model")
        if built_for is not None and built_for != model_id(model):
            raise ValueError(f"translator {folder} was trained for {built_for!r}, not {model_id(model)!r}")
        if config.get("num_layers", n_layers(model)) != n_layers(model):
            raise ValueError(
                f"translator {folder} was trained for a {config['num_layers']}-block model, this one has {n_layers(model)}"
            )
    translator = SpanTranslator(d, config["start"], config["end"])
    with torch.no_grad():
        translator.weight.copy_(tensors["weight"])
        translator.bias.copy_(tensors["bias"])
    return translator
