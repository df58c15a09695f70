"""Single-layer learning curves: how far the shipped budget is from a converged lens, measured past it.

The tuned lens' loss is a sum of per-layer KL terms, and translator ``l`` enters only term ``l``, so
one layer's curve can be measured alone. This script trains one translator with the default path's
KL steps (closed-form start on the same sequences, the config's optimizer, learning rate, schedule
and gradient clip, ``positions_per_layer`` random positions of each ``batch_size x seq_len`` batch
in the same shuffled batch order) on residuals cached once: that layer's and the last one's, for every
training sequence. A step then costs one layer's vocabulary products instead of all layers' plus a
forward of the frozen model, so budgets several doublings past the shipped lens' fit in an hour.

What differs from the full run: the gradient clip sees this layer's gradient alone (the full run
clips the sum over layers; Adam's update hardly depends on the gradient's scale) and the random
positions are drawn from another random stream. ``--budgets`` should include the full runs' budgets
(``docs/learning_curves.json``, ``default_adam``) so that the table shows how close the single-layer
run comes to them at equal steps.

``python eval/layer_convergence.py --layers 0,14 --budgets 1280,10240`` (resumable: finished
``(layer, budget)`` points are kept in ``eval/out/layer_convergence/layers.json`` and skipped);
``--table`` prints the recorded points against the full runs' per-layer KL and redraws the figure.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import trange

from learning_curves import HeldOut, change_per_doubling, cpu_name, power_law_fit
from lens.artifacts.files import write_json
from lens.config import TrainConfig, load_config
from lens.core.closed_form import SINK_POSITIONS, RidgeStats, fit_residuals
from lens.core.metrics import lens_kl_loss
from lens.core.model import model_config
from lens.core.translators import TunedLens, Unembed
from lens.data.batches import ResumableBatches
from lens.report.plots import plot_layer_convergence
from lens.training.datamodule import model_and_data
from lens.training.module import make_optimizer, warmup_then_linear_decay

ROOT = Path(__file__).resolve().parents[1]


@torch.no_grad()
def cache_training_residuals(model, sequences: torch.Tensor, layers: list[int], cf_sequences: int, batch: int) -> tuple[torch.Tensor, RidgeStats]:
    """One forward pass over the training sequences: residuals ``[K+1, n, T, d]`` of ``layers`` and of the
    last layer, and the ridge statistics of the closed form on the first ``cf_sequences`` (the same rows
    ``closed_form_start`` reads: every position but the first ``SINK_POSITIONS``)."""
    rows = [*layers, model.config.num_hidden_layers]
    n, seq_len = sequences.shape
    d = model.config.hidden_size
    cache = torch.empty(len(rows), n, seq_len, d)  # [K+1, n, T, d]
    stats = RidgeStats(len(layers), d)
    passes = fit_residuals(model, sequences, batch, "training residuals", skip_positions=0)  # [L+1, b * T, d] each
    for start, residuals in zip(range(0, n, batch), passes):
        picked = residuals[rows].view(len(rows), -1, seq_len, d)  # [K+1, b, T, d]
        cache[:, start : start + batch] = picked
        fit_rows = max(0, min(batch, cf_sequences - start))
        if fit_rows:
            stats.update(picked[:, :fit_rows, SINK_POSITIONS:].flatten(1, 2))
    return cache, stats


def train_translators(rows: Sequence[torch.Tensor], start: TunedLens, unembed: Unembed, cfg: TrainConfig,
                      steps: int) -> tuple[TunedLens, float]:
    """``steps`` KL steps of a lens of ``K`` translators from ``start`` (copied), on cached residuals: ``rows``
    holds ``K`` layers' ``[n, T, d]`` and the last layer's. The trained lens and the training seconds."""
    lens = TunedLens(start.n_layers, start.d_model)
    lens.load_state_dict(start.state_dict())
    optim = cfg.optim
    opt = make_optimizer(lens.parameters(), optim)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: warmup_then_linear_decay(step, optim.warmup_steps, steps))
    n, seq_len = rows[0].shape[:2]
    batches = iter(ResumableBatches(torch.arange(n), cfg.data.batch_size, cfg.seed))  # the full run's batch order
    positions = torch.Generator().manual_seed(cfg.seed)
    per_batch, keep = cfg.data.batch_size * seq_len, cfg.lens.positions_per_layer
    started = time.perf_counter()
    for _ in trange(steps, desc="KL steps", leave=False):
        (seqs,) = next(batches)  # [B] sequence indices
        flat = torch.randperm(per_batch, generator=positions)[:keep]  # [k] positions of the batch
        seq, pos = seqs[flat // seq_len], flat % seq_len
        residuals = torch.stack([row[seq, pos] for row in rows])  # [K+1, k, d]
        loss = lens_kl_loss(lens, unembed, residuals, unembed(residuals[-1]).float().log_softmax(-1), cfg.lens.kl_chunk)
        loss.sum().backward()
        if optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(lens.parameters(), optim.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return lens, time.perf_counter() - started


def full_run_kl(curves: dict[str, Any], layer: int, arm: str) -> dict[int, float]:
    """The full runs' held-out KL at ``layer`` by KL-step budget, from the learning curves' record."""
    return {p["kl_steps"]: p["kl"][layer] for p in curves["points"] if p["arm"] == arm and p.get("kl_steps")}


def table(record: dict[str, Any], curves: dict[str, Any]) -> str:
    """Per layer and budget: the single-layer run's held-out KL, the change per doubling of steps since the
    previous budget, and the full run's KL at that layer and budget where there is one."""
    rows = ["| layer | KL steps | single-layer KL | change per doubling | full run's KL at this layer | train s |",
            "|---:|---:|---:|---:|---:|---:|"]
    for layer in sorted({p["layer"] for p in record["points"]}):
        full = full_run_kl(curves, layer, record["arm"])
        points = sorted((p for p in record["points"] if p["layer"] == layer), key=lambda p: p["kl_steps"])
        for prev, p in zip([None, *points], points):
            change = ""
            if prev is not None and prev["kl_steps"] > 0:
                change = change_per_doubling(prev["kl_steps"], prev["kl"], p["kl_steps"], p["kl"])
            known = f"{full[p['kl_steps']]:.4f}" if p["kl_steps"] in full else ""
            rows.append(f"| {layer} | {p['kl_steps']:,} | {p['kl']:.4f} | {change} | {known} | {p['train_s']:.0f} |")
    for layer in sorted({p["layer"] for p in record["points"]}):
        trained = sorted((p["kl_steps"], p["kl"]) for p in record["points"] if p["layer"] == layer and p["kl_steps"] > 0)
        if len(trained) >= 4:  # three parameters need a fourth point to be checked against
            floor, scale, alpha = power_law_fit([s for s, _ in trained], [k for _, k in trained])
            rows.append(f"\nlayer {layer}: KL ~ {floor:.3f} + {scale:.3f} * steps^-{alpha:.3f} through {len(trained)} budgets; "
                        f"converged estimate {floor:.3f} nats")
    return "\n".join(rows)


def draw(record: dict[str, Any], curves: dict[str, Any], out: Path) -> Path:
    """The figure of every recorded layer, each with the full runs' KL at that layer."""
    full = {layer: full_run_kl(curves, layer, record["arm"]) for layer in {p["layer"] for p in record["points"]}}
    return plot_layer_convergence(record, full, out / "layer_convergence.png")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "pretrained_smollm2.yaml"), help="the full run whose KL steps are replayed")
    p.add_argument("--layers", default="0,14", help="comma-separated layers (residual after n blocks)")
    p.add_argument("--budgets", default="1280,10240", help="comma-separated KL-step budgets, each its own run and schedule")
    p.add_argument("--eval-seqs", type=int, default=240, help="held-out sequences (240 x 127 = the learning curves' 30,480 tokens)")
    p.add_argument("--curves", default=str(ROOT / "docs" / "learning_curves.json"), help="the full runs' record to compare with")
    p.add_argument("--arm", default="default_adam", help="the learning-curve arm of the config's full runs")
    p.add_argument("--out", default=str(ROOT / "eval" / "out" / "layer_convergence"))
    p.add_argument("--table", action="store_true", help="print the recorded points as a markdown table, redraw the figure and stop")
    p.add_argument("overrides", nargs="*", help="config overrides, key=value (e.g. optim.lr_scale=3)")
    args = p.parse_args(argv)
    try:
        layers = [int(s) for s in args.layers.split(",")]
        budgets = sorted(int(s) for s in args.budgets.split(","))
    except ValueError:
        p.error(f"--layers {args.layers!r} and --budgets {args.budgets!r} take comma-separated integers, e.g. 0,14 and 1280,10240")
    if min(budgets) < 1:
        p.error(f"--budgets {args.budgets!r}: every budget must be at least 1 KL step")
    out, path = Path(args.out), Path(args.out) / "layers.json"
    if not Path(args.curves).is_file():
        p.error(f"--curves {args.curves}: no such file; pass the learning curves' record (docs/learning_curves.json)")
    curves = json.loads(Path(args.curves).read_text())
    arms = sorted({q["arm"] for q in curves["points"]})
    if args.arm not in arms:
        p.error(f"--arm {args.arm!r} has no points in {args.curves}; its arms are {arms}")
    record: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {"points": [], "arm": args.arm}
    if args.table:
        if not record["points"]:
            p.error(f"--table: {path} holds no points; run the layers first or pass --out to a folder holding some")
        print(table(record, curves), f"\nredrew {draw(record, curves, out)}", sep="\n")
        return
    setup = {"config": str(args.config), "overrides": args.overrides, "arm": args.arm}
    if record["points"] and any(record.get(key) != value for key, value in setup.items()):
        p.error(f"{path} holds points of {({key: record.get(key) for key in setup})}, not of {setup}: pass another --out")
    cfg = load_config(TrainConfig, args.config, [f"data.max_eval_sequences={args.eval_seqs}", *args.overrides])
    n_layers = model_config(cfg.model.name).num_hidden_layers  # read without the weights: a bad layer fails first
    if not all(0 <= layer < n_layers for layer in layers):
        p.error(f"--layers {args.layers!r}: {cfg.model.name}'s translators are layers 0-{n_layers - 1}")
    done = {(q["layer"], q["kl_steps"]) for q in record["points"]}
    if all((layer, steps) in done for layer in layers for steps in budgets):
        print(table(record, curves))
        return
    model, data = model_and_data(cfg)
    unembed = Unembed(model)
    held_out = HeldOut.capture(model, data.val_sequences, cfg.data.batch_size)  # type: ignore[arg-type]
    train = data.train_sequences(10**9)
    cache, stats = cache_training_residuals(model, train, layers, cfg.lens.lstsq_sequences, cfg.data.batch_size)
    closed_form = TunedLens(len(layers), model.config.hidden_size)
    stats.apply_to(closed_form, cfg.lens.ridge)
    record.update(setup, model=cfg.model.name, corpus=cfg.data.dataset, held_out_tokens=held_out.tokens,
                  train_sequences=int(train.shape[0]), cf_sequences=cfg.lens.lstsq_sequences, timed_on=cpu_name())
    for i, layer in enumerate(layers):
        start = TunedLens(1, model.config.hidden_size)
        start.load_state_dict({"weight": closed_form.weight[i : i + 1], "bias": closed_form.bias[i : i + 1]})
        scored = HeldOut(held_out.residuals[[layer, n_layers]], held_out.targets, unembed)
        for steps in [0, *budgets]:
            if (layer, steps) in done:
                continue
            lens, seconds = (start, 0.0) if steps == 0 else train_translators([cache[i], cache[-1]], start, unembed, cfg, steps)
            metrics = scored.score(lens, matmul_dtype=None)
            record["points"].append({"layer": layer, "kl_steps": steps, "kl": metrics["kl"][0], "ce": metrics["ce"][0],
                                     "train_s": seconds, "s_per_step": seconds / max(steps, 1)})
            write_json(record, path)
            print(f"layer {layer:2d}, {steps:6,} KL steps: held-out KL {metrics['kl'][0]:.4f} nats ({seconds:.0f} s)")
    print(table(record, curves), f"\nwrote {path} and {draw(record, curves, out)}", sep="\n")


if __name__ == "__main__":
    main()
