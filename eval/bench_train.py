"""Benchmark lens training: the published tuned-lens recipe vs this project's default path.

``python eval/bench_train.py`` (CPU, small budget, < 10 min on 2 cores) or ``--gpu`` (the
published sequence length, bf16). Each arm runs in its own process, back to back, on the same
model, data, batch and token budget, so peak memory is that arm's own:

- ``reference``: the recipe of AlignmentResearch/tuned-lens, re-implemented below from its
  ``tuned_lens/scripts/train_loop.py`` and ``ingredients.py`` (8db471b9) and
  ``tuned_lens/nn/lenses.py`` (18fd0a48): zero-initialised ``h + Linear(h)`` per layer,
  full-vocabulary logits per layer, KL(final || lens), one backward per layer, SGD Nesterov
  (momentum 0.9, lr 1.0 * (1 - 0.9), weight decay 1e-3), linear decay to 0, grad clip 1.0.
- ``ours``: ``configs/default.yaml`` through the project's own functions (closed-form start,
  then Lightning KL fine-tuning with the streaming KL). Its closed-form sequences count
  against the token budget, so it gets fewer KL steps than the reference.

Held-out KL is the straightforward ``lens_kl_loss_reference`` for both arms. Peak memory is
also kept per phase (closed form, each part of a KL step, Lightning's own), and the memory target
is judged on the peak without ours' lens snapshots, which only the benchmark takes. JSON goes to
``eval/out/``; tables are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.utils.tensorboard  # noqa: F401  imported before the memory baseline, in both arms
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, get_linear_schedule_with_warmup

from lens.artifacts.registry import load_lens, save_lens
from lens.config import DEFAULT_MODEL, TrainConfig, load_config
from lens.core.arch import get_final_norm, get_unembed, n_blocks
from lens.core.closed_form import closed_form_start
from lens.core.metrics import lens_kl_loss_reference
from lens.core.model import load_model, prepare_model, prepare_tokenizer
from lens.core.residuals import capture_residuals
from lens.core.translators import TunedLens, Unembed
from lens.training.datamodule import LensDataModule
from lens.training.lens_run import make_trainer
from lens.training.module import TunedLensModule

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(2**20)}
"""glibc otherwise raises its mmap threshold after each large free and keeps later blocks of up
to 32 MiB in the heap, so RSS would measure allocator retention rather than live tensors (ours
allocated ~500 MiB of RSS for ~45 MiB of live blocks). Both arms run with the same fixed threshold."""
ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "eval" / "out"


# ---------------------------------------------------------------- measurement helpers


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _proc_kib(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))  # type: ignore[union-attr]


def reset_peak_memory() -> float:
    """Start a new peak-memory window; return the current footprint in MiB."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    return _proc_kib("VmRSS") / 1024


def peak_memory() -> float:
    """Peak since ``reset_peak_memory``: CUDA allocations on GPU, resident set size on CPU (MiB)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return _proc_kib("VmHWM") / 1024


SNAPSHOT_PHASE = "benchmark's lens snapshot"
"""The phase of ours' lens snapshots: only the benchmark takes them, so the memory target leaves it out."""


class PhasePeaks(L.Callback):
    """Peak memory per phase of a run, so a peak can be traced to where it happens: at each phase
    boundary the window's peak is credited to the phase that ends and a new window starts. The
    phases of a KL step follow Lightning's hooks (forward and loss, backward, clip and update)."""

    def __init__(self) -> None:
        self.phase: str | None = None  # none before the first enter: that window is the baseline's
        self.peaks: dict[str, float] = {}  # phase -> peak MiB (absolute, like peak_memory)

    def enter(self, phase: str | None) -> None:
        if self.phase is not None:
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0.0), peak_memory())
        reset_peak_memory()
        self.phase = phase

    def overall(self) -> float:
        self.enter(self.phase)
        return max(self.peaks.values())

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.enter("KL step: forward + loss")

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self.enter("KL step: backward")

    def on_after_backward(self, trainer, pl_module) -> None:
        self.enter("KL step: clip + update")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.enter("Lightning between steps")


# ---------------------------------------------------------------- model, data, held-out KL


def bench_model(name: str, random_weights: bool) -> tuple[Any, Any]:
    """The frozen model and tokenizer; ``random_weights`` builds the named config untrained."""
    if not random_weights:
        model, tokenizer = load_model(name)
    else:
        model = prepare_model(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(name)))
        tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(name))
    return model.to("cuda" if torch.cuda.is_available() else "cpu"), tokenizer


@torch.no_grad()
def held_out_set(model, sequences: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Residuals ``[L+1, N, d]`` and teacher log-probs ``[N, V]`` of the held-out sequences, once."""
    res, logp = [], []
    for start in range(0, len(sequences), batch):
        r, logits = capture_residuals(model, sequences[start : start + batch].to(model.device))
        res.append(r.flatten(1, 2).float())
        logp.append(logits.flatten(0, 1).float().log_softmax(-1))
    return torch.cat(res, 1), torch.cat(logp)


@torch.no_grad()
def held_out_kl(lens: TunedLens, unembed: Unembed, data: tuple[torch.Tensor, torch.Tensor], chunk: int = 1024) -> list[float]:
    """Per-layer mean KL(final || lens) in nats, by the straightforward full-logit computation."""
    residuals, teacher = data
    lens = lens.to(residuals.device)  # Lightning hands the lens back on the CPU after fit
    total = torch.zeros(residuals.shape[0] - 1, dtype=torch.float64, device=residuals.device)
    for start in range(0, teacher.shape[0], chunk):
        part = lens_kl_loss_reference(lens, unembed, residuals[:, start : start + chunk], teacher[start : start + chunk])
        total += part.double() * teacher[start : start + chunk].shape[0]
    return (total / teacher.shape[0]).tolist()


def cycle(loader):
    while True:
        yield from loader


# ---------------------------------------------------------------- the published recipe


class PublishedTunedLens(nn.Module):
    """tuned_lens/nn/lenses.py: one zero-initialised ``nn.Linear`` per layer, ``h + Linear(h)``."""

    def __init__(self, n_layers: int, d_model: int) -> None:
        super().__init__()
        self.layer_translators = nn.ModuleList(nn.Linear(d_model, d_model) for _ in range(n_layers))
        for layer in self.layer_translators:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, h: torch.Tensor, idx: int) -> torch.Tensor:
        return h + self.layer_translators[idx](h)

    def as_tuned_lens(self) -> TunedLens:
        lens = TunedLens(len(self.layer_translators), self.layer_translators[0].in_features)
        stacked = {name: torch.stack([getattr(t, name) for t in self.layer_translators]) for name in ("weight", "bias")}
        lens.load_state_dict(stacked)
        return lens


def published_step(model, lens: PublishedTunedLens, norm: nn.Module, unembed: nn.Linear, ids: torch.Tensor, opt, sched) -> None:
    """One optimizer step of tuned_lens/scripts/train_loop.py (KL loss, no grad accumulation)."""
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=ids.is_cuda)
    with torch.no_grad(), autocast:  # published: frozen model in its bf16 checkpoint dtype
        output = model(input_ids=ids, output_hidden_states=True, use_cache=False)
    labels = output.logits.float().log_softmax(-1)
    for idx, h in enumerate(output.hidden_states[:-1]):
        with autocast:
            logits = unembed(norm(lens(h, idx)))
        log_q = logits.float().log_softmax(-1)
        loss = torch.sum(labels.exp() * (labels - log_q), dim=-1).mean()
        loss.backward()  # one backward per layer
    nn.utils.clip_grad_norm_(lens.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=False)
    sched.step()


def run_reference(model, data: LensDataModule, steps: int) -> tuple[dict[str, Any], TunedLens]:
    norm, unembed = get_final_norm(model), get_unembed(model)
    lens = PublishedTunedLens(n_blocks(model), model.config.hidden_size).to(model.device)
    momentum = 0.9
    opt = torch.optim.SGD(lens.parameters(), lr=1.0 * (1 - momentum), momentum=momentum, nesterov=True, weight_decay=1e-3)
    sched = get_linear_schedule_with_warmup(opt, 0, steps)
    batches = cycle(data.train_dataloader())
    _sync()
    started, cpu_started = time.perf_counter(), time.process_time()
    for _ in range(steps):
        (ids,) = next(batches)
        published_step(model, lens, norm, unembed, ids.to(model.device), opt, sched)
    _sync()
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    stats = {"train_s": seconds, "kl_train_s": seconds, "cpu_s": cpu, "kl_cpu_s": cpu, "kl_steps": steps}
    return stats, lens.as_tuned_lens()


# ---------------------------------------------------------------- the project's default path


class StepClock(L.Callback):
    """Times KL steps and writes lens snapshots to disk with the writing time taken out."""

    def __init__(self, started: float, snap_steps: set[int], folder: Path, phases: PhasePeaks) -> None:
        self.started, self.snap_steps, self.folder, self.phases = started, snap_steps, folder, phases
        self.cpu_started = time.process_time()
        self.paused = 0.0
        self.snapshots: list[tuple[int, float, Path]] = []
        self.first_batch: tuple[float, float] | None = None  # (wall, process CPU) seconds

    def elapsed(self) -> float:
        _sync()
        return time.perf_counter() - self.started - self.paused

    def snapshot(self, lens: TunedLens, step: int) -> None:
        at = self.elapsed()
        t = time.perf_counter()
        resume = self.phases.phase
        self.phases.enter(SNAPSHOT_PHASE)
        path = save_lens(lens, self.folder / f"step{step}")
        self.phases.enter(resume)
        self.snapshots.append((step, at, path))
        self.paused += time.perf_counter() - t

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.first_batch is None:
            self.first_batch = (self.elapsed(), self.cpu())

    def cpu(self) -> float:
        return time.process_time() - self.cpu_started

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step in self.snap_steps or step == trainer.max_steps:
            self.snapshot(pl_module.lens, step)


def snapshot_steps(n: int) -> set[int]:
    """Steps 1, 2, 4, 8, ... and ``n``: dense early, where the curve moves most."""
    steps, k = {n}, 1
    while k < n:
        steps.add(k)
        k *= 2
    return steps


def run_ours(
    model, cfg: TrainConfig, data: LensDataModule, folder: Path, phases: PhasePeaks
) -> tuple[dict[str, Any], TunedLens, StepClock]:
    phases.enter("closed form")
    lens = TunedLens.for_model(model).to(model.device)
    _sync()
    clock = StepClock(time.perf_counter(), snapshot_steps(cfg.optim.num_steps), folder, phases)
    closed_form_start(model, lens, data.train_sequences(cfg.lens.lstsq_sequences), cfg.data.batch_size, cfg.lens.ridge)
    cf_seconds = clock.elapsed()
    clock.snapshot(lens, 0)
    if cfg.optim.num_steps > 0:
        phases.enter("Lightning setup")
        trainer = make_trainer(cfg, folder)
        trainer.callbacks += [clock, phases]
        trainer.fit(TunedLensModule(model, lens, cfg.lens, cfg.optim), datamodule=data)
        phases.enter("Lightning teardown")
    total, cpu = clock.elapsed(), clock.cpu()
    first_wall, first_cpu = clock.first_batch or (total, cpu)
    stats = {
        "train_s": total, "closed_form_s": cf_seconds, "kl_train_s": total - first_wall,
        "cpu_s": cpu, "kl_cpu_s": cpu - first_cpu, "kl_steps": cfg.optim.num_steps,
    }
    return stats, lens, clock


# ---------------------------------------------------------------- one arm, in its own process


def arm_config(args: argparse.Namespace, arm: str, folder: Path) -> TrainConfig:
    cf_seqs = args.cf_seqs if arm != "reference" else 0
    kl_steps = args.steps - cf_seqs // args.batch_size
    if kl_steps < 0 or cf_seqs % args.batch_size:
        raise ValueError("--cf-seqs must be a multiple of --batch-size and fit in the --steps budget")
    positions = args.positions if arm == "ours" else None
    overrides = [f"data.eval_percent={args.eval_percent}"] if args.eval_percent else []
    overrides += [
        f"data.seq_len={args.seq_len}",
        f"data.batch_size={args.batch_size}",
        f"data.max_eval_sequences={args.eval_seqs}",
        f"lens.init={'zero' if arm == 'reference' else 'lstsq'}",
        f"lens.lstsq_sequences={max(cf_seqs, 1)}",  # the schema wants >= 1; the reference never reads it
        f"lens.positions_per_layer={positions if positions else 'null'}",
        f"optim.num_steps={kl_steps}",
        f"trainer.val_every_n_steps={10**9}",
        "trainer.progress_bar=false",
        f"output_dir={folder}",
        f"run_name={arm}",
    ]
    return load_config(TrainConfig, ROOT / "configs" / "default.yaml", overrides)


def run_arm(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    model, tokenizer = bench_model(args.model, args.random_weights)
    folder = Path(tempfile.mkdtemp(prefix=f"bench_{args.arm}_", dir=OUT_DIR))
    cfg = arm_config(args, args.arm, folder)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    data = LensDataModule(cfg.data, tokenizer, seed=cfg.seed)
    data.setup("fit")
    held_out = held_out_set(model, data.val_sequences, args.batch_size)  # type: ignore[arg-type]
    unembed = Unembed(model)
    baseline = reset_peak_memory()
    phases = PhasePeaks()
    if args.arm == "reference":
        phases.enter("training")
        stats, lens = run_reference(model, data, args.steps)
        clock = None
    else:
        stats, lens, clock = run_ours(model, cfg, data, folder, phases)
    stats["peak_mib"], stats["baseline_mib"] = phases.overall(), baseline
    stats["peak_extra_mib"] = stats["peak_mib"] - baseline
    stats["phase_extra_mib"] = {phase: peak - baseline for phase, peak in phases.peaks.items()}
    stats["peak_extra_training_mib"] = max(mib for phase, mib in stats["phase_extra_mib"].items() if phase != SNAPSHOT_PHASE)
    tokens_per_step = args.batch_size * args.seq_len
    stats["kl_tokens"] = stats["kl_steps"] * tokens_per_step
    cf_tokens = cfg.lens.lstsq_sequences * args.seq_len if cfg.lens.init == "lstsq" else 0
    stats["budget_tokens"] = cf_tokens + stats["kl_tokens"]
    stats["kl_tokens_per_s"] = stats["kl_tokens"] / max(stats["kl_train_s"], 1e-9)
    stats["kl_tokens_per_cpu_s"] = stats["kl_tokens"] / max(stats["kl_cpu_s"], 1e-9)
    stats["budget_tokens_per_s"] = stats["budget_tokens"] / stats["train_s"]
    stats["held_out_tokens"] = int(held_out[1].shape[0])
    stats["positions_per_layer"] = cfg.lens.positions_per_layer
    if clock is None:
        stats["kl_step0"] = held_out_kl(TunedLens.for_model(model).to(model.device), unembed, held_out)
    stats["kl_final"] = held_out_kl(lens, unembed, held_out)
    stats["mean_kl_final"] = sum(stats["kl_final"]) / len(stats["kl_final"])
    if clock is not None:
        stats["curve"] = trajectory(clock, unembed, held_out, args.target_kl)
        stats["kl_step0"] = stats["curve"][0]["per_layer"]
        reached = [p["seconds"] for p in stats["curve"] if args.target_kl is not None and p["mean_kl"] <= args.target_kl]
        stats["time_to_target_s"] = reached[0] if reached else None
    else:
        stats["time_to_target_s"] = stats["train_s"]
    stats["mean_kl_step0"] = sum(stats["kl_step0"]) / len(stats["kl_step0"])
    shutil.rmtree(folder)
    return stats


def trajectory(clock: StepClock, unembed: Unembed, held_out, target: float | None) -> list[dict]:
    """Held-out KL at saved steps, in order, until the target is met (the last step always)."""
    points = []
    last = max(step for step, _, _ in clock.snapshots)
    for step, seconds, path in sorted(clock.snapshots):
        if points and target is not None and points[-1]["mean_kl"] <= target and step != last:
            continue
        per_layer = held_out_kl(load_lens(path), unembed, held_out)
        points.append({"step": step, "seconds": seconds, "mean_kl": sum(per_layer) / len(per_layer), "per_layer": per_layer})
    return points


# ---------------------------------------------------------------- driver


def spawn_arm(argv: list[str], arm: str, target: float | None) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", dir=OUT_DIR, delete=False) as f:
        result = Path(f.name)
    cmd = [sys.executable, __file__, *argv, "--arm", arm, "--result", str(result)]
    if target is not None:
        cmd += ["--target-kl", str(target)]
    subprocess.run(cmd, check=True, env={**os.environ, **MALLOC_ENV})
    stats = json.loads(result.read_text())
    result.unlink()
    return stats


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def summarize(arms: dict[str, dict[str, Any]]) -> dict[str, Any]:
    ref, ours = arms["reference"], arms["ours"]
    return {
        "time_to_ref_kl_ratio": ratio(ours["time_to_target_s"], ref["train_s"]),
        "kl_tokens_per_s_ratio": ratio(ours["kl_tokens_per_s"], ref["kl_tokens_per_s"]),
        "kl_tokens_per_cpu_s_ratio": ratio(ours["kl_tokens_per_cpu_s"], ref["kl_tokens_per_cpu_s"]),
        "train_cpu_s_ratio": ratio(ours["cpu_s"], ref["cpu_s"]),
        "peak_extra_mem_ratio": ratio(ours["peak_extra_mib"], ref["peak_extra_mib"]),
        "peak_extra_training_mem_ratio": ratio(ours["peak_extra_training_mib"], ref["peak_extra_training_mib"]),
        "peak_mem_ratio": ratio(ours["peak_mib"], ref["peak_mib"]),
        "targets": {"time_to_ref_kl_ratio": "<= 0.2", "kl_tokens_per_s_ratio": ">= 1.5", "peak_extra_training_mem_ratio": "<= 0.25"},
    }


def table(arms: dict[str, dict[str, Any]]) -> str:
    def fmt(x: Any, spec: str) -> str:
        return "n/a" if x is None else format(x, spec)

    rows = [
        "| arm | KL steps | wall s (CPU s) | KL tok/s | peak MiB (extra) | held-out KL: start -> end | s to ref KL |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in arms.items():
        rows.append(
            f"| {name} | {s['kl_steps']} | {s['train_s']:.1f} ({s['cpu_s']:.1f}) | {s['kl_tokens_per_s']:.1f} | "
            f"{s['peak_mib']:.0f} ({s['peak_extra_mib']:.0f}) | {s['mean_kl_step0']:.3f} -> {s['mean_kl_final']:.3f} | "
            f"{fmt(s['time_to_target_s'], '.1f')} |"
        )
    return "\n".join(rows)


def phase_table(arms: dict[str, dict[str, Any]]) -> str:
    """Each arm's peak extra memory per phase, largest first: where each peak happens."""
    rows = ["| arm | phase | peak extra MiB |", "|---|---|---|"]
    for name, s in arms.items():
        for phase, mib in sorted(s["phase_extra_mib"].items(), key=lambda item: -item[1]):
            rows.append(f"| {name} | {phase} | {mib:.0f} |")
    return "\n".join(rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true", help="published geometry: seq_len 2048, batch 4, 60 steps, bf16")
    p.add_argument("--model", default=DEFAULT_MODEL, help="model for lens.core.model.load_model (or a config folder)")
    p.add_argument("--random-weights", action="store_true", help="untrained model of --model's config (speed only)")
    p.add_argument("--steps", type=int, help="reference optimizer steps = the token budget in batches")
    p.add_argument("--batch-size", type=int, help="sequences per step, both arms")
    p.add_argument("--seq-len", type=int)
    p.add_argument("--cf-seqs", type=int, help="ours: closed-form sequences (taken from the budget)")
    p.add_argument("--positions", type=int, help="ours: positions_per_layer (0: all positions)")
    p.add_argument("--eval-seqs", type=int, help="held-out sequences for the KL")
    p.add_argument("--eval-percent", type=float, help="held-out share of documents (default: the config's)")
    p.add_argument("--arms", default="reference,ours", help="comma list of reference, ours, ours_all")
    p.add_argument("--tag", default=None, help="suffix of the JSON file name")
    p.add_argument("--arm", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--target-kl", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    defaults = (
        dict(steps=100, batch_size=4, seq_len=2048, cf_seqs=32, positions=1024, eval_seqs=4, eval_percent=20.0)
        if args.gpu
        else dict(steps=8, batch_size=2, seq_len=128, cf_seqs=8, positions=64, eval_seqs=2)
    )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    if args.arm:
        Path(args.result).write_text(json.dumps(run_arm(args)))
        return
    arms: dict[str, dict[str, Any]] = {}
    for arm in args.arms.split(","):
        target = arms["reference"]["mean_kl_final"] if "reference" in arms else None
        arms[arm] = spawn_arm(argv, arm, target)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    report = {"device": device, "args": vars(args), "arms": arms}
    if {"reference", "ours"} <= arms.keys():
        report["summary"] = summarize(arms)
    name = f"bench_train_{'gpu' if args.gpu else 'cpu'}{'_' + args.tag if args.tag else ''}.json"
    (OUT_DIR / name).write_text(json.dumps(report, indent=1))
    print(table(arms))
    print(phase_table(arms))
    if "summary" in report:
        print(json.dumps({k: v for k, v in report["summary"].items() if k != "targets"}))
    print(f"wrote {OUT_DIR / name}")


if __name__ == "__main__":
    main()
