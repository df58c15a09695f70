"""Evaluation in depth, streamed over a corpus with bounded memory.

Next to ``lens.evaluate`` (nats per token), this reports bits per byte (the tuned-lens paper's
unit, comparable across tokenizers), per-layer entropy and top-1 agreement with the final layer
(calibration-free), the prediction-depth histogram, and a layer transfer matrix: translator ``i``
applied to layer ``j``'s residual, scored by cross-entropy. Only per-layer running sums are kept,
plus at most ``transfer_tokens`` residual rows for the transfer matrix.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lens.config import DataConfig, ModelConfig
from lens.data import token_sequences
from lens.evaluate import scored_batches
from lens.io import logit_lens_for, write_json
from lens.metrics import lens_token_stats
from lens.model import load_model
from lens.pretrained import lens_or_logit
from lens.trajectory import depth_histogram, prediction_depth
from lens.translators import Lens, TunedLens, Unembed

SUMMED = ("ce", "kl", "entropy", "agreement")


@dataclass
class EvalDepthConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(seq_len=128))
    """Held-out sequences come from the same per-document split training uses."""
    lens_path: Optional[str] = None
    """Lens folder (ours or tuned-lens) or tuned-lens hub id; None: ``checkpoints/<model.name>`` if
    a lens was trained there, else the logit lens alone."""
    allow_mismatch: bool = False
    """Accept a lens whose unembedding fingerprint differs from the model's."""
    sequences: int = 16
    """Held-out sequences streamed through the evaluation."""
    batch_size: int = 4
    """Sequences per forward pass."""
    transfer_tokens: int = 128
    """Tokens scored for the layer transfer matrix (its cost is layers^2 unembeddings per token)."""
    transfer_stride: int = 3
    """Use every n-th layer as source and target in the transfer matrix."""
    out_dir: str = "eval/out/smollm2-135m"
    """Where ``eval_depth.json``, ``eval_depth.png`` and ``transfer.png`` are written."""


class FixedTranslator(Lens):
    """Translator ``source`` of a tuned lens applied at whatever layer it is given."""

    kind = "fixed"

    def __init__(self, lens: TunedLens, source: int) -> None:
        super().__init__(lens.n_layers, lens.d_model)
        self.lens, self.source = lens, source

    def translate_layer(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        return self.lens.translate_layer(h, self.source)


@torch.no_grad()
def transfer_matrix(
    lens: TunedLens,
    unembed: Unembed,
    residuals: torch.Tensor,  # [L+1, N, d]
    final_logits: torch.Tensor,  # [N, V]
    targets: torch.Tensor,  # [N]
    layers: list[int],
) -> torch.Tensor:
    """Mean CE (nats) of translator ``layers[a]`` applied to layer ``layers[b]``: ``[S, S]``."""
    picked = residuals[layers]  # [S, N, d]
    rows = [lens_token_stats(FixedTranslator(lens, i), unembed, picked, final_logits, targets)["ce"].mean(-1) for i in layers]
    return torch.stack(rows)


def text_bytes(tokenizer: PreTrainedTokenizerBase, ids: torch.Tensor) -> int:
    """UTF-8 bytes of the text the scored tokens spell (special tokens such as EOS count zero)."""
    return len(tokenizer.decode(ids.tolist(), skip_special_tokens=True).encode("utf-8"))


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
) -> dict[str, Any]:
    """Per-layer metrics of each lens in nats per token and bits per byte, over a stream of sequences."""
    unembed = Unembed(model)
    n_layers = next(iter(lenses.values())).n_layers
    sums = {name: {m: torch.zeros(n_layers + 1, dtype=torch.float64) for m in SUMMED} for name in lenses}
    hists = {name: torch.zeros(n_layers + 1, dtype=torch.long) for name in lenses}
    kept: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # transfer-matrix rows, <= transfer_tokens
    n_tokens = n_bytes = n_kept = 0
    stream = iter(sequences)
    bar = tqdm(total=total, desc="eval depth", unit="seq", disable=not progress)
    batches = iter(lambda: list(itertools.islice(stream, batch_size)), [])  # bounded memory: one batch at a time
    for batch in scored_batches(model, lenses, map(torch.stack, batches)):
        final_top1 = batch.final_logits.argmax(-1).cpu()  # [N]
        n_tokens += len(batch.targets)
        n_bytes += sum(text_bytes(tokenizer, seq[1:]) for seq in batch.ids.cpu())
        for name, stats in batch.stats.items():
            top1 = stats["top_ids"][..., 0]  # [L+1, N]
            stats["agreement"] = (top1 == final_top1).float()
            for metric in SUMMED:
                sums[name][metric] += stats[metric].double().sum(-1)
            hists[name] += depth_histogram(prediction_depth(top1, final_top1), n_layers)
        if n_kept < transfer_tokens:
            take = slice(0, transfer_tokens - n_kept)
            kept.append((batch.residuals[:, take].cpu(), batch.final_logits[take].cpu(), batch.targets[take].cpu()))
            n_kept += kept[-1][2].numel()
        bar.update(len(batch.ids))
    bar.close()
    if n_tokens == 0:
        raise ValueError("no tokens to evaluate: the sequence stream was empty")
    to_bpb = n_tokens / n_bytes / math.log(2) if n_bytes else math.nan
    results: dict[str, Any] = {
        "tokens": n_tokens,
        "bytes": n_bytes,
        "units": {"ce, kl, entropy": "nats per token", "*_bpb": "bits per byte", "agreement": "fraction of tokens"},
        "lenses": {},
    }
    for name in lenses:
        per_layer: dict[str, Any] = {m: (sums[name][m] / n_tokens).tolist() for m in SUMMED}
        for metric in ("ce", "kl"):
            per_layer[f"{metric}_bpb"] = [x * to_bpb for x in per_layer[metric]]
        per_layer["mean_ce"] = sum(per_layer["ce"][:-1]) / n_layers
        per_layer["mean_ce_bpb"] = per_layer["mean_ce"] * to_bpb
        per_layer["mean_kl"] = sum(per_layer["kl"][:-1]) / n_layers
        hist = hists[name]
        per_layer["depth_histogram"] = hist.tolist()
        per_layer["mean_depth"] = float((hist * torch.arange(n_layers + 1)).sum() / hist.sum())
        results["lenses"][name] = per_layer
    tuned = {name: lens for name, lens in lenses.items() if isinstance(lens, TunedLens)}
    if tuned and kept:
        name, lens = next(iter(tuned.items()))
        layers = list(range(0, n_layers, max(1, transfer_stride)))
        res = torch.cat([r for r, _, _ in kept], dim=1)  # [L+1, n, d]
        fin = torch.cat([f for _, f, _ in kept])  # [n, V]
        tgt = torch.cat([t for _, _, t in kept])  # [n]
        ce = transfer_matrix(lens, unembed, res, fin, tgt, layers)
        results["transfer"] = {"lens": name, "layers": layers, "tokens": len(tgt), "ce": ce.tolist(), "ce_bpb": (ce * to_bpb).tolist()}
    return results


def run_eval(cfg: EvalDepthConfig) -> dict[str, Any]:
    """Load model and lens, evaluate held-out text, write JSON + figures; the logit lens always joins."""
    from lens.plots import plot_eval_depth, plot_heatmap

    model, tokenizer = load_model(cfg.model.name, cfg.model.dtype)
    lens = lens_or_logit(cfg.lens_path, model, cfg.model.name, cfg.allow_mismatch)
    lenses = {lens.kind: lens, "logit": logit_lens_for(model)}
    sequences = token_sequences(cfg.data, tokenizer, held_out=True, limit=cfg.sequences)
    results = evaluate_depth(
        model, tokenizer, lenses, sequences, cfg.batch_size, cfg.transfer_tokens, cfg.transfer_stride, total=cfg.sequences
    )
    results.update(model=cfg.model.name, lens_path=cfg.lens_path)
    out = Path(cfg.out_dir)
    write_json(results, out / "eval_depth.json")
    plot_eval_depth(results, out / "eval_depth.png", title=f"{cfg.model.name}: held-out evaluation, {results['tokens']} tokens")
    if "transfer" in results:
        t = results["transfer"]
        plot_heatmap(
            t["ce_bpb"], out / "transfer.png", xlabels=t["layers"], ylabels=t["layers"],
            xlabel="applied at layer", ylabel="translator trained for layer", cbar_label="cross-entropy [bits/byte]",
            title=f"{cfg.model.name}: layer transfer of the tuned lens ({t['tokens']} tokens)",
        )
    return results
