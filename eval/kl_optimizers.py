"""Which optimizer should take the KL steps after the closed form? SGD, Adam, with and without the clip.

``python eval/kl_optimizers.py`` (about 30 minutes on 2 CPU cores: the closed form once, then about
5 minutes per 80-step spec). Everything starts from the same lens, the ridge fit on every training
sequence of the config (``lens.lstsq_sequences``), cached under ``--out`` as safetensors. Each spec
``name:optimizer:lr_scale:grad_clip:steps`` is then its own run with its own linear-decay schedule, on the
same batches and the same 64 random positions per layer and step (the generators are re-seeded per
spec), without weight decay. Each is scored at a quarter, half and all of its steps on the first
``--held-out`` held-out sequences (mean KL over layers, ``evaluate_lenses``, float32).

Before any step it also measures the *unclipped* KL gradient (the sum of the 30 layers' losses, as
``lens train`` minimises) on a few batches: its norm against the clip (1.0, the tuned-lens recipe) says
whether SGD's steps are bounded by the clip rather than by the learning rate. Writes
``eval/out/kl_optimizers.json``.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path
from typing import Any, Callable, get_args

import torch

from lens.analysis.evaluate import evaluate_lenses
from lens.artifacts.files import write_json
from lens.artifacts.registry import load_lens, save_lens
from lens.config import LensConfig, OptimConfig, Optimizer, TrainConfig, load_config
from lens.core.closed_form import closed_form_start
from lens.core.translators import TunedLens
from lens.training.datamodule import model_and_data
from lens.training.module import TunedLensModule

ROOT = Path(__file__).resolve().parents[1]
# Adam divides each update by the gradient's running scale, so a clip that rescales the whole gradient changes little
SPECS = "sgd:sgd:1:1:80,adam:adam:1:0:80,sgd_noclip:sgd:1:0:80,adam_lr3e-3:adam:3:0:80,adam_lr3e-4:adam:0.3:0:80"


def per_layer_norms(weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Norm of each layer's translator ``[A | b]``: ``weight [L, d, d]``, ``bias [L, d]`` -> ``[L]``."""
    return torch.cat([weight.flatten(1), bias], 1).norm(dim=1)


def gradient_norms(module: TunedLensModule, sequences: torch.Tensor, batches: int, batch_size: int) -> list[dict[str, Any]]:
    """The unclipped KL gradient on ``batches`` batches: its total norm, per-layer norms, and the weights' norms."""
    lens = module.trainable
    torch.manual_seed(0)
    rows = []
    for _ in range(batches):
        lens.zero_grad()
        module.part_losses(sequences[torch.randint(len(sequences), (batch_size,))]).sum().backward()
        per_layer = per_layer_norms(lens.weight.grad, lens.bias.grad)
        rows.append({"total": per_layer.norm().item(), "per_layer": per_layer.tolist()})
    lens.zero_grad()
    return [*rows, {"weight_norm_per_layer": per_layer_norms(lens.weight.detach(), lens.bias.detach()).tolist()}]


def parse_spec(spec: str) -> tuple[str, OptimConfig]:
    """``name:optimizer:lr_scale:grad_clip:steps`` as a name and the run's optimizer settings, checked before any model loads."""
    fields = spec.split(":")
    try:
        name, optimizer, lr_scale, clip, steps = fields
        optim = OptimConfig(optimizer=optimizer, lr_scale=float(lr_scale), weight_decay=0.0, num_steps=int(steps), grad_clip=float(clip))  # type: ignore[arg-type]
    except ValueError:
        raise ValueError(f"spec {spec!r}: write name:optimizer:lr_scale:grad_clip:steps, e.g. adam:adam:1:0:80") from None
    if optimizer not in get_args(Optimizer) or optim.lr_scale <= 0 or optim.grad_clip < 0 or optim.num_steps < 4:
        raise ValueError(f"spec {spec!r}: optimizer one of {', '.join(get_args(Optimizer))}, lr_scale > 0, grad_clip >= 0 "
                         "(0: no clip), steps >= 4 (read at a quarter, half and all of them)")
    return name, optim


def run_spec(
    model, lens_cfg: LensConfig, lens0: TunedLens, spec: str, sequences: torch.Tensor, batch_size: int, score: Callable[[TunedLens], float]
) -> dict[str, Any]:
    """One spec from the shared start: its own schedule (``lens train``'s, from ``configure_optimizers``),
    the shared batches, read at 1/4, 1/2 and the end."""
    name, optim = parse_spec(spec)
    clip_norm, total = optim.grad_clip, optim.num_steps
    lens = copy.deepcopy(lens0)
    module = TunedLensModule(model, lens, lens_cfg, optim)
    configured = module.configure_optimizers()
    opt, schedule = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    batches = torch.Generator().manual_seed(1)
    torch.manual_seed(1)  # the positions each step keeps
    reads, start = {}, time.perf_counter()
    for step in range(1, total + 1):
        module.part_losses(sequences[torch.randint(len(sequences), (batch_size,), generator=batches)]).sum().backward()
        if clip_norm:
            torch.nn.utils.clip_grad_norm_(lens.parameters(), clip_norm)
        opt.step()
        schedule.step()
        opt.zero_grad(set_to_none=True)
        if step in (total // 4, total // 2, total):
            reads[step] = score(lens)
            print(f"{name:>12} step {step:>5}: mean KL {reads[step]:.4f}", flush=True)
    return {"optimizer": optim.optimizer, "lr_scale": optim.lr_scale, "grad_clip": clip_norm, "steps": total,
            "mean_kl": reads, "seconds_with_reads": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "pretrained_smollm2.yaml"))
    p.add_argument("--specs", default=SPECS, help="comma-separated name:optimizer:lr_scale:grad_clip:steps")
    p.add_argument("--held-out", type=int, default=8, help="held-out sequences scored (8 x 127 = 1,016 tokens)")
    p.add_argument("--grad-batches", type=int, default=3, help="batches on which the unclipped gradient is measured")
    p.add_argument("--out", default=str(ROOT / "eval" / "out"))
    args = p.parse_args(argv)
    try:
        specs = args.specs.split(",")
        names = [parse_spec(spec)[0] for spec in specs]
    except ValueError as e:
        p.error(f"--specs: {e}")
    if len(set(names)) != len(names):
        p.error(f"--specs: the names {names} repeat; give each spec its own name (the first field)")
    cfg = load_config(TrainConfig, args.config, ["trainer.progress_bar=false"])
    model, data = model_and_data(cfg)
    sequences = data.train_sequences(10**9)
    held_out = data.val_sequences[: args.held_out]
    out = Path(args.out)
    start_dir = out / f"kl_optimizers_cf{cfg.lens.lstsq_sequences}"
    if (start_dir / "config.json").is_file():
        lens0 = load_lens(start_dir, model=model)
    else:
        lens0 = TunedLens.for_model(model)
        closed_form_start(model, lens0, sequences[: cfg.lens.lstsq_sequences], cfg.data.batch_size, cfg.lens.ridge)
        save_lens(lens0, start_dir, model)

    def score(lens: TunedLens) -> float:
        return evaluate_lenses(model, {"lens": lens}, held_out, cfg.data.batch_size, progress=False).lenses["lens"].mean_kl

    record: dict[str, Any] = {"config": args.config, "held_out_tokens": int(held_out[:, 1:].numel()), "start_mean_kl": score(lens0)}
    print(f"closed form on {cfg.lens.lstsq_sequences} sequences: mean KL {record['start_mean_kl']:.4f}", flush=True)
    grads = gradient_norms(TunedLensModule(model, copy.deepcopy(lens0), cfg.lens, cfg.optim), sequences, args.grad_batches, cfg.data.batch_size)
    record["unclipped_gradient"] = grads
    print("unclipped KL gradient norm per batch:", ", ".join(f"{g['total']:.2f}" for g in grads[:-1]), flush=True)
    record["specs"] = {}
    for name, spec in zip(names, specs):
        record["specs"][name] = run_spec(model, cfg.lens, lens0, spec, sequences, cfg.data.batch_size, score)
        write_json(record, out / "kl_optimizers.json")
    print(f"wrote {out / 'kl_optimizers.json'}")


if __name__ == "__main__":
    main()
