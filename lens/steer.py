"""Steer a model and read it through a lens: ``python -m lens.steer --config configs/steer_<name>.yaml key=value ...``.

Writes into ``<output_dir>/<run_name>/``: layer x token heatmaps (PNG, one per metric), the
final-layer per-token loss plot, one interactive ``picture.html``, ``picture.json`` (the arrays)
and ``summary.json`` (steering scale, greedy continuations, held-out evaluation).
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lens.config import ConfigError, load_config, run_cli, to_dict
from lens.data import load_sequences
from lens.html_report import write_html
from lens.interventions import ActAdd, LayerProgram, ResidualAdd, SteeringVector
from lens.io import logit_lens_for, write_json
from lens.model import load_model
from lens.picture import METRICS, UNITS, build_picture
from lens.plots import plot_final_token_loss, plot_token_heatmaps
from lens.pretrained import lens_or_logit
from lens.residuals import capture_residuals
from lens.steer_config import SteerConfig, SteeringConfig
from lens.steer_eval import evaluate_steering, program_losses
from lens.translators import Lens

def resolve_lens(spec: str, model: PreTrainedModel, model_name: str) -> Lens:
    """``logit``; ``auto``: the trained lens under ``checkpoints/<model_name>/`` if there is one, else
    the logit lens; anything else: a lens folder or tuned-lens id that must load."""
    if spec == "logit":
        return logit_lens_for(model)
    return lens_or_logit(None if spec == "auto" else spec, model, model_name)


def build_steering(cfg: SteeringConfig, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> ResidualAdd:
    """The configured steering intervention (not yet applied)."""
    if cfg.kind == "actadd":
        pairs = [tuple(pair) for pair in cfg.pairs]
        return ActAdd(model, tokenizer, pairs, layer=cfg.layer, coefficient=cfg.coefficient)  # type: ignore[arg-type]
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
    raise ConfigError(f"steering.kind must be 'actadd' or 'vector', got {cfg.kind!r}")


def describe(cfg: SteeringConfig) -> str:
    """A one-line label for figure titles."""
    if cfg.kind == "actadd":
        what = " + ".join(f'"{plus}" - "{minus}"' for plus, minus in cfg.pairs)
    else:
        what = f"vector from {cfg.vector_path}" if cfg.vector_path else f"{cfg.method} contrast vector"
    return f"{what} at layer {cfg.layer}, coefficient {cfg.coefficient:g}"


@torch.no_grad()
def steering_scale(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, steer: ResidualAdd, text: str
) -> dict[str, Any]:
    """Norms of the added rows next to the residual norms at the steered layer, on ``text``.

    Position 0 is reported apart: it is an attention sink whose norm is several times that of
    the other positions, so the median over positions >= 1 is the fair yardstick.
    """
    rows, tail = steer.offsets()  # [k, d], [d] or None
    ids = tokenizer(text, return_tensors="pt")["input_ids"].to(model.device)  # [1, T]
    residuals, _ = capture_residuals(model, ids)  # [L+1, 1, T, d]
    norms = residuals[steer.layer, 0].float().norm(dim=-1)  # [T]
    typical = float(norms[1:].median()) if norms.numel() > 1 else float(norms[0])
    added = rows.float().norm(dim=-1).tolist() + ([float(tail.float().norm())] if tail is not None else [])
    return {
        "layer": steer.layer,
        "added_norms": [round(x, 2) for x in added],
        "residual_norm_position0": round(float(norms[0]), 2),
        "residual_norm_median": round(typical, 2),
        "added_over_median": [round(x / typical, 3) for x in added],
    }


@torch.no_grad()
def continuations(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, steer: ResidualAdd, prompt: str, max_new_tokens: int
) -> dict[str, str]:
    """Greedy continuations of ``prompt`` by the intact and the steered model."""
    enc = tokenizer(prompt, return_tensors="pt").to(model.device)
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)

    def generate() -> str:
        out = model.generate(**enc, **kwargs)  # [1, T + new]
        return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)

    base = generate()
    with steer:
        steered = generate()
    return {"prompt": prompt, "base": base, "steered": steered}


def check_options(cfg: SteerConfig) -> None:
    """Fail before the model loads on options only this CLI reads."""
    if cfg.picture.unit not in UNITS:
        raise ConfigError(f"picture.unit must be one of {list(UNITS)}, got {cfg.picture.unit!r}")
    bad = [m for m in cfg.picture.metrics if m not in METRICS]
    if bad:
        raise ConfigError(f"picture.metrics {bad} unknown; valid: {sorted(METRICS)}")
    if cfg.eval.enabled and cfg.eval.texts and len(cfg.eval.texts) < 2:
        raise ConfigError("eval.texts needs at least 2 texts for a confidence interval (or leave it empty)")


def run(cfg: SteerConfig) -> dict[str, Any]:
    """Picture, figures, continuations and evaluation of one steering config; returns the summary."""
    check_options(cfg)
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_model(cfg.model.name, cfg.model.dtype)
    lens = resolve_lens(cfg.lens, model, cfg.model.name)
    steer = build_steering(cfg.steering, model, tokenizer)
    picture = build_picture(model, tokenizer, cfg.picture.text, lens, lambda: steer, top_k=cfg.picture.top_k)

    out, unit, label = cfg.run_dir, cfg.picture.unit, describe(cfg.steering)
    out.mkdir(parents=True, exist_ok=True)
    for metric in cfg.picture.metrics:
        title = f"{METRICS[metric]} through the {lens.kind} lens; intervention: {label}"
        plot_token_heatmaps(picture, out / f"heatmap_{metric}.png", metric=metric, unit=unit, title=title)
    plot_final_token_loss(picture, out / "final_loss.png", unit=unit, title=f"per-token loss of the model; {label}")
    write_html(picture, out / "picture.html", unit=unit, title=f"{lens.kind} lens; intervention: {label}")
    arrays = picture.summary(unit)
    write_json(arrays, out / "picture.json")

    summary: dict[str, Any] = {
        "config": to_dict(cfg),
        "intervention": label,
        "lens": lens.kind,
        "scale": steering_scale(model, tokenizer, steer, cfg.picture.text),
        "picture": {
            "unit": unit,
            "final_ce_mean": {s: arrays[s]["final_ce_mean"] for s in ("base", "intervened", "diff")},
            "ce_layer_mean_shift": arrays["diff"]["ce_layer_mean"],
        },
    }
    if cfg.generate.max_new_tokens > 0:
        summary["generation"] = continuations(model, tokenizer, steer, cfg.generate.prompt, cfg.generate.max_new_tokens)
    if cfg.eval.enabled:
        held_out = load_sequences(cfg.data, tokenizer, held_out=True, limit=cfg.eval.sequences)  # [n, T]
        summary["eval"] = {
            "held_out": evaluate_steering(
                model, list(held_out), lambda: steer, lens if cfg.eval.lens_shift else None, cfg.eval.confidence
            )
        }
        if cfg.eval.skips:
            skips = {f"skip {i}..{j}": (lambda i=i, j=j: LayerProgram.skip(model, i, j)) for i, j in cfg.eval.skips}
            summary["eval_programs"] = program_losses(model, list(held_out), skips)
        if cfg.eval.texts:
            texts = [tokenizer(t, return_tensors="pt")["input_ids"][0] for t in cfg.eval.texts]
            summary["eval"]["texts"] = evaluate_steering(model, texts, lambda: steer, None, cfg.eval.confidence)
    write_json(summary, out / "summary.json")
    return summary


def report_lines(summary: dict[str, Any]) -> list[str]:
    """The few numbers worth printing after a run."""
    pic = summary["picture"]["final_ce_mean"]
    unit = summary["picture"]["unit"]
    lines = [
        f"intervention: {summary['intervention']} ({summary['lens']} lens)",
        f"added norm / median residual norm: {summary['scale']['added_over_median']}",
        f"picture text, final-layer CE: base {pic['base']:.3f}, steered {pic['intervened']:.3f} {unit}/token",
    ]
    if "generation" in summary:
        gen = summary["generation"]
        lines += [f"base:    {gen['prompt']}{gen['base']!r}", f"steered: {gen['prompt']}{gen['steered']!r}"]
    for name, res in summary.get("eval", {}).items():
        ci = res["logprob_diff"]
        lines.append(
            f"{name}: log-prob diff {ci['mean']:+.4f} nats/token [{ci['low']:+.4f}, {ci['high']:+.4f}] "
            f"({ci['confidence']:.0%} CI, {res['sequences']} seqs), perplexity x{res['perplexity']['ratio']:.3f}"
        )
    for name, res in summary.get("eval_programs", {}).get("programs", {}).items():
        lines.append(f"{name}: held-out loss {res['loss']:.3f} nats/token (intact {summary['eval_programs']['intact']:.3f})")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", help="YAML file under configs/ (defaults apply without one)")
    parser.add_argument("overrides", nargs="*", help="OmegaConf dotlist overrides, e.g. steering.coefficient=-4")
    args = parser.parse_args(argv)
    cfg = load_config(SteerConfig, args.config, args.overrides)
    summary = run(cfg)
    print("\n".join(report_lines(summary)))
    print(f"wrote {cfg.run_dir}")


if __name__ == "__main__":
    run_cli(main)
