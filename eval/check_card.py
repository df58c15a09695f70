"""Does a re-trained run reproduce a published lens' card?

The card's table shows per-layer KL and CE of the tuned and logit lens to 3 decimals, from the
folder's ``eval.json``. After running the card's "Reproduce" command, compare the new run's table
with the published one as the card prints it, and the weights per layer:

    lens train --config checkpoints/pretrained/smollm2-135m/train_config.yaml
    python eval/check_card.py checkpoints/smollm2-135m-adam1280
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from lens.report.card import card_table

SHIPPED = Path("checkpoints/pretrained/smollm2-135m")


def compare_evals(published: dict[str, Any], rerun: dict[str, Any]) -> dict[str, Any]:
    """The rows of the card's table (``card_table``, at the precision the card prints) that a re-run changes,
    and the largest difference of any number behind them."""
    if published["tokens"] != rerun["tokens"]:
        raise ValueError(f"the runs were evaluated on different token counts ({published['tokens']} vs {rerun['tokens']}): "
                         "re-run with the published folder's train_config.yaml unchanged")
    old, new = card_table(published), card_table(rerun)
    pairs = [(x, y) for lens in ("tuned", "logit") for key in ("kl", "ce")
             for x, y in zip(published["lenses"][lens][key] + [published["lenses"][lens][f"mean_{key}"]],
                             rerun["lenses"][lens][key] + [rerun["lenses"][lens][f"mean_{key}"]])]
    return {"rows": len(old), "differ": [(a, b) for a, b in zip(old, new) if a != b],
            "max_abs_diff": max(abs(x - y) for x, y in pairs)}


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
    published, rerun = (json.loads((folder / "eval.json").read_text()) for folder in (args.published, args.run))
    evals = compare_evals(published, rerun)
    drift = weight_drift(load_file(args.published / "lens.safetensors"), load_file(args.run / "lens.safetensors"))
    a, b = published["lenses"]["tuned"]["mean_kl"], rerun["lenses"]["tuned"]["mean_kl"]
    print(f"tuned mean KL: published {a:.6f}, re-run {b:.6f}; largest difference of any table number {evals['max_abs_diff']:.1e}")
    print(f"{len(evals['differ'])} of the card table's {evals['rows']} rows differ as printed")
    for a_row, b_row in evals["differ"]:
        print(f"  published {a_row}\n  re-run    {b_row}")
    for name in ("weight", "bias"):
        print(f"{name}: relative distance per layer up to {drift[name]:.1e} "
              f"(storage rounding alone {drift[f'{name}_storage_rounding']:.1e})")


if __name__ == "__main__":
    main()
