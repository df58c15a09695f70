"""``lens eval``: held-out evaluation in depth of a lens next to the logit lens, JSON + figures."""

from __future__ import annotations

from lens.analysis.depth import DepthEvaluation, evaluate_depth
from lens.artifacts.files import write_json
from lens.artifacts.registry import run_model_and_lens
from lens.config import LensEvalConfig, to_dict
from lens.core.translators import logit_lens_for
from lens.data.sequences import token_sequences
from lens.report.plots import plot_eval_depth, plot_heatmap
from lens.runs.result import Measured


def evaluate(cfg: LensEvalConfig) -> Measured[DepthEvaluation]:
    """Load model and lens, stream held-out text through both, write ``eval_depth.json``, ``eval_depth.png``
    and (for a tuned lens) ``transfer.png``; the logit lens always joins."""
    model, tokenizer, lens = run_model_and_lens(cfg)
    lenses = {lens.kind: lens, "logit": logit_lens_for(model)}
    sequences = token_sequences(cfg.data, tokenizer, held_out=True, limit=cfg.sequences)
    results = evaluate_depth(
        model, tokenizer, lenses, sequences, cfg.data.batch_size, cfg.transfer_tokens, cfg.transfer_stride, total=cfg.sequences
    )
    out = cfg.run_dir
    write_json({**results.to_json(), "model": cfg.model.name, "lens": cfg.lens, "config": to_dict(cfg)}, out / "eval_depth.json")
    plot_eval_depth(results, out / "eval_depth.png", title=f"{cfg.model.name}: held-out evaluation, {results.tokens} tokens")
    if results.transfer is not None:
        t = results.transfer.to_json()
        plot_heatmap(
            t["ce_bpb"], out / "transfer.png", xlabels=t["layers"], ylabels=t["layers"],
            xlabel="applied at layer", ylabel="translator trained for layer", cbar_label="cross-entropy [bits/byte]",
            title=f"{cfg.model.name}: layer transfer of the tuned lens ({t['tokens']} tokens)",
        )
    return Measured(out, results)
