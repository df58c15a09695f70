"""Benchmark held-out evaluation: the published tuned-lens eval loop vs ``evaluate_lenses``.

``python eval/bench_eval.py`` (about 3 minutes on 2 CPU cores). Both read the same held-out
sequences of the embedded default through the same two lenses (the shipped pretrained lens and
the logit lens) and produce per-layer mean cross-entropy, entropy and KL(final || lens):

- ``published``: AlignmentResearch/tuned-lens ``scripts/eval_loop.py`` (``_evaluate_lenses_on_hidden``),
  re-implemented: one forward with ``output_hidden_states``, then per layer and lens the full
  ``log_softmax``, its ``exp``, ``cross_entropy`` (which takes the log-softmax again), the entropy and the
  KL as elementwise sums over the vocabulary, on the whole batch at once.
- ``ours``: ``lens.analysis.evaluate.evaluate_lenses`` (residuals by hooks, the unembedding skipped
  where nothing reads it, ``lens_layer_stats``: KL through ``p W``, then logsumexp, target logit and
  entropy in two compiled passes over each block of logits), float32; and the same with bf16 matmul
  inputs, which the learning curves use.

Accuracy: every path's per-layer means are compared with the same statistics in float64 on the
same tokens. Writes ``eval/out/bench_eval.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from lens.analysis.evaluate import evaluate_lenses
from lens.analysis.layers import LayerSums
from lens.artifacts.registry import load_pretrained
from lens.config import TrainConfig, load_config
from lens.core.metrics import Reading, lens_layer_stats, row_stats
from lens.core.residuals import capture_residuals
from lens.core.translators import Lens, Unembed, logit_lens_for
from lens.training.datamodule import model_and_data

ROOT = Path(__file__).resolve().parents[1]
STATS = ("ce", "entropy", "kl")


@torch.no_grad()
def published_eval(model, lenses: dict[str, Lens], sequences: torch.Tensor, batch: int) -> dict[str, dict[str, list[float]]]:
    """Per-lens, per-layer means the way tuned-lens' eval loop computes them."""
    unembed = Unembed(model)
    sums = {name: LayerSums() for name in lenses}
    for ids in sequences.split(batch):
        output = model(input_ids=ids, output_hidden_states=True, use_cache=False)
        final_lps = output.logits[:, :-1].log_softmax(-1)  # the last position has no label
        final_probs = final_lps.exp()
        labels = ids[:, 1:]
        for name, lens in lenses.items():
            per_layer: dict[str, list[torch.Tensor]] = {s: [] for s in STATS}
            for layer, h in enumerate(output.hidden_states[:-1]):
                lens_lps = unembed(lens.translate_layer(h[:, :-1], layer)).log_softmax(-1)
                lens_probs = lens_lps.exp()
                per_layer["ce"].append(F.cross_entropy(lens_lps.flatten(0, 1), labels.flatten(), reduction="none"))
                per_layer["entropy"].append(torch.sum(-lens_probs * lens_lps, dim=-1).flatten())
                per_layer["kl"].append(torch.sum(final_probs * (final_lps - lens_lps), dim=-1).flatten())
            per_layer["ce"].append(F.cross_entropy(final_lps.flatten(0, 1), labels.flatten(), reduction="none"))
            per_layer["entropy"].append(torch.sum(-final_probs * final_lps, dim=-1).flatten())
            per_layer["kl"].append(torch.zeros_like(per_layer["kl"][-1]))
            sums[name].add({s: torch.stack(v) for s, v in per_layer.items()})
    return {name: s.means() for name, s in sums.items()}


def ours(model, lenses: dict[str, Lens], sequences: torch.Tensor, batch: int) -> dict[str, dict[str, list[float]]]:
    evaluation = evaluate_lenses(model, lenses, sequences, batch, progress=False)
    return {name: {s: getattr(m, s) for s in STATS} for name, m in evaluation.lenses.items()}


@torch.no_grad()
def ours_bf16(model, lenses: dict[str, Lens], sequences: torch.Tensor, batch: int) -> dict[str, dict[str, list[float]]]:
    unembed = Unembed(model)
    sums = {name: LayerSums() for name in lenses}
    for ids in sequences.split(batch):
        reading = Reading.scored(*capture_residuals(model, ids), ids)
        for name, lens in lenses.items():
            sums[name].add(lens_layer_stats(lens, unembed, reading, matmul_dtype=torch.bfloat16))
    return {name: s.means() for name, s in sums.items()}


@torch.no_grad()
def float64_truth(model, lenses: dict[str, Lens], sequences: torch.Tensor, batch: int) -> dict[str, dict[str, list[float]]]:
    """The same statistics from the same float32 residuals, with lens, final norm and unembedding in float64."""
    unembed = copy.deepcopy(Unembed(model)).double()
    sums = {name: LayerSums() for name in lenses}
    for ids in sequences.split(batch):
        residuals, _ = capture_residuals(model, ids, logits=False)
        residuals = residuals[:, :, :-1].double()  # [L+1, b, T-1, d]
        final_lps = unembed(residuals[-1]).log_softmax(-1)
        final_probs, labels = final_lps.exp(), ids[:, 1:].flatten()
        for name, lens in lenses.items():
            lens64 = copy.deepcopy(lens).double()
            rows: dict[str, list[torch.Tensor]] = {s: [] for s in STATS}
            for layer in range(residuals.shape[0] - 1):
                lps = unembed(lens64.translate_layer(residuals[layer], layer)).log_softmax(-1)
                rows["ce"].append(-lps.flatten(0, 1).gather(-1, labels[:, None])[:, 0])
                rows["entropy"].append(-(lps.exp() * lps).sum(-1).flatten())
                rows["kl"].append((final_probs * (final_lps - lps)).sum(-1).flatten())
            rows["ce"].append(-final_lps.flatten(0, 1).gather(-1, labels[:, None])[:, 0])
            rows["entropy"].append(-(final_probs * final_lps).sum(-1).flatten())
            rows["kl"].append(torch.zeros_like(rows["kl"][-1]))
            sums[name].add({s: torch.stack(v) for s, v in rows.items()})
    return {name: s.means() for name, s in sums.items()}


def timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def max_error(got: dict, truth: dict) -> dict[str, float]:
    """Largest |difference| over lenses and layers of each statistic's mean (nats)."""
    return {s: max(abs(a - b) for name in truth for a, b in zip(got[name][s], truth[name][s])) for s in STATS}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sequences", type=int, default=8, help="held-out sequences of 128 tokens")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lens", default="smollm2-135m", help="pretrained lens name or folder (load_pretrained)")
    p.add_argument("--out", default=str(ROOT / "eval" / "out" / "bench_eval.json"))
    p.add_argument("--profile", action="store_true", help="then run ours once more under torch.profiler and print its op table")
    args = p.parse_args(argv)
    cfg = load_config(TrainConfig, ROOT / "configs" / "default.yaml", [f"data.max_eval_sequences={args.sequences}"])
    model, data = model_and_data(cfg)
    sequences = data.val_sequences[: args.sequences]  # type: ignore[index]
    lenses: dict[str, Lens] = {"tuned": load_pretrained(args.lens, model=model), "logit": logit_lens_for(model)}
    tokens = sequences.shape[0] * (sequences.shape[1] - 1)
    arms = {"published": published_eval, "ours": ours, "ours_bf16": ours_bf16}
    results: dict[str, Any] = {}
    # row_stats compiles once per process and logits dtype (cached on disk after); timed apart, not per token
    _, compile_s, _ = timed(lambda: [row_stats(torch.zeros(2, model.config.vocab_size, dtype=dtype), torch.zeros(2, 1, dtype=torch.long))
                                     for dtype in (torch.float32, torch.bfloat16)])
    for name, fn in arms.items():
        means, wall, cpu = timed(lambda fn=fn: fn(model, lenses, sequences, args.batch))
        results[name] = {"wall_s": wall, "cpu_s": cpu, "tokens_per_s": tokens / wall, "means": means}
    truth, truth_wall, _ = timed(lambda: float64_truth(model, lenses, sequences, args.batch))
    for name in arms:
        results[name]["max_error_vs_float64"] = max_error(results[name]["means"], truth)
    report = {
        "tokens": tokens, "lenses": list(lenses), "threads": torch.get_num_threads(), "arms": results,
        "speedup_ours": results["published"]["wall_s"] / results["ours"]["wall_s"],
        "speedup_ours_bf16": results["published"]["wall_s"] / results["ours_bf16"]["wall_s"],
        "float64_wall_s": truth_wall, "compile_s": compile_s,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print("| eval | wall s (CPU s) | tokens/s | max |error| of a per-layer mean vs float64: CE / entropy / KL (nats) |")
    print("|---|---|---|---|")
    for name, r in results.items():
        e = r["max_error_vs_float64"]
        print(f"| {name} | {r['wall_s']:.1f} ({r['cpu_s']:.1f}) | {r['tokens_per_s']:.0f} | {e['ce']:.1e} / {e['entropy']:.1e} / {e['kl']:.1e} |")
    print(f"speedup vs published: ours {report['speedup_ours']:.2f}x, ours bf16 {report['speedup_ours_bf16']:.2f}x "
          f"(compiling first: {compile_s:.1f} s, once); wrote {args.out}")
    if args.profile:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            ours(model, lenses, sequences, args.batch)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))


if __name__ == "__main__":
    main()
