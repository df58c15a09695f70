"""Per-layer means of per-token statistics: the one accumulator behind every evaluation, and the
small result types it feeds. Results stay typed inside the package; ``to_json`` is the edge.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch


class LayerSums:
    """Running sums of per-layer x token statistics ``[L+1, N]``; ``means()`` gives ``[L+1]`` per name.

    Sums are float64 so that streaming many batches loses nothing to the order they arrive in.
    """

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens = 0

    def add(self, stats: Mapping[str, torch.Tensor]) -> None:
        """Add one batch: every array ``[L+1, N]`` over the same ``N`` tokens."""
        widths = {values.shape[-1] for values in stats.values()}
        if len(widths) != 1:
            raise ValueError(f"statistics of one batch must cover the same tokens, got widths {sorted(widths)}")
        for name, values in stats.items():
            total = values.double().sum(-1).cpu()
            self.sums[name] = self.sums[name] + total if name in self.sums else total
        self.tokens += widths.pop()

    def means(self) -> dict[str, list[float]]:
        if self.tokens == 0:
            raise ValueError("no tokens were added")
        return {name: (total / self.tokens).tolist() for name, total in self.sums.items()}


def mean_over_lens_layers(values: list[float]) -> float:
    """Mean over layers ``0..L-1``: the last entry is the model's own output, the same for every lens."""
    return sum(values[:-1]) / (len(values) - 1)


@dataclass
class LayerMetrics:
    """Per-layer means over scored tokens, in nats per token. Index ``l`` is the lens on the residual
    after ``l`` blocks; the last index is the model's own output."""

    ce: list[float]
    """Cross-entropy against the next token."""
    kl: list[float]
    """KL(model's final distribution || lens distribution)."""
    entropy: list[float]
    """Entropy of the lens distribution."""

    @classmethod
    def from_sums(cls, sums: LayerSums) -> "LayerMetrics":
        means = sums.means()
        return cls(ce=means["ce"], kl=means["kl"], entropy=means["entropy"])

    @property
    def mean_kl(self) -> float:
        return mean_over_lens_layers(self.kl)

    @property
    def mean_ce(self) -> float:
        return mean_over_lens_layers(self.ce)

    def to_json(self) -> dict[str, Any]:
        return {
            "ce": self.ce,
            "kl": self.kl,
            "entropy": self.entropy,
            "perplexity": [math.exp(x) for x in self.ce],
            "mean_kl": self.mean_kl,
            "mean_ce": self.mean_ce,
        }


def json_float(x: float) -> float | None:
    """Rounded to 4 decimals; NaN becomes None (JSON has no NaN)."""
    return None if math.isnan(x) else round(x, 4)


def json_array(arr: torch.Tensor) -> Any:
    """Nested lists of rounded floats, NaN as None."""
    if arr.dim() == 0:
        return json_float(float(arr))
    return [json_array(a) for a in arr] if arr.dim() > 1 else [json_float(float(x)) for x in arr]
