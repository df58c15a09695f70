"""``lens surgery`` with ``kind: picture``: the per-token loss picture of a model cut by layer programs.

For each program (skip, repeat, swap, any order of blocks, a saved span translator in place of its
span; optionally steered on top) the text is read through the lens at every slot of the program,
each residual with the translator of the layer it stands for (``program_rows``), next to the intact
model. Writes, per program, heatmaps (PNG), the interactive page and the arrays; for all programs
together, the model's own per-token loss (``final_loss.png``) and ``summary.json`` with the
continuations each cut model writes.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lens.analysis.picture import build_picture, program_rows
from lens.artifacts.files import write_json
from lens.artifacts.registry import run_model_and_lens
from lens.config import ProgramPictureConfig, to_dict
from lens.core.arch import n_blocks
from lens.interventions import LayerProgram, compose
from lens.interventions.steering import encode
from lens.report.plots import figure_title, plot_final_token_loss
from lens.runs.steer import Continuations, build_steering, continuations, describe, write_picture


@dataclass
class ProgramPictures:
    run_dir: Path
    programs: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per program: its folder, rows, mean output loss (base, cut, shift) and continuation."""

    def lines(self) -> list[str]:
        out = []
        for name, record in self.programs.items():
            loss = record["final_ce_mean"]
            out.append(f"{name}: output loss {loss['base']:.3f} -> {loss['intervened']:.3f} {record['unit']}/token ({len(record['rows']) - 1} slots)")
            if "generation" in record:
                out.append(f"    {record['generation']['prompt']}{record['generation']['steered'][0]!r}")
        return out


def folder_name(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_") or "program"


def surgery_pictures(cfg: ProgramPictureConfig) -> ProgramPictures:
    """One picture per program, all on ``picture.text``; the lens reads every slot as its layer."""
    torch.manual_seed(cfg.seed)
    model, tokenizer, lens = run_model_and_lens(cfg)
    steering = build_steering(cfg.steering, model, tokenizer) if cfg.steering is not None else None
    unit, text, result = cfg.picture.unit, cfg.picture.text, ProgramPictures(cfg.run_dir)
    bos = cfg.steering is not None and cfg.steering.prepend_bos
    text_ids = torch.tensor([encode(tokenizer, text, bos)])  # [1, T]
    pictures, names = [], []
    for spec in cfg.programs:
        program = LayerProgram.from_config(model, spec)
        name = spec.label() + (f" + {describe(cfg.steering)}" if cfg.steering is not None else "")

        def intervention(program: LayerProgram = program):  # the program first: steering counts its slots
            return compose(program, steering) if steering is not None else program

        rows = program_rows(program, n_blocks(model))
        picture = build_picture(model, tokenizer, text, lens, intervention, cfg.picture.top_k, rows=rows, input_ids=text_ids)
        folder = cfg.run_dir / folder_name(spec.label())
        arrays = write_picture(picture, folder, cfg.model.name, lens.origin, name, cfg.picture, rows="every slot")
        record: dict[str, Any] = {
            "folder": str(folder),
            "unit": unit,
            "rows": arrays["intervened"]["rows"],
            "final_ce_mean": {s: arrays[s]["final_ce_mean"] for s in ("base", "intervened", "diff")},
        }
        if cfg.generate.max_new_tokens > 0:
            generated: Continuations = continuations(model, tokenizer, intervention, cfg.generate.prompt, cfg.generate, cfg.seed, bos)
            record["generation"] = asdict(generated)
        result.programs[name] = record
        pictures.append(picture)
        names.append(name)
    title = figure_title(cfg.model.name, "the model's own per-token loss", None, ", ".join(names), text)
    plot_final_token_loss(pictures, cfg.run_dir / "final_loss.png", unit=unit, title=title, names=names)
    write_json({"config": to_dict(cfg), "lens": lens.origin, "programs": result.programs}, cfg.run_dir / "summary.json")
    return result
