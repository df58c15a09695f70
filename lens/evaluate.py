"""Held-out evaluation of lenses: per-layer cross-entropy, KL to the final layer, entropy, perplexity."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from lens.metrics import lens_token_stats, next_token_targets
from lens.residuals import capture_residuals
from lens.translators import Lens, Unembed

METRICS = ("ce", "kl", "entropy")


@dataclass
class ScoredBatch:
    """One batch of held-out text with every lens' per-token statistics (positions with a next token)."""

    ids: torch.Tensor  # [b, T]
    residuals: torch.Tensor  # [L+1, N, d], float32
    final_logits: torch.Tensor  # [N, V], float32
    targets: torch.Tensor  # [N] next-token ids
    stats: dict[str, dict[str, torch.Tensor]]  # lens name -> lens_token_stats output, [L+1, N] each


@torch.no_grad()
def scored_batches(model: PreTrainedModel, lenses: dict[str, Lens], batches: Iterable[torch.Tensor]) -> Iterator[ScoredBatch]:
    """Run the frozen model once per batch and read it through every lens; the last position of each
    sequence has no next token and is dropped."""
    unembed = Unembed(model)
    for ids in batches:
        ids = ids.to(model.device)  # [b, T]
        residuals, logits = capture_residuals(model, ids)
        targets = next_token_targets(ids).flatten()  # [b*T]
        keep = targets >= 0
        residuals = residuals.flatten(1, 2)[:, keep].float()  # [L+1, N, d]
        final_logits, targets = logits.flatten(0, 1)[keep].float(), targets[keep]
        stats = {name: lens_token_stats(lens, unembed, residuals, final_logits, targets) for name, lens in lenses.items()}
        yield ScoredBatch(ids, residuals, final_logits, targets, stats)


@torch.no_grad()
def evaluate_lenses(
    model: PreTrainedModel,
    lenses: dict[str, Lens],
    sequences: torch.Tensor,  # [n, T]
    batch_size: int = 4,
    progress: bool = True,
) -> dict[str, Any]:
    """Mean per-layer metrics (nats) of each lens over held-out sequences."""
    n_rows = next(iter(lenses.values())).n_layers + 1
    sums = {name: {m: torch.zeros(n_rows, dtype=torch.float64) for m in METRICS} for name in lenses}
    n_tokens = 0
    batches = tqdm(sequences.split(batch_size), desc="eval", disable=not progress)
    for batch in scored_batches(model, lenses, batches):
        n_tokens += len(batch.targets)
        for name, stats in batch.stats.items():
            for metric in METRICS:
                sums[name][metric] += stats[metric].double().sum(-1)
    results: dict[str, Any] = {"tokens": n_tokens, "unit": "nats per token", "lenses": {}}
    for name in lenses:
        per_layer = {m: (sums[name][m] / n_tokens).tolist() for m in METRICS}
        per_layer["perplexity"] = [math.exp(x) for x in per_layer["ce"]]
        per_layer["mean_kl"] = sum(per_layer["kl"][:-1]) / (n_rows - 1)
        per_layer["mean_ce"] = sum(per_layer["ce"][:-1]) / (n_rows - 1)
        results["lenses"][name] = per_layer
    return results
