"""``lens trajectory text="..."``: what every layer, read through a lens, predicts at every token of one text."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lens.analysis.layers import json_array
from lens.analysis.trajectory import compare_readings, read_text, read_trajectory, to_picture, trajectory_json
from lens.artifacts.files import write_json
from lens.artifacts.registry import run_model_and_lens
from lens.config import TrajectoryConfig
from lens.core.translators import LogitLens, Unembed
from lens.report.html import write_html
from lens.report.plots import plot_heatmap, plot_token_heatmaps


@dataclass
class TrajectoryResult:
    run_dir: Path
    lens: str
    prediction_depth: list[int]

    def lines(self) -> list[str]:
        depth = self.prediction_depth
        return [f"{self.lens} lens, {len(depth)} tokens, mean prediction depth {sum(depth) / len(depth):.2f}"]


def trajectory(cfg: TrajectoryConfig) -> TrajectoryResult:
    """Write ``trajectory.{json,png,html}`` and, for a tuned lens, ``trajectory_js.png`` (JS to the logit lens)."""
    out = cfg.run_dir
    model, tokenizer, lens = run_model_and_lens(cfg)
    unembed = Unembed(model)
    ids, reading = read_text(model, tokenizer, cfg.text, cfg.max_tokens)
    traj = read_trajectory(lens, unembed, ids, reading, cfg.top_k)
    picture = to_picture(traj, tokenizer, cfg.text, lens.kind)
    result: dict[str, Any] = {"model": cfg.model.name, "lens": lens.kind, "lens_spec": cfg.lens}
    result.update(trajectory_json(traj, picture))
    title = f"{cfg.model.name}, {lens.kind} lens"
    plot_token_heatmaps(picture, out / "trajectory.png", metric=cfg.metric, title=f"{title}: {cfg.metric} (cells: top-1 prediction)")
    write_html(picture, out / "trajectory.html", title=title)
    if not isinstance(lens, LogitLens):
        cmp = compare_readings(unembed, lens, reading.residuals, LogitLens(lens.n_layers, lens.d_model), reading.residuals)
        result["vs_logit_lens"] = {name: json_array(value) for name, value in cmp.items()}
        plot_heatmap(
            cmp["js"], out / "trajectory_js.png", xlabels=picture.tokens, ylabels=list(range(lens.n_layers + 1)),
            xlabel="input token", ylabel="layer (residual after n blocks)", cbar_label="JS divergence [nats]",
            title=f"{cfg.model.name}: Jensen-Shannon divergence, tuned vs logit lens (at most ln 2 = 0.693)",
        )
    write_json(result, out / "trajectory.json")
    return TrajectoryResult(out, lens.kind, result["prediction_depth"])
