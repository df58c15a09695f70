"""Held-out evaluation of lenses: per-layer cross-entropy, KL to the final layer, entropy, perplexity."""

from __future__ import annotations

import math
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from lens.metrics import lens_token_stats
from lens.residuals import capture_residuals
from lens.translators import Lens, Unembed

METRICS = ("ce", "kl", "entropy")


@torch.no_grad()
def evaluate_lenses(
    model: PreTrainedModel,
    lenses: dict[str, Lens],
    sequences: torch.Tensor,  # [n, T]
    batch_size: int = 4,
    progress: bool = True,
) -> dict[str, Any]:
    """Mean per-layer metrics (nats) of each lens over held-out sequences."""
    unembed = Unembed(model)
    n_rows = next(iter(lenses.values())).n_layers + 1
    sums = {name: {m: torch.zeros(n_rows, dtype=torch.float64) for m in METRICS} for name in lenses}
    n_tokens = 0
    for start in tqdm(range(0, len(sequences), batch_size), desc="eval", disable=not progress):
        ids = sequences[start : start + batch_size].to(model.device)  # [b, T]
        residuals, logits = capture_residuals(model, ids)
        targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)  # [b, T]
        keep = (targets >= 0).flatten()
        residuals = residuals.flatten(1, 2)[:, keep].float()  # [L+1, N, d]
        final_logits, flat_targets = logits.flatten(0, 1)[keep], targets.flatten()[keep]
        n_tokens += int(keep.sum())
        for name, lens in lenses.items():
            stats = lens_token_stats(lens, unembed, residuals, final_logits, flat_targets)
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
