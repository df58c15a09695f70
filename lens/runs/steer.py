"""One steering run, read through a lens: ``lens steer --config configs/steer_<name>.yaml key=value ...``.

Writes into ``<output_dir>/<run_name>/``: layer x token heatmaps (PNG, one per metric), the
final-layer per-token loss plot, one interactive ``picture.html``, ``picture.json`` (the arrays)
and ``summary.json`` (steering scale, greedy continuations, held-out evaluation).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lens.analysis.intervention_eval import (
    InterventionEvaluation,
    ProgramLosses,
    SteeringGrid,
    evaluate_intervention,
    program_losses,
    steering_grid,
)
from lens.analysis.picture import METRICS, InterventionFactory, LossPicture, build_picture
from lens.artifacts.files import write_json
from lens.artifacts.registry import run_model_and_lens
from lens.config import DataConfig, GenerateConfig, PictureConfig, SteerConfig, SteeringConfig, SteerSweepConfig, to_dict
from lens.core.model import load_run_model
from lens.core.residuals import capture_residuals
from lens.data.sequences import load_sequences
from lens.interventions import ActAdd, LayerProgram, ResidualAdd, SteeringVector
from lens.interventions.steering import bos_id, encode
from lens.report.html import write_html
from lens.report.plots import figure_title, plot_final_token_loss, plot_steering_grid, plot_token_heatmaps
from lens.runs.result import Measured


def build_steering(cfg: SteeringConfig, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> ResidualAdd:
    """The configured steering intervention (not yet applied)."""
    if cfg.kind == "actadd":
        pairs = [tuple(pair) for pair in cfg.pairs]
        return ActAdd(model, tokenizer, pairs, layer=cfg.layer, coefficient=cfg.coefficient, prepend_bos=cfg.prepend_bos)  # type: ignore[arg-type]
    if cfg.kind == "vector":
        if cfg.vector_path:
            vector = SteeringVector.load(cfg.vector_path, model)
            vector.layer, vector.coefficient, vector.min_token_index = cfg.layer, cfg.coefficient, cfg.min_token_index
        else:
            vector = SteeringVector.from_contrast(
                model, tokenizer, cfg.positives, cfg.negatives, layer=cfg.layer, method=cfg.method
            )
            vector.coefficient, vector.min_token_index = cfg.coefficient, cfg.min_token_index
        return vector.applied(model)
    raise AssertionError(f"unreachable: the schema admits no steering.kind {cfg.kind!r}")


def steering_source(cfg: SteeringConfig) -> str:
    """What is added, without where or how strongly: the prompt pairs, or where the vector comes from."""
    if cfg.kind == "actadd":
        return " + ".join(f'"{plus}" - "{minus}"' for plus, minus in cfg.pairs)
    return f"vector from {cfg.vector_path}" if cfg.vector_path else f"{cfg.method} contrast vector"


def describe(cfg: SteeringConfig) -> str:
    """A one-line label for figure titles."""
    return f"{steering_source(cfg)} at layer {cfg.layer}, coefficient {cfg.coefficient:g}"


def write_picture(picture: LossPicture, folder: Path, model: str, lens: str, intervention: str, cfg: PictureConfig, rows: str) -> dict[str, Any]:
    """One picture's files in ``folder``: a heatmap PNG per ``cfg.metrics``, the interactive page
    (titled for ``rows``: layers or a program's slots) and ``picture.json``; returns those arrays."""
    for metric in cfg.metrics:
        title = figure_title(model, METRICS[metric], lens, intervention, picture.text)
        plot_token_heatmaps(picture, folder / f"heatmap_{metric}.png", metric=metric, unit=cfg.unit, title=title)
    write_html(picture, folder / "picture.html", unit=cfg.unit, title=figure_title(model, rows, lens, intervention, picture.text))
    arrays = picture.summary(cfg.unit)
    write_json(arrays, folder / "picture.json")
    return arrays


def held_out_sequences(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, limit: int, prepend_bos: bool) -> list[torch.Tensor]:
    """Held-out sequences ``[T]`` (``[T+1]`` with BOS in front, as every steered text gets it)."""
    sequences = list(load_sequences(cfg, tokenizer, held_out=True, limit=limit))
    return [torch.cat([torch.tensor([bos_id(tokenizer)]), seq]) for seq in sequences] if prepend_bos else sequences


@dataclass
class SteeringScale:
    """Norms of what steering adds next to the residual norms at the steered layer."""

    layer: int
    added_norms: list[float]
    residual_norm_position0: float
    residual_norm_median: float
    """Median over positions >= 1 (position 0 is an attention sink, several times larger)."""

    @property
    def added_over_median(self) -> list[float]:
        return [round(x / self.residual_norm_median, 3) for x in self.added_norms]

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "added_over_median": self.added_over_median}


@torch.no_grad()
def steering_scale(model: PreTrainedModel, ids: torch.Tensor, steer: ResidualAdd) -> SteeringScale:
    """Norms of the added rows next to the residual norms at the steered layer, on ``text``.

    Position 0 is reported apart: it is an attention sink whose norm is several times that of
    the other positions, so the median over positions >= 1 is the fair yardstick.
    """
    rows, tail = steer.offsets()  # [k, d], [d] or None
    ids = ids.to(model.device)  # [1, T]
    residuals, _ = capture_residuals(model, ids, logits=False)  # [L+1, 1, T, d]
    norms = residuals[steer.layer, 0].float().norm(dim=-1)  # [T]
    typical = float(norms[1:].median()) if norms.numel() > 1 else float(norms[0])
    added = rows.float().norm(dim=-1).tolist() + ([float(tail.float().norm())] if tail is not None else [])
    return SteeringScale(steer.layer, [round(x, 2) for x in added], round(float(norms[0]), 2), round(typical, 2))


@dataclass
class Continuations:
    """Continuations of one prompt, intact vs intervened: greedy, or sampled (sample ``i`` of both
    models drawn from the same seed)."""

    prompt: str
    base: list[str]
    steered: list[str]
    decoding: str

    def lines(self) -> list[str]:
        out = []
        for i, (base, steered) in enumerate(zip(self.base, self.steered)):
            tag = f"[{self.decoding}, {i}] " if len(self.base) > 1 else ""
            out += [f"base:    {tag}{self.prompt}{base!r}", f"steered: {tag}{self.prompt}{steered!r}"]
        return out


@torch.no_grad()
def continuations(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    steer: InterventionFactory,
    prompt: str,
    cfg: GenerateConfig,
    seed: int = 0,
    prepend_bos: bool = False,
) -> Continuations:
    """Continuations of ``prompt`` by the intact and the intervened model, as ``cfg`` says."""
    ids = torch.tensor([encode(tokenizer, prompt, prepend_bos)], device=model.device)  # [1, T]
    sampled = cfg.temperature > 0
    kwargs: dict[str, Any] = dict(max_new_tokens=cfg.max_new_tokens, do_sample=sampled, pad_token_id=tokenizer.pad_token_id)
    if sampled:
        kwargs.update(temperature=cfg.temperature, top_p=cfg.top_p, top_k=0)

    def generate(i: int) -> str:
        torch.manual_seed(seed + i)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)  # [1, T + new]
        return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)

    n = cfg.samples if sampled else 1
    base = [generate(i) for i in range(n)]
    with steer():
        steered = [generate(i) for i in range(n)]
    decoding = f"sampled at temperature {cfg.temperature:g}, top-p {cfg.top_p:g}, seeds {seed}..{seed + n - 1}" if sampled else "greedy"
    return Continuations(prompt, base, steered, decoding)


@dataclass
class SteerResult:
    """Everything a steer run measured; ``summary.json`` is its ``to_json()``."""

    run_dir: Path
    config: dict[str, Any]
    intervention: str
    lens: str
    scale: SteeringScale
    picture: dict[str, Any]
    """Unit, final-layer mean CE (base, intervened, diff) and the per-layer CE shift on the picture text."""
    generation: Continuations | None = None
    evaluations: dict[str, InterventionEvaluation] = field(default_factory=dict)
    """``held_out`` (the corpus) and ``texts`` (the config's own texts)."""
    programs: ProgramLosses | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "config": self.config,
            "intervention": self.intervention,
            "lens": self.lens,
            "scale": self.scale.to_json(),
            "picture": self.picture,
        }
        if self.generation is not None:
            out["generation"] = asdict(self.generation)
        if self.evaluations:
            out["eval"] = {name: ev.to_json() for name, ev in self.evaluations.items()}
        if self.programs is not None:
            out["eval_programs"] = self.programs.to_json()
        return out

    def lines(self) -> list[str]:
        final = self.picture["final_ce_mean"]
        out = [
            f"intervention: {self.intervention} ({self.lens} lens)",
            f"added norm / median residual norm: {self.scale.added_over_median}",
            f"picture text, final-layer CE: base {final['base']:.3f}, steered {final['intervened']:.3f} {self.picture['unit']}/token",
        ]
        out += self.generation.lines() if self.generation else []
        out += [ev.line(name) for name, ev in self.evaluations.items()]
        out += self.programs.lines() if self.programs else []
        return out


def steer(cfg: SteerConfig) -> SteerResult:
    """Picture, figures, continuations and evaluation of one steering config."""
    torch.manual_seed(cfg.seed)
    model, tokenizer, lens = run_model_and_lens(cfg)
    steering = build_steering(cfg.steering, model, tokenizer)
    intervention = lambda: steering  # noqa: E731  one hook object, applied afresh for each forward pass
    bos = cfg.steering.prepend_bos
    text_ids = torch.tensor([encode(tokenizer, cfg.picture.text, bos)])  # [1, T]
    picture = build_picture(model, tokenizer, cfg.picture.text, lens, intervention, top_k=cfg.picture.top_k, input_ids=text_ids)

    out, unit, label = cfg.run_dir, cfg.picture.unit, describe(cfg.steering)
    arrays = write_picture(picture, out, cfg.model.name, lens.origin, label, cfg.picture, rows="every layer")
    title = figure_title(cfg.model.name, "the model's own per-token loss", None, label, cfg.picture.text)
    plot_final_token_loss(picture, out / "final_loss.png", unit=unit, title=title, names=["steered model"])

    result = SteerResult(
        run_dir=out,
        config=to_dict(cfg),
        intervention=label,
        lens=lens.kind,
        scale=steering_scale(model, text_ids, steering),
        picture={
            "unit": unit,
            "final_ce_mean": {s: arrays[s]["final_ce_mean"] for s in ("base", "intervened", "diff")},
            "ce_layer_mean_shift": arrays["diff"]["ce_layer_mean"],
        },
    )
    if cfg.generate.max_new_tokens > 0:
        result.generation = continuations(model, tokenizer, intervention, cfg.generate.prompt, cfg.generate, cfg.seed, bos)
    if cfg.eval.enabled:
        held_out = held_out_sequences(cfg.data, tokenizer, cfg.eval.sequences, bos)
        shift_lens = lens if cfg.eval.lens_shift else None
        result.evaluations["held_out"] = evaluate_intervention(model, held_out, intervention, shift_lens, cfg.eval.confidence)
        if cfg.eval.skips:
            skips = {f"skip {i}..{j}": (lambda i=i, j=j: LayerProgram.skip(model, i, j)) for i, j in cfg.eval.skips}
            result.programs = program_losses(model, held_out, skips)
        if cfg.eval.texts:
            texts = [torch.tensor(encode(tokenizer, t, bos)) for t in cfg.eval.texts]
            result.evaluations["texts"] = evaluate_intervention(model, texts, intervention, None, cfg.eval.confidence)
    write_json(result.to_json(), out / "summary.json")
    return result


def steer_sweep(cfg: SteerSweepConfig) -> Measured[SteeringGrid]:
    """Every layer x coefficient of one steering, scored on held-out and on-topic text; JSON + figure."""
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_run_model(cfg)
    bos = cfg.steering.prepend_bos
    held_out = held_out_sequences(cfg.data, tokenizer, cfg.sequences, bos)
    on_topic = [torch.tensor(encode(tokenizer, text, bos)) for text in cfg.texts]

    def steering_at(layer: int, coefficient: float) -> InterventionFactory:
        steering = build_steering(replace(cfg.steering, layer=layer, coefficient=coefficient), model, tokenizer)
        return lambda: steering

    grid = steering_grid(model, held_out, on_topic, steering_at, cfg.layers, cfg.coefficients)
    write_json({**grid.to_json(), "config": to_dict(cfg)}, cfg.run_dir / "sweep.json")
    title = f"{cfg.model.name}: {steering_source(cfg.steering)}, every layer x coefficient"
    plot_steering_grid(grid, cfg.run_dir / "sweep.png", title=title)
    return Measured(cfg.run_dir, grid)
