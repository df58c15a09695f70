"""Learning curves on the embedded default: held-out KL per layer against training tokens seen.

``python eval/learning_curves.py`` (about 80 minutes on an idle 2-core CPU; resumable: finished
points are kept in the JSON and skipped on the next run, and the published run restarts from its
last read). Three arms, one fixed held-out set:

- ``published``: the tuned-lens recipe (zero init, every position, full-vocabulary KL, SGD
  Nesterov, linear decay), re-implemented in ``bench_train.py``; one run whose learning rate
  decays to 0 at its last step, read at intermediate steps.
- ``default``: this project's path: the closed-form start on the first ``n`` training tokens,
  then KL fine-tuning with ``positions_per_layer`` (``configs/default.yaml`` is the first point).
  Each point is its own run, with its own schedule. Runs with Adam or with weight decay form their
  own arm (``default`` is SGD without decay; ``default_adam``, ``default_wd0.001``).
- ``closed_form``: the closed-form start alone on growing token counts (one pass, solved at each).

Held-out: the first ``--eval-seqs`` sequences of the held-out pages (``data.eval_percent`` of
them, never trained on by any arm); per-layer KL(final || lens) and CE, the lens logits from bf16
inputs (``lens_layer_stats``; its error is measured at the end against float32). Writes
``eval/out/learning_curves/curves.json``, TensorBoard logs and ``learning_curves.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from bench_train import PublishedTunedLens, cycle, published_step
from lens.analysis.layers import LayerSums, mean_over_lens_layers
from lens.artifacts.files import write_bytes, write_json
from lens.artifacts.registry import load_lens, save_lens
from lens.config import TrainConfig, load_config, to_dict
from lens.core.arch import get_final_norm, get_unembed
from lens.core.closed_form import RidgeStats, fit_residuals
from lens.core.metrics import Reading, lens_layer_stats, next_token_targets
from lens.core.residuals import capture_residuals
from lens.core.translators import Lens, TunedLens, Unembed, logit_lens_for
from lens.report.plots import plot_learning_curves, timed_elsewhere
from lens.training.datamodule import model_and_data
from lens.training.lens_run import make_trainer
from lens.training.module import TunedLensModule
from safetensors import safe_open
from safetensors.torch import save
from transformers import get_linear_schedule_with_warmup

ROOT = Path(__file__).resolve().parents[1]
# The lens logits' matmul inputs when scoring. bfloat16 is 3.6x float32 on CPUs with AMX and adds 0.001 nats
# (measured by --check-lens); on CPUs without native bf16 (AVX2 only) it is 4x slower than float32.
SCORE_DTYPES: dict[str, torch.dtype | None] = {"bfloat16": torch.bfloat16, "float32": None}


def cpu_name() -> str:
    """The CPU a point was timed on: timings differ by 3x between the machines this study ran on
    (AMX against AVX2 only), so a point's wall time is only comparable with points from the same one."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "unknown CPU")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    units = "AMX" if "amx_tile" in flags else "AVX-512, no AMX" if "avx512f" in flags else "AVX2 only" if "avx2" in flags else "no AVX2"
    return f"{name} ({units})"


class HeldOut:
    """The held-out residuals ``[L+1, N, d]`` and next tokens ``[N]``, captured once for every point."""

    def __init__(self, residuals: torch.Tensor, targets: torch.Tensor, unembed: Unembed) -> None:
        self.residuals, self.targets, self.unembed = residuals, targets, unembed

    @classmethod
    def capture(cls, model, sequences: torch.Tensor, batch_size: int) -> "HeldOut":
        parts, targets = [], []
        for ids in tqdm(sequences.split(batch_size), desc="held-out residuals"):
            residuals, _ = capture_residuals(model, ids, logits=False)  # [L+1, b, T, d]
            parts.append(residuals[:, :, :-1].flatten(1, 2).float())  # the last position has no next token
            targets.append(next_token_targets(ids)[:, :-1].flatten())
        return cls(torch.cat(parts, 1), torch.cat(targets), Unembed(model))

    def first(self, tokens: int) -> "HeldOut":
        return HeldOut(self.residuals[:, :tokens], self.targets[:tokens], self.unembed)

    @property
    def tokens(self) -> int:
        return int(self.targets.numel())

    @torch.no_grad()
    def score(self, lens: Lens, matmul_dtype: torch.dtype | None = torch.bfloat16, chunk: int = 512) -> dict[str, list[float]]:
        """Per-layer mean KL and CE (nats); the teacher is the model's own head on the last residual."""
        sums = LayerSums()
        for start in tqdm(range(0, self.tokens, chunk), desc="held-out KL", leave=False):
            sl = slice(start, start + chunk)
            reading = Reading(self.residuals[:, sl], self.unembed(self.residuals[-1, sl]), self.targets[sl])
            sums.add(lens_layer_stats(lens, self.unembed, reading, chunk, entropy=False, matmul_dtype=matmul_dtype))
        return sums.means()


class Clock:
    """Training time of one arm, wall and process CPU, with evaluation pauses taken out."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        self.paused_wall = self.paused_cpu = 0.0

    def read(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall - self.paused_wall, time.process_time() - self.cpu - self.paused_cpu

    def pause(self, work: Callable[[], Any]) -> Any:
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            return work()
        finally:
            self.paused_wall += time.perf_counter() - wall
            self.paused_cpu += time.process_time() - cpu


class Curves:
    """Points on disk (JSON, rewritten atomically after each) and in TensorBoard; resumable."""

    def __init__(self, out: Path, held_out: HeldOut, score_dtype: str = "bfloat16") -> None:
        self.path, self.held_out, self.score_dtype = out / "curves.json", held_out, score_dtype
        self.record: dict[str, Any] = json.loads(self.path.read_text()) if self.path.exists() else {"points": [], "timed_on": cpu_name()}
        self.tb = SummaryWriter(str(out / "tensorboard"))

    def done(self, arm: str, label: str) -> bool:
        return any(p["arm"] == arm and p["label"] == label for p in self.record["points"])

    def add(self, arm: str, label: str, lens: Lens, tokens: int, clock: Clock | tuple[float, float | None], **extra: Any) -> None:
        wall, cpu = clock.read() if isinstance(clock, Clock) else clock
        pause = clock.pause if isinstance(clock, Clock) else (lambda work: work())
        metrics = pause(lambda: self.held_out.score(lens, matmul_dtype=SCORE_DTYPES[self.score_dtype]))
        point = {"arm": arm, "label": label, "tokens": tokens, "wall_s": wall, "cpu_s": cpu, "timed_on": cpu_name(), **extra,
                 "score_dtype": self.score_dtype,
                 "kl": metrics["kl"], "ce": metrics["ce"], "mean_kl": mean_over_lens_layers(metrics["kl"]),
                 "mean_ce": mean_over_lens_layers(metrics["ce"])}
        self.record["points"] = [p for p in self.record["points"] if (p["arm"], p["label"]) != (arm, label)] + [point]
        write_json(self.record, self.path)
        self.tb.add_scalar(f"{arm}/mean_kl", point["mean_kl"], tokens)
        for layer, value in enumerate(metrics["kl"][:-1]):
            self.tb.add_scalar(f"{arm}/kl_layer_{layer:02d}", value, tokens)
        self.tb.flush()
        print(f"{arm:>11} {label:>14}: {tokens:>8,} tokens, {wall:7.1f} s, mean KL {point['mean_kl']:.4f} nats")


def closed_form_arm(model, train: torch.Tensor, cfg: TrainConfig, curves: Curves, counts: list[int], out: Path) -> None:
    """One pass over the training sequences; the ridge solution at each count is a point (and is saved)."""
    labels = {n: f"cf{n}" for n in counts}
    if all(curves.done("closed_form", labels[n]) and (out / "lenses" / labels[n]).exists() for n in counts):
        return
    stats = RidgeStats(model.config.num_hidden_layers, model.config.hidden_size)
    clock, seen, batch = Clock(), 0, cfg.data.batch_size
    for residuals in fit_residuals(model, train[: max(counts)], batch, "closed-form curve"):
        stats.update(residuals)
        seen += batch
        if seen in labels:
            lens = TunedLens.for_model(model)
            stats.apply_to(lens, cfg.lens.ridge)
            clock.pause(lambda: save_lens(lens, out / "lenses" / labels[seen]))
            curves.add("closed_form", labels[seen], lens, seen * cfg.data.seq_len, clock, cf_sequences=seen)


def default_arm_name(optimizer: str, weight_decay: float) -> str:
    """Default-path points trained with another optimizer or with weight decay form their own curve: decay
    erodes the closed-form start, and Adam moves the closed form at another pace than SGD."""
    return "default" + ("" if optimizer == "sgd" else f"_{optimizer}") + ("" if weight_decay == 0 else f"_wd{weight_decay:g}")


def default_arm(model, data, cfg: TrainConfig, curves: Curves, budgets: list[tuple[int, int]], out: Path) -> None:
    """The default path at growing budgets: (closed-form sequences, KL steps), each its own run."""
    arm = default_arm_name(cfg.optim.optimizer, cfg.optim.weight_decay)
    cf_time = {p["label"]: (p["wall_s"], p["cpu_s"]) for p in curves.record["points"] if p["arm"] == "closed_form"}
    for cf_seqs, steps in budgets:
        label = f"cf{cf_seqs}+kl{steps}"
        if curves.done(arm, label):
            continue
        lens = load_lens(out / "lenses" / f"cf{cf_seqs}", model=model)
        clock = Clock()
        step_cfg = replace(cfg, run_name=f"default_{label}", output_dir=str(out / "runs"), optim=replace(cfg.optim, num_steps=steps))
        trainer = make_trainer(step_cfg, step_cfg.run_dir)
        trainer.fit(TunedLensModule(model, lens, step_cfg.lens, step_cfg.optim), datamodule=data)
        model.to("cpu")
        cf_wall, cf_cpu = cf_time[f"cf{cf_seqs}"]
        clock.wall -= cf_wall  # the closed form this run started from is part of its cost
        clock.cpu -= cf_cpu
        tokens = (cf_seqs + steps * cfg.data.batch_size) * cfg.data.seq_len
        curves.add(arm, label, lens.cpu(), tokens, clock, cf_sequences=cf_seqs, kl_steps=steps, weight_decay=cfg.optim.weight_decay,
                   optimizer=cfg.optim.optimizer)
        clock.pause(lambda: save_lens(lens, out / "lenses" / f"{arm}_{label}", model, to_dict(step_cfg)))


def published_arm(model, data, cfg: TrainConfig, curves: Curves, steps: int, read_at: list[int], out: Path) -> None:
    """The published recipe for ``steps`` steps at the default batch, read at ``read_at`` steps. After each
    read the run's state is saved (``published_state.safetensors``), so a stopped run resumes from there."""
    if all(curves.done("published", f"step{s}") for s in read_at):
        return
    torch.manual_seed(cfg.seed)
    norm, unembed = get_final_norm(model), get_unembed(model)
    lens = PublishedTunedLens(model.config.num_hidden_layers, model.config.hidden_size)
    opt = torch.optim.SGD(lens.parameters(), lr=1.0 * (1 - 0.9), momentum=0.9, nesterov=True, weight_decay=1e-3)
    sched = get_linear_schedule_with_warmup(opt, 0, steps)
    batches, clock, state = cycle(data.train_dataloader()), Clock(), out / "published_state.safetensors"
    start = resume_published(state, steps, lens, opt, sched, clock)
    for _ in range(start):  # the same shuffled order as the stopped run: skip the batches it used
        next(batches)
    if not curves.done("published", "step0"):
        curves.add("published", "step0", logit_lens_for(model), 0, clock, kl_steps=0, schedule_steps=steps)
    for step in tqdm(range(start + 1, steps + 1), desc="published recipe", initial=start, total=steps):
        published_step(model, lens, norm, unembed, next(batches)[0], opt, sched)
        if step in read_at:
            tokens = step * cfg.data.batch_size * cfg.data.seq_len
            curves.add("published", f"step{step}", lens.as_tuned_lens(), tokens, clock, kl_steps=step, schedule_steps=steps)
            clock.pause(lambda: save_published(state, steps, step, lens, opt, clock))


def save_published(path: Path, steps: int, step: int, lens: PublishedTunedLens, opt: torch.optim.Optimizer, clock: Clock) -> None:
    """Lens weights and SGD momentum as tensors; step, schedule length, clock and learning rate as metadata."""
    params = list(lens.parameters())
    tensors = {**{f"lens.{k}": v for k, v in lens.state_dict().items()},
               **{f"momentum.{i}": opt.state[p]["momentum_buffer"] for i, p in enumerate(params)}}
    wall, cpu = clock.read()
    meta = {"steps": steps, "step": step, "wall_s": wall, "cpu_s": cpu, "lr": opt.param_groups[0]["lr"]}
    write_bytes(save({k: v.contiguous() for k, v in tensors.items()}, metadata={k: str(v) for k, v in meta.items()}), path)


def resume_published(path: Path, steps: int, lens: PublishedTunedLens, opt: torch.optim.Optimizer, sched, clock: Clock) -> int:
    """Restore a saved run of the same schedule length into ``lens``/``opt``/``sched``/``clock``; the step
    it stopped at (0 when there is none to resume)."""
    if not path.exists():
        return 0
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    if int(meta["steps"]) != steps:
        print(f"{path} is a {meta['steps']}-step run, not {steps}: starting over")
        return 0
    lens.load_state_dict({k.removeprefix("lens."): v for k, v in tensors.items() if k.startswith("lens.")})
    for i, p in enumerate(lens.parameters()):
        opt.state[p]["momentum_buffer"] = tensors[f"momentum.{i}"]
    step = int(meta["step"])
    sched.last_epoch = step  # the next sched.step() gives the learning rate of step + 1
    for group in opt.param_groups:
        group["lr"] = float(meta["lr"])
    clock.wall -= float(meta["wall_s"])
    clock.cpu -= float(meta["cpu_s"])
    print(f"resuming the published arm at step {step} of {steps}")
    return step


def precision_check(held_out: HeldOut, lens: TunedLens, tokens: int) -> dict[str, Any]:
    """On the first ``tokens`` held-out tokens, float32 statistics: the lens as trained, and stored in bf16 /
    fp16 (what ``lens push storage=`` costs); and the bf16-input statistics the curves use (their error)."""
    part = held_out.first(tokens)
    out: dict[str, Any] = {"tokens": part.tokens}
    for name, dtype in (("float32", None), ("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        stored = TunedLens(lens.n_layers, lens.d_model)
        stored.load_state_dict({k: v.to(dtype).float() if dtype else v for k, v in lens.state_dict().items()})
        out[f"stored_{name}"] = part.score(stored, matmul_dtype=None)
    out["bf16_statistics"] = part.score(lens, matmul_dtype=torch.bfloat16)
    for key in ("stored_bfloat16", "stored_float16", "bf16_statistics"):
        out[f"{key}_mean_kl_minus_float32"] = mean_over_lens_layers(out[key]["kl"]) - mean_over_lens_layers(out["stored_float32"]["kl"])
        out[f"{key}_max_layer_kl_diff"] = max(abs(a - b) for a, b in zip(out[key]["kl"], out["stored_float32"]["kl"]))
    return out


def add_run(curves: Curves, run: Path, model, train_seconds: float | None = None) -> None:
    """A finished ``lens train`` run (e.g. ``configs/pretrained_smollm2.yaml``) as a point of the default arm,
    timed by the run itself (closed form + KL steps, its recorded ``train_seconds``) unless ``train_seconds``
    is given: a run resumed from a checkpoint written before checkpoints carried the run's clock records
    only its last segment."""
    lens = load_lens(run, model=model)
    meta = json.loads((run / "config.json").read_text())
    train = meta["train_config"]
    seconds = meta["details"]["train_seconds"] if train_seconds is None else train_seconds
    cf, steps = train["lens"]["lstsq_sequences"], train["optim"]["num_steps"]
    tokens = (cf + steps * train["data"]["batch_size"]) * train["data"]["seq_len"]
    optimizer, wd = train["optim"]["optimizer"], train["optim"]["weight_decay"]
    curves.add(default_arm_name(optimizer, wd), f"cf{cf}+kl{steps}", lens, tokens, (seconds, None), cf_sequences=cf,
               kl_steps=steps, weight_decay=wd, optimizer=optimizer, run=str(run))


def default_arms(record: dict[str, Any]) -> list[str]:
    """The recorded default-path arms, one per optimizer and weight decay (``default_arm_name``), the undecayed first."""
    return sorted({p["arm"] for p in record["points"] if p["arm"].startswith("default")}, key=lambda a: (a != "default", a))


def change_per_doubling(x_before: float, kl_before: float, x_after: float, kl_after: float) -> str:
    """The KL change per doubling of ``x`` (tokens or steps) between two points, as a signed percentage: the
    flatness criterion's measure, comparable between budgets that are not a doubling apart."""
    return f"{100 * ((kl_after / kl_before) ** (1 / math.log2(x_after / x_before)) - 1):+.1f}%"


def table(record: dict[str, Any]) -> str:
    """The points as a markdown table, with each point's mean-KL change per doubling of tokens since the previous one."""
    rows = ["| arm | point | tokens seen | train wall s (CPU s) | mean KL | mean CE | KL change per doubling |", "|---|---|---:|---:|---:|---:|---:|"]
    for arm in ("closed_form", *default_arms(record), "published"):
        points = sorted((p for p in record["points"] if p["arm"] == arm), key=lambda p: (p["tokens"], p["wall_s"]))
        for prev, p in zip([None, *points], points):
            change = ""
            if prev is not None and prev["tokens"] > 0 and p["tokens"] > prev["tokens"]:
                change = change_per_doubling(prev["tokens"], prev["mean_kl"], p["tokens"], p["mean_kl"])
            label = p["label"] + (" †" if p.get("score_dtype") == "float32" else "")
            wall = f"{p['wall_s']:.0f} ({'-' if p['cpu_s'] is None else round(p['cpu_s'])})" + (" ‡" if timed_elsewhere(record, p) else "")
            rows.append(f"| {arm} | {label} | {p['tokens']:,} | {wall} | {p['mean_kl']:.4f} | {p['mean_ce']:.4f} | {change} |")
    if any(p.get("score_dtype") == "float32" for p in record["points"]):
        rows.append("\n† scored with float32 matmuls; the others from bf16 inputs, which add about 0.001 nats (--check-lens)")
    for cpu in sorted({p["timed_on"] for p in record["points"] if timed_elsewhere(record, p)}):
        rows.append(f"\n‡ timed on {cpu}; the others on {record.get('timed_on')}")
    return "\n".join(rows)


def power_law_fit(steps: list[int], kl: list[float]) -> tuple[float, float, float]:
    """Least-squares ``kl = floor + scale * steps**-alpha``: ``alpha`` on a grid, ``floor`` and ``scale`` linear.

    Returns ``(floor, scale, alpha)``. The floor is the converged KL this budget family tends to; with few
    points it is poorly pinned, hence the leave-one-out range in ``converged_estimate``."""
    s, k = torch.tensor(steps, dtype=torch.float64), torch.tensor(kl, dtype=torch.float64)
    best: tuple[float, float, float, float] | None = None
    for alpha in torch.linspace(0.005, 3.0, 600, dtype=torch.float64):  # steps of 0.005: near alpha 0.1 a step of 0.02 moved the floor by 0.07
        x = torch.stack([torch.ones_like(s), s ** -alpha], 1)  # [P, 2]
        floor, scale = torch.linalg.lstsq(x, k[:, None]).solution[:, 0].tolist()
        if scale <= 0:
            continue  # a curve that rises with steps is not a learning curve
        err = float(((x @ torch.tensor([floor, scale], dtype=torch.float64) - k) ** 2).sum())
        if best is None or err < best[0]:
            best = (err, floor, scale, float(alpha))
    if best is None:
        raise ValueError(f"no falling power law fits KL {kl} at steps {steps}")
    return best[1], best[2], best[3]


def converged_estimate(record: dict[str, Any], arm: str = "default") -> dict[str, Any] | None:
    """A default arm's converged mean KL, extrapolated over its KL-step budgets from the full closed form.

    None with fewer than four budgets (three parameters need a fourth point to be checked against)."""
    cf = max((p["cf_sequences"] for p in record["points"] if p["arm"] == arm), default=None)
    points = sorted((p["kl_steps"], p["mean_kl"]) for p in record["points"]
                    if p["arm"] == arm and p["cf_sequences"] == cf and p["kl_steps"] > 0)
    if len(points) < 4:
        return None
    steps, kl = [s for s, _ in points], [k for _, k in points]
    rises = [s for s, before, after in zip(steps[1:], kl, kl[1:]) if after > before]
    if rises:  # a curve that turns up has a best budget, not an asymptote to extrapolate to
        return {"arm": arm, "cf_sequences": cf, "kl_steps": steps, "rises_at": rises[0], "best": min(points, key=lambda q: q[1])}
    floor, scale, alpha = power_law_fit(steps, kl)
    leave_one_out = [power_law_fit(steps[:i] + steps[i + 1:], kl[:i] + kl[i + 1:])[0] for i in range(len(steps))] if len(steps) > 4 else []
    return {"arm": arm, "cf_sequences": cf, "kl_steps": steps, "floor": floor, "scale": scale, "alpha": alpha,
            "floor_range": [min(leave_one_out), max(leave_one_out)] if leave_one_out else None}


def describe_estimate(est: dict[str, Any]) -> str:
    if "rises_at" in est:
        return (f"{est['arm']} arm (cf{est['cf_sequences']}, KL steps {est['kl_steps']}): held-out KL rises at "
                f"{est['rises_at']} steps; best {est['best'][1]:.4f} nats at {est['best'][0]} steps, no extrapolation")
    spread = ("leave-one-out range {:.3f}-{:.3f}".format(*est["floor_range"]) if est["floor_range"]
              else "4 points: no leave-one-out range")
    return (f"{est['arm']} arm (cf{est['cf_sequences']}, KL steps {est['kl_steps']}): mean KL ~ {est['floor']:.3f} + "
            f"{est['scale']:.3f} * steps^-{est['alpha']:.2f}; converged estimate {est['floor']:.3f} nats ({spread})")


def base_forward_rate(model, sequences: torch.Tensor, batch: int) -> float:
    """Tokens/s of one plain forward of the model (logits included): the floor for reading residuals."""
    started = time.perf_counter()
    with torch.no_grad():
        for ids in sequences.split(batch):
            model(input_ids=ids, use_cache=False)
    return sequences.numel() / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    p.add_argument("--out", default=str(ROOT / "eval" / "out" / "learning_curves"))
    p.add_argument("--eval-seqs", type=int, default=240, help="held-out sequences (240 x 127 scored = 30,480 tokens)")
    p.add_argument("--cf-seqs", default="64,256,512,1024,1408", help="closed-form arm: sequence counts")
    p.add_argument("--default-budgets", default="64:20,256:80,1408:80,1408:320", help="default arm: cf_seqs:kl_steps")
    p.add_argument("--published-steps", type=int, default=128, help="the published run's steps (its schedule's length)")
    p.add_argument("--published-reads", default="8,32,128")
    p.add_argument("--arms", default="closed_form,default,published")
    p.add_argument("--min-held-out", type=int, default=30_000, help="refuse fewer held-out tokens (0 for a smoke run)")
    p.add_argument("--check-lens", help="instead of curves: storage-dtype and bf16-statistics error of this lens folder")
    p.add_argument("--check-tokens", type=int, default=8128, help="held-out tokens for --check-lens")
    p.add_argument("--add-run", help="instead of curves: add this finished lens train run as a default-arm point")
    p.add_argument("--train-seconds", type=float, help="with --add-run: the run's training seconds, when its config.json "
                   "holds only its last segment (resumed from a checkpoint written before checkpoints carried the run clock)")
    p.add_argument("--score-dtype", choices=list(SCORE_DTYPES), default="bfloat16",
                   help="matmul inputs when scoring curve points and --add-run (recorded per point; float32 on CPUs without native "
                        "bf16); --check-lens always measures both")
    p.add_argument("--table", action="store_true", help="print the recorded points as a markdown table and stop")
    args = p.parse_args(argv)
    reads = [int(s) for s in args.published_reads.split(",") if s.strip().isdigit()]
    if len(reads) != len(args.published_reads.split(",")) or not all(1 <= r <= args.published_steps for r in reads):
        p.error(f"--published-reads {args.published_reads!r}: give comma-separated steps between 1 and "
                f"--published-steps ({args.published_steps}), e.g. 8,32,{args.published_steps}")
    if args.train_seconds is not None and not args.add_run:
        p.error("--train-seconds only applies to --add-run")
    out = Path(args.out)
    if args.table:
        if not (out / "curves.json").is_file():
            p.error(f"--table: {out / 'curves.json'} does not exist; run the curves first or pass --out to a folder holding one")
        record = json.loads((out / "curves.json").read_text())
        print(table(record))
        for arm in default_arms(record):
            est = converged_estimate(record, arm)
            print("\n" + (describe_estimate(est) if est else f"{arm}: fewer than 4 budgets from the full closed form, no converged estimate"))
        return
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(TrainConfig, args.config, [f"data.max_eval_sequences={args.eval_seqs}", "trainer.progress_bar=false",
                                                 "trainer.checkpoint_every_n_steps=0", "trainer.val_every_n_steps=1000000"])
    model, data = model_and_data(cfg)
    held_out = HeldOut.capture(model, data.val_sequences, cfg.data.batch_size)  # type: ignore[arg-type]
    if held_out.tokens < args.min_held_out:
        sys.exit(f"only {held_out.tokens} held-out tokens: raise --eval-seqs or data.eval_percent")
    if args.check_lens:
        report = precision_check(held_out, load_lens(args.check_lens, model=model), args.check_tokens)
        write_json(report, out / "precision.json")
        print({k: v for k, v in report.items() if k.endswith(("_float32", "_diff"))}, f"wrote {out / 'precision.json'}")
        return
    curves = Curves(out, held_out, args.score_dtype)
    if args.add_run:
        add_run(curves, Path(args.add_run), model, args.train_seconds)
        plot_learning_curves(curves.record, out / "learning_curves.png")
        return
    train = data.train_sequences(10**9)
    curves.record.update(held_out_tokens=held_out.tokens, train_tokens=int(train.numel()), eval_percent=cfg.data.eval_percent,
                         model=cfg.model.name, corpus=cfg.data.dataset)
    if "base_forward_tokens_per_s" not in curves.record:
        curves.record["base_forward_tokens_per_s"] = base_forward_rate(model, train[:64], cfg.data.batch_size)
    arms = args.arms.split(",")
    counts = [int(n) for n in args.cf_seqs.split(",")]
    budgets = [tuple(int(x) for x in b.split(":")) for b in args.default_budgets.split(",")]
    if "closed_form" in arms or "default" in arms:
        closed_form_arm(model, train, cfg, curves, counts, out)
    if "default" in arms:
        default_arm(model, data, cfg, curves, budgets, out)  # type: ignore[arg-type]
    if "published" in arms:
        published_arm(model, data, cfg, curves, args.published_steps, reads, out)
    write_json(curves.record, curves.path)
    plot_learning_curves(curves.record, out / "learning_curves.png")
    print(f"wrote {curves.path} and {out / 'learning_curves.png'}")


if __name__ == "__main__":
    main()
