"""``lens function-vector --config configs/fv_smollm2.yaml``: a function vector for one word-pair task.

Writes into ``<output_dir>/<run_name>/``: ``summary.json`` (every number, the AIE of every head,
the lens readings), ``fv_aie.png`` (block x head AIE map), ``fv_layers.png`` (accuracy per
injection layer and the lens reading with and without the vector) and ``vector/`` (the vector as a
steering-vector artifact; ``lens steer`` adds it at every position, this run only at the final token).
"""

from __future__ import annotations

import torch

from lens.analysis.function_vectors import FunctionVectorStudy, study_function_vector
from lens.artifacts.files import write_json
from lens.artifacts.metadata import ModelRecord
from lens.artifacts.registry import run_model_and_lens
from lens.config import FunctionVectorConfig, to_dict
from lens.data.tasks import format_prompt, load_task, split_task
from lens.interventions import SteeringVector
from lens.report.plots import figure_title, plot_fv_layers, plot_head_effects
from lens.runs.result import Measured


def function_vector(cfg: FunctionVectorConfig) -> Measured[FunctionVectorStudy]:
    """Head means and AIE on the train words, the layer on the validation words, accuracy on the test words."""
    torch.manual_seed(cfg.seed)
    task = load_task(cfg.task)
    split = split_task(task, cfg.val_fraction, cfg.test_fraction, cfg.seed)
    model, tokenizer, lens = run_model_and_lens(cfg)
    study = study_function_vector(
        model, tokenizer, lens, split, task.name, cfg.shots, cfg.mean_prompts, cfg.aie_prompts, cfg.top_heads,
        cfg.layers, cfg.confidence, cfg.shuffled_eval, cfg.seed, cfg.template,
    )
    out = cfg.run_dir
    example = format_prompt([], split.test[0][0], cfg.template).replace("\n", " / ") + f" (zero-shot; {cfg.shots}-shot prompts for the heads)"
    intervention = f"function vector ({len(study.heads)} heads) at layer {study.layer}, final token"
    plot_head_effects(study, out / "fv_aie.png", figure_title(cfg.model.name, f"{task.name}: average indirect effect per head", None, "one head patched with its clean mean", example))
    plot_fv_layers(study, out / "fv_layers.png", figure_title(cfg.model.name, f"{task.name}: zero-shot accuracy and the answer", lens.origin, intervention, example))
    metadata = {"method": "function_vector", "task": task.name, "heads": [list(h) for h in study.heads], "added_at": "final token"}
    SteeringVector(study.vector, study.layer, metadata=metadata, built_for=ModelRecord.of(model)).save(out / "vector")
    write_json({"config": to_dict(cfg), "task_source": task.source, **study.to_json()}, out / "summary.json")
    return Measured(out, study)
