"""Does a re-trained run reproduce a published lens' card?

The card's table shows per-layer KL and CE of the tuned and logit lens to 3 decimals, from the
folder's ``eval.json``. After running the card's "Reproduce" command, compare the new run with
the published folder at the digits the card shows, and the weights per layer:

    lens train --config checkpoints/pretrained/smollm2-135m/train_config.yaml
    python eval/check_card.py checkpoints/smollm2-135m-adam640
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

CARD_DECIMALS = 3  # lens/report/card.py writes the table with 3 decimals
SHIPPED = Path("checkpoints/pretrained/smollm2-135m")


def compare_evals(published: dict[str, Any], rerun: dict[str, Any], decimals: int = CARD_DECIMALS) -> dict[str, Any]:
    """Cells of the card's table (per-layer and mean KL/CE, tuned and logit) that differ at the shown digits."""
    if published["tokens"] != rerun["tokens"]:
        raise ValueError(f"the runs were evaluated on different token counts ({published['tokens']} vs {rerun['tokens']}): "
                         "re-run with the published folder's train_config.yaml unchanged")
    cells: list[tuple[str, str, Any, float, float]] = []
    for lens in ("tuned", "logit"):
        a, b = published["lenses"][lens], rerun["lenses"][lens]
        for key in ("kl", "ce"):
            cells += [(lens, key, layer, x, y) for layer, (x, y) in enumerate(zip(a[key], b[key]))]
            cells.append((lens, f"mean_{key}", "mean", a[f"mean_{key}"], b[f"mean_{key}"]))
    differ = [c for c in cells if f"{c[3]:.{decimals}f}" != f"{c[4]:.{decimals}f}"]
    return {"cells": len(cells), "differ": differ, "max_abs_diff": max(abs(x - y) for *_, x, y in cells),
            "mean_kl": (published["lenses"]["tuned"]["mean_kl"], rerun["lenses"]["tuned"]["mean_kl"])}


def weight_drift(published: dict[str, torch.Tensor], rerun: dict[str, torch.Tensor]) -> dict[str, float]:
    """Largest per-layer relative Frobenius distance of the published weights from the re-run's, next to what
    rounding the re-run to the published storage dtype alone costs (the floor any reproduction sits on)."""
    out = {}
    for name, stored in published.items():
        new = rerun[name].float()                                  # [layers, ...]
        scale = new.flatten(1).norm(dim=1)
        out[name] = ((stored.float() - new).flatten(1).norm(dim=1) / scale).max().item()
        out[f"{name}_storage_rounding"] = ((new.to(stored.dtype).float() - new).flatten(1).norm(dim=1) / scale).max().item()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="the folder the card's Reproduce command wrote")
    p.add_argument("--published", type=Path, default=SHIPPED, help="the published lens folder (default: the shipped one)")
    args = p.parse_args()
    for folder in (args.run, args.published):
        for name in ("eval.json", "lens.safetensors"):
            if not (folder / name).is_file():
                raise SystemExit(f"{folder / name} is missing: pass a finished `lens train` run and a published lens folder")
    evals = compare_evals(json.loads((args.published / "eval.json").read_text()), json.loads((args.run / "eval.json").read_text()))
    drift = weight_drift(load_file(args.published / "lens.safetensors"), load_file(args.run / "lens.safetensors"))
    a, b = evals["mean_kl"]
    print(f"tuned mean KL: published {a:.6f}, re-run {b:.6f}; largest cell difference {evals['max_abs_diff']:.1e}")
    print(f"{len(evals['differ'])} of {evals['cells']} card cells differ at {CARD_DECIMALS} decimals")
    for lens, key, layer, x, y in evals["differ"]:
        print(f"  {lens} {key} layer {layer}: {x:.{CARD_DECIMALS}f} vs {y:.{CARD_DECIMALS}f}")
    for name in ("weight", "bias"):
        print(f"{name}: relative distance per layer up to {drift[name]:.1e} "
              f"(storage rounding alone {drift[f'{name}_storage_rounding']:.1e})")


if __name__ == "__main__":
    main()
