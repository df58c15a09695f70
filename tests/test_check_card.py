"""eval/check_card.py: a re-run is compared with a published card's table as the card prints it."""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "eval"))
import check_card  # noqa: E402

SHIPPED_EVAL = json.loads((ROOT / "checkpoints/pretrained/smollm2-135m/eval.json").read_text())


def test_identical_runs_match_and_a_moved_cell_is_named() -> None:
    same = check_card.compare_evals(SHIPPED_EVAL, copy.deepcopy(SHIPPED_EVAL))
    assert same["differ"] == [] and same["max_abs_diff"] == 0.0
    assert same["rows"] == len(SHIPPED_EVAL["lenses"]["tuned"]["kl"]) + 3  # header, rule, layers, mean, output

    moved = copy.deepcopy(SHIPPED_EVAL)
    moved["lenses"]["tuned"]["kl"][7] += 0.01
    ce = moved["lenses"]["logit"]["ce"]
    ce[3] = round(ce[3], 3) + 1e-5  # moved below the digits the card shows: not a difference
    out = check_card.compare_evals(SHIPPED_EVAL, moved)
    assert [(a.split("|")[1].strip(), b.split("|")[2].strip()) for a, b in out["differ"]] == \
        [("7", f"{moved['lenses']['tuned']['kl'][7]:.3f}")]
    assert out["max_abs_diff"] == pytest.approx(0.01)


def test_runs_on_other_tokens_are_refused() -> None:
    other = copy.deepcopy(SHIPPED_EVAL)
    other["tokens"] += 128
    with pytest.raises(ValueError, match="different token counts"):
        check_card.compare_evals(SHIPPED_EVAL, other)


def test_weight_drift_separates_storage_rounding_from_a_real_change() -> None:
    torch.manual_seed(0)
    rerun = {"weight": torch.randn(3, 8, 8), "bias": torch.randn(3, 8)}
    stored = {k: v.half() for k, v in rerun.items()}
    drift = check_card.weight_drift(stored, rerun)
    assert drift["weight"] == pytest.approx(drift["weight_storage_rounding"]) and 0 < drift["weight"] < 1e-3
    changed = {k: (v * 1.01).half() for k, v in rerun.items()}
    assert check_card.weight_drift(changed, rerun)["weight"] == pytest.approx(0.01, rel=0.05)
