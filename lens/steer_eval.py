"""How much an intervention changes a model on held-out text (ActAdd's evaluation, Turner et al. 2023).

Per-token log-probabilities of the actual next tokens under the intervened vs the intact model.
Tokens of one sequence are correlated, so the confidence interval treats each *sequence* as one
observation: the statistic is the mean over sequences of the per-sequence mean difference (for
equal-length sequences that is the token mean), with a Student-t interval over sequences.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from lens.evaluate import evaluate_lenses
from lens.picture import InterventionFactory
from lens.translators import Lens


@torch.no_grad()
def sequence_logprobs(model: PreTrainedModel, sequences: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Log-prob of every actual next token, one ``[T-1]`` tensor per ``[T]`` sequence (run one at a time,
    so position-keyed steering such as ActAdd sees every sequence start at position 0)."""
    out = []
    for seq in sequences:
        if seq.dim() != 1 or seq.shape[0] < 2:
            raise ValueError(f"each sequence must be 1-D with at least 2 tokens, got shape {tuple(seq.shape)}")
        ids = seq[None].to(model.device)  # [1, T]
        logp = model(input_ids=ids, use_cache=False).logits[0, :-1].float().log_softmax(-1)  # [T-1, V]
        out.append(logp.gather(-1, ids[0, 1:, None])[:, 0].cpu())
    return out


def t_quantile(p: float, df: int) -> float:
    """Quantile of Student's t with ``df`` degrees of freedom (bisection on a Simpson-integrated CDF)."""
    if not 0.5 <= p < 1 or df < 1:
        raise ValueError(f"need 0.5 <= p < 1 and df >= 1, got p={p}, df={df}")
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf_above_half(x: float, steps: int = 2000) -> float:  # integral of the density over [0, x]
        h = x / steps
        dens = [math.exp(log_norm - (df + 1) / 2 * math.log1p((i * h) ** 2 / df)) for i in range(steps + 1)]
        return h / 3 * (dens[0] + dens[-1] + 4 * sum(dens[1:-1:2]) + 2 * sum(dens[2:-1:2]))

    lo, hi = 0.0, 1.0
    while 0.5 + cdf_above_half(hi) < p:
        hi *= 2
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if 0.5 + cdf_above_half(mid) < p else (lo, mid)
    return (lo + hi) / 2


def mean_difference_ci(per_sequence: torch.Tensor, confidence: float = 0.95) -> dict[str, float]:
    """Mean of ``per_sequence`` ``[S]`` with a two-sided Student-t interval: mean +- t * sd / sqrt(S)."""
    n = per_sequence.numel()
    if n < 2:
        raise ValueError(f"a confidence interval needs at least 2 sequences, got {n}")
    values = per_sequence.double()
    mean, se = float(values.mean()), float(values.std(unbiased=True)) / math.sqrt(n)
    half = t_quantile(0.5 + confidence / 2, n - 1) * se
    return {"mean": mean, "low": mean - half, "high": mean + half, "se": se, "confidence": confidence, "n": n}


def evaluate_steering(
    model: PreTrainedModel,
    sequences: Sequence[torch.Tensor],
    intervention: InterventionFactory,
    lens: Lens | None = None,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """Log-prob shift (intervened - intact, nats per token) with a CI, perplexity ratio, per-layer lens shift."""
    base = sequence_logprobs(model, sequences)
    with intervention():
        steered = sequence_logprobs(model, sequences)
    per_seq = torch.stack([(s - b).mean() for s, b in zip(steered, base)])  # [S]
    base_nll, steered_nll = -float(torch.cat(base).mean()), -float(torch.cat(steered).mean())
    out: dict[str, Any] = {
        "unit": "nats per token",
        "sequences": len(sequences),
        "tokens": sum(b.numel() for b in base),
        "logprob_diff": mean_difference_ci(per_seq, confidence),
        "loss": {"base": base_nll, "intervened": steered_nll},
        "perplexity": {"base": math.exp(base_nll), "intervened": math.exp(steered_nll)},
    }
    out["perplexity"]["ratio"] = math.exp(steered_nll - base_nll)
    if lens is not None:
        out["lens_shift"] = lens_loss_shift(model, lens, sequences, intervention)
    return out


def lens_loss_shift(
    model: PreTrainedModel, lens: Lens, sequences: Sequence[torch.Tensor], intervention: InterventionFactory
) -> dict[str, Any]:
    """Per-layer mean lens CE and KL, intact vs intervened, and the shift (lists of length ``L+1``)."""

    def per_layer(which: str) -> dict[str, torch.Tensor]:  # token-weighted means over all sequences, [L+1] each
        sums: dict[str, torch.Tensor] = {}
        for seq in tqdm(sequences, desc=f"lens loss per layer, {which}", unit="seq"):
            res = evaluate_lenses(model, {"lens": lens}, seq[None], progress=False)
            for metric in ("ce", "kl"):
                add = torch.tensor(res["lenses"]["lens"][metric]) * res["tokens"]
                sums[metric] = sums.get(metric, 0) + add
        n_tokens = sum(seq.numel() - 1 for seq in sequences)
        return {m: v / n_tokens for m, v in sums.items()}

    base = per_layer("intact")
    with intervention():
        steered = per_layer("intervened")
    out: dict[str, Any] = {"lens": lens.kind}
    for metric in base:
        out[metric] = {"base": base[metric].tolist(), "intervened": steered[metric].tolist()}
        out[metric]["shift"] = (steered[metric] - base[metric]).tolist()
    return out


def program_losses(
    model: PreTrainedModel, sequences: Sequence[torch.Tensor], programs: dict[str, InterventionFactory]
) -> dict[str, Any]:
    """Final loss (mean next-token NLL, nats) of the intact model and under each surgery program."""
    intact = -float(torch.cat(sequence_logprobs(model, sequences)).mean())
    out: dict[str, Any] = {"unit": "nats per token", "intact": intact, "programs": {}}
    for name, make in programs.items():
        with make():
            loss = -float(torch.cat(sequence_logprobs(model, sequences)).mean())
        out["programs"][name] = {"loss": loss, "increase": loss - intact, "perplexity_ratio": math.exp(loss - intact)}
    return out
