"""Evaluation in depth, streamed over a corpus with bounded memory.

Next to ``lens.analysis.evaluate`` (nats per token), this reports bits per byte (the tuned-lens
paper's unit, comparable across tokenizers), per-layer entropy and top-1 agreement with the final
layer (calibration-free), the prediction-depth histogram, and a layer transfer matrix: translator
``i`` applied to layer ``j``'s residual, scored by cross-entropy. Only per-layer running sums are
kept, plus at most ``transfer_tokens`` residual rows for the transfer matrix.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lens.analysis.evaluate import METRICS, scored_batches
from lens.analysis.layers import LayerMetrics, LayerSums
from lens.analysis.trajectory import depth_histogram, prediction_depth
from lens.core.metrics import Reading, lens_token_stats
from lens.core.translators import Lens, TunedLens, Unembed


class FixedTranslator(Lens):
    """Translator ``source`` of a tuned lens applied at whatever layer it is given."""

    kind = "fixed"

    def __init__(self, lens: TunedLens, source: int) -> None:
        super().__init__(lens.n_layers, lens.d_model)
        self.lens, self.source = lens, source

    def translate_layer(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        return self.lens.translate_layer(h, self.source)


@torch.no_grad()
def transfer_matrix(lens: TunedLens, unembed: Unembed, reading: Reading, layers: list[int]) -> torch.Tensor:
    """Mean CE (nats) of translator ``layers[a]`` applied to layer ``layers[b]``: ``[S, S]``."""
    picked = Reading(reading.residuals[layers], reading.final_logits, reading.targets)  # [S, N, d]
    rows = [lens_token_stats(FixedTranslator(lens, i), unembed, picked)["ce"].mean(-1) for i in layers]
    return torch.stack(rows)


def text_bytes(tokenizer: PreTrainedTokenizerBase, ids: torch.Tensor) -> int:
    """UTF-8 bytes of the text the scored tokens spell (special tokens such as EOS count zero)."""
    return len(tokenizer.decode(ids.tolist(), skip_special_tokens=True).encode("utf-8"))


@dataclass
class DepthMetrics(LayerMetrics):
    """``LayerMetrics`` plus top-1 agreement with the final layer and the prediction-depth histogram."""

    agreement: list[float]
    """Fraction of tokens whose top-1 at this layer is the final layer's top-1."""
    depth_histogram: list[int]
    """Tokens per prediction depth ``0..L`` (first layer whose top-1 stays the final top-1)."""
    bits_per_nat_token: float
    """Converts nats per token of this corpus to bits per byte (tokens / bytes / ln 2)."""

    @property
    def mean_depth(self) -> float:
        hist = torch.tensor(self.depth_histogram, dtype=torch.float64)
        return float((hist * torch.arange(len(hist))).sum() / hist.sum())

    def to_json(self) -> dict[str, Any]:
        to_bpb = self.bits_per_nat_token
        out = super().to_json()
        del out["perplexity"]
        return {
            **out,
            "agreement": self.agreement,
            "ce_bpb": [x * to_bpb for x in self.ce],
            "kl_bpb": [x * to_bpb for x in self.kl],
            "mean_ce_bpb": self.mean_ce * to_bpb,
            "depth_histogram": self.depth_histogram,
            "mean_depth": self.mean_depth,
        }


@dataclass
class TransferMatrix:
    """Mean CE (nats) of translator ``layers[a]`` applied at layer ``layers[b]``, on the first ``tokens`` tokens."""

    lens: str
    layers: list[int]
    tokens: int
    ce: list[list[float]]
    bits_per_nat_token: float

    def to_json(self) -> dict[str, Any]:
        bpb = [[x * self.bits_per_nat_token for x in row] for row in self.ce]
        return {"lens": self.lens, "layers": self.layers, "tokens": self.tokens, "ce": self.ce, "ce_bpb": bpb}


@dataclass
class DepthEvaluation:
    tokens: int
    bytes: int
    lenses: dict[str, DepthMetrics]
    transfer: TransferMatrix | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "tokens": self.tokens,
            "bytes": self.bytes,
            "units": {"ce, kl, entropy": "nats per token", "*_bpb": "bits per byte", "agreement": "fraction of tokens"},
            "lenses": {name: m.to_json() for name, m in self.lenses.items()},
        }
        if self.transfer is not None:
            out["transfer"] = self.transfer.to_json()
        return out

    def lines(self) -> list[str]:
        return [
            f"{name:>6} lens: mean CE {m.mean_ce:.3f} nats/token = {m.mean_ce * m.bits_per_nat_token:.3f} bits/byte, "
            f"agreement with the final layer at layer 0 {m.agreement[0]:.2f}, mean prediction depth {m.mean_depth:.2f}"
            for name, m in self.lenses.items()
        ]


@torch.no_grad()
def evaluate_depth(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    lenses: dict[str, Lens],
    sequences: Iterable[torch.Tensor],  # each [T]
    batch_size: int = 4,
    transfer_tokens: int = 128,
    transfer_stride: int = 1,
    total: int | None = None,
    progress: bool = True,
) -> DepthEvaluation:
    """Per-layer metrics of each lens in nats per token and bits per byte, over a stream of sequences."""
    unembed = Unembed(model)
    n_layers = next(iter(lenses.values())).n_layers
    sums = {name: LayerSums() for name in lenses}
    hists = {name: torch.zeros(n_layers + 1, dtype=torch.long) for name in lenses}
    kept: list[Reading] = []  # transfer-matrix positions, <= transfer_tokens
    n_bytes = n_kept = 0
    stream = iter(sequences)
    bar = tqdm(total=total, desc="eval depth", unit="seq", disable=not progress)
    batches = iter(lambda: list(itertools.islice(stream, batch_size)), [])  # bounded memory: one batch at a time
    for batch in scored_batches(model, lenses, map(torch.stack, batches)):
        final_top1 = batch.reading.final_logits.argmax(-1).cpu()  # [N]
        n_bytes += sum(text_bytes(tokenizer, seq[1:]) for seq in batch.ids.cpu())
        for name, stats in batch.stats.items():
            top1 = stats["top_ids"][..., 0]  # [L+1, N]
            sums[name].add({**{m: stats[m] for m in METRICS}, "agreement": (top1 == final_top1).float()})
            hists[name] += depth_histogram(prediction_depth(top1, final_top1), n_layers)
        if n_kept < transfer_tokens:
            take = slice(0, transfer_tokens - n_kept)
            kept.append(batch.reading.positions(take))
            n_kept += kept[-1].final_logits.shape[0]
        bar.update(len(batch.ids))
    bar.close()
    n_tokens = next(iter(sums.values())).tokens
    if n_tokens == 0:
        raise ValueError("no tokens to evaluate: the sequence stream was empty")
    to_bpb = n_tokens / n_bytes / math.log(2) if n_bytes else math.nan
    metrics = {}
    for name, total_sums in sums.items():
        means = total_sums.means()
        metrics[name] = DepthMetrics(means["ce"], means["kl"], means["entropy"], means["agreement"], hists[name].tolist(), to_bpb)
    result = DepthEvaluation(n_tokens, n_bytes, metrics)
    tuned = {name: lens for name, lens in lenses.items() if isinstance(lens, TunedLens)}
    if tuned and kept:
        name, lens = next(iter(tuned.items()))
        layers = list(range(0, n_layers, max(1, transfer_stride)))
        reading = Reading.cat(kept)
        ce = transfer_matrix(lens, unembed, reading, layers)
        result.transfer = TransferMatrix(name, layers, reading.final_logits.shape[0], ce.tolist(), to_bpb)
    return result
