"""eval/bench_train.py: the per-phase memory profile credits a peak to the phase it happened in."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval"))
import bench_train as bt  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available() or not Path("/proc/self/clear_refs").exists(), reason="CPU RSS on Linux")
def test_phase_peaks_credit_a_transient_to_its_phase():
    phases = bt.PhasePeaks()
    bt.reset_peak_memory()
    phases.enter("small")
    small = torch.ones(2**20)  # 4 MiB, touched
    phases.enter("big")
    big = torch.ones(32 * 2**20)  # 128 MiB, touched, then freed before the next phase
    del big
    phases.enter("after")
    del small
    overall = phases.overall()
    assert phases.peaks["big"] - phases.peaks["small"] > 100  # MiB: the transient is the big phase's
    assert phases.peaks["after"] < phases.peaks["big"] - 100  # and no later phase inherits it
    assert overall == phases.peaks["big"]
