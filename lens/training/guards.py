"""Numerics guard: a NaN or inf loss must never turn silently into a NaN lens.

One bad batch (an fp16 overflow, a corrupt document) poisons every translator through the
optimizer in a single step. The guard looks at the per-part losses before backward and either
stops the run, naming the parts and the step, or skips that optimizer step.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or inf loss and ``trainer.on_nonfinite`` is ``stop``."""


def nonfinite_parts(losses: torch.Tensor) -> list[int]:
    """Indices of the per-part losses ``[K]`` that are NaN or inf."""
    return torch.nonzero(~torch.isfinite(losses.detach())).flatten().tolist()


def describe(losses: torch.Tensor, part_name: str, step: int) -> str:
    bad = nonfinite_parts(losses)
    values = {i: float(losses[i].detach()) for i in bad}
    where = f"{part_name} {bad} (values {values})" if bad else f"a {part_name} on another process"
    return f"non-finite training loss at step {step}: {where}"


def should_skip(losses: torch.Tensor, any_bad: bool, part_name: str, step: int, mode: str) -> bool:
    """True when this step must not update the weights; raises in ``stop`` mode.

    ``any_bad`` is whether any process saw a bad loss: all processes must agree on skipping,
    or the ones that do run backward wait forever for the gradients of the others.
    """
    if not any_bad:
        return False
    message = describe(losses, part_name, step)
    if mode == "stop":
        raise NonFiniteLossError(f"{message}. Nothing was saved from this step; set trainer.on_nonfinite=skip to skip such steps.")
    log.warning("%s; skipping this optimizer step (trainer.on_nonfinite=skip)", message)
    return True
