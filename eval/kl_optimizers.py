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
from typing import Any

import torch

from lens.analysis.evaluate import evaluate_lenses
from lens.artifacts.files import write_json
from lens.artifacts.registry import load_lens, save_lens
from lens.config import OptimConfig, TrainConfig, load_config
from lens.core.closed_form import closed_form_start
from lens.core.translators import TunedLens
from lens.training.datamodule import model_and_data
from lens.training.module import TunedLensModule, make_optimizer, warmup_then_linear_decay

ROOT = Path(__file__).resolve().parents[1]
# Adam divides each update by the gradient's running scale, so a clip that rescales the whole gradient changes little
SPECS = "sgd:sgd:1:1:80,adam:adam:1:0:80,sgd_noclip:sgd:1:0:80,adam_lr3e-3:adam:3:0:80,adam_lr3e-4:adam:0.3:0:80"


def gradient_norms(module: TunedLensModule, lens: TunedLens, sequences: torch.Tensor, batches: int, batch_size: int) -> list[dict[str, Any]]:
    """The unclipped KL gradient on ``batches`` batches: its total norm, per-layer norms, and the weights' norms."""
    torch.manual_seed(0)
    rows = []
    for _ in range(batches):
        lens.zero_grad()
        module.part_losses(sequences[torch.randint(len(sequences), (batch_size,))]).sum().backward()
        per_layer = torch.cat([lens.weight.grad.flatten(1), lens.bias.grad], 1).norm(dim=1)  # [L]
        rows.append({"total": per_layer.norm().item(), "per_layer": per_layer.tolist()})
    lens.zero_grad()
    weights = torch.cat([lens.weight.detach().flatten(1), lens.bias.detach()], 1).norm(dim=1)
    return [*rows, {"weight_norm_per_layer": weights.tolist()}]


def run_spec(module_args: tuple, lens0: TunedLens, spec: str, sequences: torch.Tensor, batch_size: int, score) -> dict[str, Any]:
    """One spec from the shared start: its own schedule, the shared batches, read at 1/4, 1/2 and the end."""
    name, optimizer, lr_scale, clip, steps = spec.split(":")
    clip_norm, total = float(clip), int(steps)
    lens = copy.deepcopy(lens0)
    optim = OptimConfig(optimizer=optimizer, lr_scale=float(lr_scale), weight_decay=0.0, num_steps=total, grad_clip=clip_norm)
    model, lens_cfg = module_args
    module = TunedLensModule(model, lens, lens_cfg, optim)
    opt = make_optimizer(lens.parameters(), optim)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_then_linear_decay(s, 0, total))
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
    return {"optimizer": optimizer, "lr_scale": float(lr_scale), "grad_clip": clip_norm, "steps": total,
            "mean_kl": reads, "seconds_with_reads": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "pretrained_smollm2.yaml"))
    p.add_argument("--specs", default=SPECS, help="comma-separated name:optimizer:lr_scale:grad_clip:steps")
    p.add_argument("--held-out", type=int, default=8, help="held-out sequences scored (8 x 127 = 1,016 tokens)")
    p.add_argument("--grad-batches", type=int, default=3, help="batches on which the unclipped gradient is measured")
    p.add_argument("--out", default=str(ROOT / "eval" / "out"))
    args = p.parse_args(argv)
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
    probe = copy.deepcopy(lens0)
    grads = gradient_norms(TunedLensModule(model, probe, cfg.lens, cfg.optim), probe, sequences, args.grad_batches, cfg.data.batch_size)
    record["unclipped_gradient"] = grads
    print("unclipped KL gradient norm per batch:", ", ".join(f"{g['total']:.2f}" for g in grads[:-1]), flush=True)
    record["specs"] = {}
    for spec in args.specs.split(","):
        record["specs"][spec.split(":")[0]] = run_spec((model, cfg.lens), lens0, spec, sequences, cfg.data.batch_size, score)
        write_json(record, out / "kl_optimizers.json")
    print(f"wrote {out / 'kl_optimizers.json'}")


if __name__ == "__main__":
    main()
