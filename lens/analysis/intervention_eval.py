"""How much an intervention changes a model on held-out text (ActAdd's evaluation, Turner et al. 2023).

Per-token log-probabilities of the actual next tokens under the intervened vs the intact model.
Tokens of one sequence are correlated, so the confidence interval treats each *sequence* as one
observation: the statistic is the mean over sequences of the per-sequence mean difference (for
equal-length sequences that is the token mean), with a Student-t interval over sequences.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from statistics import NormalDist
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from lens.analysis.evaluate import METRICS, scored_batches
from lens.analysis.layers import LayerMetrics, LayerSums
from lens.analysis.picture import InterventionFactory
from lens.core.metrics import next_token_logprobs
from lens.core.translators import Lens


@torch.no_grad()
def sequence_logprobs(model: PreTrainedModel, sequences: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Log-prob of every actual next token, one ``[T-1]`` tensor per ``[T]`` sequence (run one at a time,
    so position-keyed steering such as ActAdd sees every sequence start at position 0)."""
    out = []
    for seq in sequences:
        if seq.dim() != 1 or seq.shape[0] < 2:
            raise ValueError(f"each sequence must be 1-D with at least 2 tokens, got shape {tuple(seq.shape)}")
        ids = seq.to(model.device)  # [T]
        out.append(next_token_logprobs(model(input_ids=ids[None], use_cache=False).logits[0], ids).cpu())
    return out


def per_sequence_shift(intervened: Sequence[torch.Tensor], base: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[S]``: each sequence's mean log-prob change (intervened - intact), the unit the intervals treat as one observation."""
    return torch.stack([(i - b).mean() for i, b in zip(intervened, base)])


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


@dataclass
class Interval:
    """A mean with a two-sided Student-t confidence interval over ``n`` observations."""

    mean: float
    low: float
    high: float
    se: float
    confidence: float
    n: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def within(self, low: float, high: float) -> "Interval":
        """The interval cut to the range the quantity can take (a rate's t-interval can pass 100%)."""
        return replace(self, low=max(self.low, low), high=min(self.high, high))


def mean_difference_ci(per_sequence: torch.Tensor, confidence: float = 0.95) -> Interval:
    """Mean of ``per_sequence`` ``[S]`` with a two-sided Student-t interval: mean +- t * sd / sqrt(S)."""
    n = per_sequence.numel()
    if n < 2:
        raise ValueError(f"a confidence interval needs at least 2 sequences, got {n}")
    values = per_sequence.double()
    mean, se = float(values.mean()), float(values.std(unbiased=True)) / math.sqrt(n)
    half = t_quantile(0.5 + confidence / 2, n - 1) * se
    return Interval(mean, mean - half, mean + half, se, confidence, n)


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> Interval:
    """A rate with its Wilson score interval (sane at 0 and 1, unlike mean ± z·se)."""
    if n < 1:
        raise ValueError("a rate needs at least one trial")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return Interval(p, max(0.0, centre - half), min(1.0, centre + half), math.sqrt(p * (1 - p) / n), confidence, n)


@dataclass
class LensShift:
    """Per-layer lens metrics on the same text, intact vs intervened."""

    lens: str
    base: LayerMetrics
    intervened: LayerMetrics

    def shift(self, metric: str) -> list[float]:
        return [b - a for a, b in zip(getattr(self.base, metric), getattr(self.intervened, metric))]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"lens": self.lens}
        for metric in ("ce", "kl"):
            out[metric] = {"base": getattr(self.base, metric), "intervened": getattr(self.intervened, metric), "shift": self.shift(metric)}
        return out


@dataclass
class InterventionEvaluation:
    """How an intervention moves the model's log-probs (and, optionally, the lens) on held-out text."""

    sequences: int
    tokens: int
    logprob_diff: Interval
    """Intervened - intact log-prob of the actual next tokens, nats per token, interval over sequences."""
    loss_base: float
    loss_intervened: float
    lens_shift: LensShift | None = None

    @property
    def perplexity_ratio(self) -> float:
        return math.exp(self.loss_intervened - self.loss_base)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "unit": "nats per token",
            "sequences": self.sequences,
            "tokens": self.tokens,
            "logprob_diff": self.logprob_diff.to_json(),
            "loss": {"base": self.loss_base, "intervened": self.loss_intervened},
            "perplexity": {
                "base": math.exp(self.loss_base),
                "intervened": math.exp(self.loss_intervened),
                "ratio": self.perplexity_ratio,
            },
        }
        if self.lens_shift is not None:
            out["lens_shift"] = self.lens_shift.to_json()
        return out

    def line(self, name: str) -> str:
        ci = self.logprob_diff
        return (
            f"{name}: log-prob diff {ci.mean:+.4f} nats/token [{ci.low:+.4f}, {ci.high:+.4f}] "
            f"({ci.confidence:.0%} CI, {self.sequences} seqs), perplexity x{self.perplexity_ratio:.3f}"
        )


def evaluate_intervention(
    model: PreTrainedModel,
    sequences: Sequence[torch.Tensor],
    intervention: InterventionFactory,
    lens: Lens | None = None,
    confidence: float = 0.95,
) -> InterventionEvaluation:
    """Log-prob shift (intervened - intact, nats per token) with a CI, perplexity ratio, per-layer lens shift."""
    base = sequence_logprobs(model, sequences)
    with intervention():
        steered = sequence_logprobs(model, sequences)
    per_seq = per_sequence_shift(steered, base)  # [S]
    result = InterventionEvaluation(
        sequences=len(sequences),
        tokens=sum(b.numel() for b in base),
        logprob_diff=mean_difference_ci(per_seq, confidence),
        loss_base=-float(torch.cat(base).mean()),
        loss_intervened=-float(torch.cat(steered).mean()),
    )
    if lens is not None:
        result.lens_shift = lens_loss_shift(model, lens, sequences, intervention)
    return result


def lens_loss_shift(
    model: PreTrainedModel, lens: Lens, sequences: Sequence[torch.Tensor], intervention: InterventionFactory
) -> LensShift:
    """Per-layer lens metrics, intact vs intervened, each sequence run alone (position-keyed steering
    such as ActAdd must see every sequence start at position 0)."""

    def per_layer(which: str) -> LayerMetrics:
        sums = LayerSums()
        bar = tqdm(sequences, desc=f"lens loss per layer, {which}", unit="seq")
        for batch in scored_batches(model, {"lens": lens}, (seq[None] for seq in bar)):
            sums.add({m: batch.stats["lens"][m] for m in METRICS})
        return LayerMetrics.from_sums(sums)

    base = per_layer("intact")
    with intervention():
        intervened = per_layer("intervened")
    return LensShift(lens.kind, base, intervened)


@dataclass
class ProgramLosses:
    """Final loss (mean next-token NLL, nats per token) of the intact model and under each program."""

    intact: float
    programs: dict[str, float]

    def to_json(self) -> dict[str, Any]:
        rows = {
            name: {"loss": loss, "increase": loss - self.intact, "perplexity_ratio": math.exp(loss - self.intact)}
            for name, loss in self.programs.items()
        }
        return {"unit": "nats per token", "intact": self.intact, "programs": rows}

    def lines(self) -> list[str]:
        return [f"{name}: held-out loss {loss:.3f} nats/token (intact {self.intact:.3f})" for name, loss in self.programs.items()]


def program_losses(
    model: PreTrainedModel, sequences: Sequence[torch.Tensor], programs: dict[str, InterventionFactory]
) -> ProgramLosses:
    """Final loss of the intact model and under each surgery program."""

    def loss() -> float:
        return -float(torch.cat(sequence_logprobs(model, sequences)).mean())

    intact = loss()
    losses = {}
    for name, make in programs.items():
        with make():
            losses[name] = loss()
    return ProgramLosses(intact, losses)


@dataclass
class SteeringGrid:
    """Mean log-prob change (intervened - intact, nats per token) for every layer x coefficient: on
    held-out text (the side effect) and on on-topic texts (the effect wanted)."""

    layers: list[int]
    coefficients: list[float]
    held_out: list[list[float]]
    """``[layer][coefficient]``."""
    on_topic: list[list[float]]
    held_out_tokens: int
    on_topic_tokens: int

    def to_json(self) -> dict[str, Any]:
        return {"unit": "nats per token", **asdict(self)}

    def lines(self) -> list[str]:
        cells = [(i, j) for i in range(len(self.layers)) for j in range(len(self.coefficients))]
        i, j = max(cells, key=lambda cell: self.on_topic[cell[0]][cell[1]])
        return [
            f"{len(self.layers)} layers x {len(self.coefficients)} coefficients; {self.held_out_tokens} held-out and {self.on_topic_tokens} on-topic tokens",
            f"largest on-topic log-prob gain: layer {self.layers[i]}, coefficient {self.coefficients[j]:g}: "
            f"{self.on_topic[i][j]:+.3f} on topic, {self.held_out[i][j]:+.3f} held out (nats/token)",
        ]


def steering_grid(
    model: PreTrainedModel,
    held_out: Sequence[torch.Tensor],
    on_topic: Sequence[torch.Tensor],
    steering_at: Callable[[int, float], InterventionFactory],
    layers: Sequence[int],
    coefficients: Sequence[float],
) -> SteeringGrid:
    """Each cell steers with ``steering_at(layer, coefficient)``; the intact log-probs are computed once."""
    texts = {"held_out": held_out, "on_topic": on_topic}
    base = {name: sequence_logprobs(model, seqs) for name, seqs in texts.items()}
    cells: dict[str, list[list[float]]] = {name: [] for name in texts}
    bar = tqdm(total=len(layers) * len(coefficients), desc="steering grid", unit="cell")
    for layer in layers:
        for name in cells:
            cells[name].append([])
        for coefficient in coefficients:
            with steering_at(layer, coefficient)():
                for name, seqs in texts.items():
                    cells[name][-1].append(float(per_sequence_shift(sequence_logprobs(model, seqs), base[name]).mean()))
            bar.update()
    bar.close()
    tokens = {name: sum(b.numel() for b in logprobs) for name, logprobs in base.items()}
    return SteeringGrid(list(layers), list(coefficients), cells["held_out"], cells["on_topic"], tokens["held_out"], tokens["on_topic"])
