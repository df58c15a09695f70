"""Held-out evaluation of lenses: per-layer cross-entropy, KL to the final layer, entropy, perplexity."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator, get_args

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from lens.analysis.layers import LayerMetrics, LayerSums
from lens.config import Metric
from lens.core.metrics import Reading, lens_layer_stats, lens_token_stats
from lens.core.residuals import capture_residuals
from lens.core.translators import Lens, Unembed

METRICS: tuple[str, ...] = get_args(Metric)
"""Per-layer x token statistics every evaluation averages (``lens_token_stats`` keys)."""


@dataclass
class ScoredBatch:
    """One batch of held-out text with every lens' per-token statistics (positions with a next token)."""

    ids: torch.Tensor  # [b, T]
    reading: Reading  # float32, N = positions with a next token
    stats: dict[str, dict[str, torch.Tensor]]  # lens name -> lens_token_stats output, [L+1, N] each


@torch.no_grad()
def scored_batches(model: PreTrainedModel, lenses: dict[str, Lens], batches: Iterable[torch.Tensor]) -> Iterator[ScoredBatch]:
    """Run the frozen model once per batch and read it through every lens; the last position of each
    sequence has no next token and is dropped."""
    unembed = Unembed(model)
    for ids in batches:
        ids = ids.to(model.device)  # [b, T]
        reading = Reading.scored(*capture_residuals(model, ids), ids)
        yield ScoredBatch(ids, reading, {name: lens_token_stats(lens, unembed, reading) for name, lens in lenses.items()})


@dataclass
class LensEvaluation:
    """Per-layer metrics of each lens on the same held-out tokens."""

    tokens: int
    lenses: dict[str, LayerMetrics]

    def to_json(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "unit": "nats per token", "lenses": {name: m.to_json() for name, m in self.lenses.items()}}

    def lines(self) -> list[str]:
        return [
            f"{name:>6} lens: mean KL over layers {m.mean_kl:.3f} nats, mean CE {m.mean_ce:.3f} nats ({self.tokens} held-out tokens)"
            for name, m in self.lenses.items()
        ]


@torch.no_grad()
def evaluate_lenses(
    model: PreTrainedModel,
    lenses: dict[str, Lens],
    sequences: torch.Tensor,  # [n, T]
    batch_size: int = 4,
    progress: bool = True,
) -> LensEvaluation:
    """Mean per-layer metrics (nats) of each lens over held-out sequences (``lens_layer_stats``:
    only what the means need, none of the ranks and top-k that ``scored_batches`` gives)."""
    unembed = Unembed(model)
    sums = {name: LayerSums() for name in lenses}
    for ids in tqdm(sequences.split(batch_size), desc="eval", disable=not progress):
        ids = ids.to(model.device)  # [b, T]
        reading = Reading.scored(*capture_residuals(model, ids), ids)
        for name, lens in lenses.items():
            sums[name].add(lens_layer_stats(lens, unembed, reading))
    tokens = next(iter(sums.values())).tokens
    return LensEvaluation(tokens, {name: LayerMetrics.from_sums(s) for name, s in sums.items()})
