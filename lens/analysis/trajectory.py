"""Prediction trajectories: what every layer, read through a lens, predicts at every token.

A trajectory keeps per-cell statistics (``[L+1, T]`` each) and the top-k tokens, never the
``[L+1, T, V]`` log-probs, so long texts fit in memory; comparing two readings recomputes the
distributions chunk by chunk. Layer ``l`` is the residual after ``l`` blocks; row ``L`` is the
model's own output distribution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lens.analysis.layers import json_array
from lens.analysis.picture import LossPicture, TokenStats, identity_rows
from lens.config import InputError
from lens.core.metrics import DEFAULT_CHUNK, Reading, lens_token_stats, next_token_targets
from lens.core.residuals import capture_residuals
from lens.core.translators import Lens, Unembed

STATS = ("ce", "entropy", "kl", "max_prob", "target_rank", "final_top_rank")
"""Per-cell statistics: nats (ce vs next token, entropy, KL(final || layer)), a probability, 0-based ranks."""


@dataclass
class Trajectory:
    input_ids: torch.Tensor  # [T]
    stats: dict[str, torch.Tensor]  # name -> [L+1, T]; NaN where undefined (no next token at the end)
    top_ids: torch.Tensor  # [L+1, T, k]
    top_probs: torch.Tensor  # [L+1, T, k]

    @property
    def depth(self) -> torch.Tensor:  # [T]
        """Prediction depth of every token (see ``prediction_depth``)."""
        return prediction_depth(self.top_ids[..., 0], self.top_ids[-1, :, 0])


def prediction_depth(top1: torch.Tensor, final_top1: torch.Tensor) -> torch.Tensor:
    """First layer from which the top-1 equals the final top-1 and stays equal: ``[L+1, T] -> [T]``.

    The last row is the final layer itself, so it always counts as a match and depths lie in ``0..L``.
    """
    match = top1 == final_top1  # [L+1, T]
    match[-1] = True
    stays = match.flip(0).long().cumprod(0).flip(0)  # [L+1, T]: 1 where this and every later layer match
    return match.shape[0] - stays.sum(0)


def depth_histogram(depths: torch.Tensor, n_layers: int) -> torch.Tensor:
    """Token counts per prediction depth ``0..L``: ``[N] -> [L+1]``."""
    return torch.bincount(depths.flatten(), minlength=n_layers + 1)


def divergences(log_p: torch.Tensor, log_q: torch.Tensor) -> dict[str, torch.Tensor]:
    """KL(p || q), Jensen-Shannon (<= ln 2) and total variation (<= 1) over the last axis, in nats.

    Zero-probability entries contribute nothing (0 log 0 = 0), so exact zeros in the inputs are fine.
    Where ``p_i == q_i`` the mixture is ``p_i`` itself and the entry contributes exactly 0, so equal
    distributions give exactly 0 on every platform, not a rounding residue of ``log((p + q) / 2)``.
    """
    p, q = log_p.exp(), log_q.exp()
    log_m = torch.logaddexp(log_p, log_q) - math.log(2)  # log of the mixture (p + q) / 2
    differ = log_p != log_q

    def kl(a: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
        return torch.where((a > 0) & differ, a * (log_a - log_b), 0.0).sum(-1)

    js = 0.5 * (kl(p, log_p, log_m) + kl(q, log_q, log_m))
    return {"kl": kl(p, log_p, log_q).clamp(min=0.0), "js": js.clamp(min=0.0), "tv": 0.5 * (p - q).abs().sum(-1)}


@torch.no_grad()
def read_trajectory(
    lens: Lens, unembed: Unembed, input_ids: torch.Tensor, reading: Reading, top_k: int = 5, chunk: int = DEFAULT_CHUNK
) -> Trajectory:
    """All statistics of one text (``input_ids`` ``[T]``, its ``reading`` from ``read_text``) through one
    lens: two chunked passes over the unembedding."""
    main = lens_token_stats(lens, unembed, reading, top_k, chunk)
    # Second pass with the final layer's top token as "target": its rank under every layer.
    vs_final = lens_token_stats(lens, unembed, Reading(reading.residuals, reading.final_logits, reading.final_logits.argmax(-1)), 1, chunk)
    stats = {
        "ce": main["ce"],
        "entropy": main["entropy"],
        "kl": main["kl"],
        "max_prob": main["top_probs"][..., 0],
        "target_rank": main["target_rank"],
        "final_top_rank": vs_final["target_rank"],
    }
    return Trajectory(input_ids.cpu(), stats, main["top_ids"], main["top_probs"])


@torch.no_grad()
def compare_readings(
    unembed: Unembed,
    lens_a: Lens,
    residuals_a: torch.Tensor,  # [L+1, T, d]
    lens_b: Lens,
    residuals_b: torch.Tensor,  # [L+1, T, d]
    chunk: int = DEFAULT_CHUNK,
) -> dict[str, torch.Tensor]:
    """Per-cell KL(a || b), JS and TV between two readings (two lenses, or base vs steered runs)."""
    if residuals_a.shape != residuals_b.shape:
        raise ValueError(f"readings must cover the same layers and tokens, got {tuple(residuals_a.shape)} vs {tuple(residuals_b.shape)}")
    n_rows, n_tokens = residuals_a.shape[:2]
    out = {name: torch.empty(n_rows, n_tokens) for name in ("kl", "js", "tv")}
    for layer in range(n_rows):
        for start in range(0, n_tokens, chunk):
            sl = slice(start, start + chunk)
            log_p = unembed(lens_a.translate_layer(residuals_a[layer, sl], layer)).float().log_softmax(-1)  # [c, V]
            log_q = unembed(lens_b.translate_layer(residuals_b[layer, sl], layer)).float().log_softmax(-1)  # [c, V]
            for name, value in divergences(log_p, log_q).items():
                out[name][layer, sl] = value
    return out


def read_text(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, text: str, max_tokens: int = 256) -> tuple[torch.Tensor, Reading]:
    """Token ids ``[T]`` of one text and its reading (float32, CPU; targets: the next tokens)."""
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens])
    if len(ids) < 2:
        raise InputError(f"text gives {len(ids)} token(s); a trajectory needs at least 2")
    residuals, logits = capture_residuals(model, ids[None].to(model.device))
    return ids, Reading(residuals[:, 0].float().cpu(), logits[0].float().cpu(), next_token_targets(ids))


def to_picture(traj: Trajectory, tokenizer: PreTrainedTokenizerBase, text: str, lens_kind: str) -> LossPicture:
    """The project's per-token picture of a trajectory, so its heatmap and HTML page draw it."""
    rows = identity_rows(traj.stats["ce"].shape[0] - 1)
    stats = TokenStats(traj.stats["ce"], traj.stats["kl"], traj.stats["entropy"], traj.top_ids, traj.top_probs, traj.stats["ce"][-1], rows)
    return LossPicture.labelled(tokenizer, text, traj.input_ids.tolist(), lens_kind, stats)


def trajectory_json(traj: Trajectory, picture: LossPicture) -> dict[str, Any]:
    """Every statistic per layer x token, the top-k tokens and probabilities, and prediction depths."""
    return {
        "text": picture.text,
        "tokens": picture.tokens,
        "cell": "row l, column t: the lens on the residual after l blocks at token t, predicting token t+1",
        "stats": {name: json_array(value) for name, value in traj.stats.items()},
        "top_tokens": [[[picture.labels[i] for i in cell] for cell in row] for row in traj.top_ids.tolist()],
        "top_probs": json_array(traj.top_probs),
        "prediction_depth": traj.depth.tolist(),
    }
