"""What every intervention shares: apply on ``with``, undo everything on exit, compose, validate.

An intervention records one undo callback per change it makes, so restoring the model is the
same loop whether the body finished, raised, or applying itself failed half-way.
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from typing import Callable

from torch import nn

from lens.config import InputError
from lens.core.arch import n_blocks


class Intervention:
    """A reversible change to a model, applied for the duration of a ``with`` block."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []

    def apply(self) -> None:
        """Change the model, calling ``self.on_exit`` once per change so it can be undone."""
        raise NotImplementedError

    def on_exit(self, undo: Callable[[], None]) -> None:
        self._undo.append(undo)

    def __enter__(self) -> "Intervention":
        if self._undo:
            raise RuntimeError(f"{type(self).__name__} is already applied; it cannot be entered twice at once")
        try:
            self.apply()
        except BaseException:
            self.restore()
            raise
        return self

    def __exit__(self, *exc: object) -> bool:
        self.restore()
        return False

    def restore(self) -> None:
        """Undo every change, newest first; safe to call twice."""
        while self._undo:
            self._undo.pop()()


class _Composed(Intervention):
    def __init__(self, parts: tuple[Intervention, ...]) -> None:
        super().__init__()
        self.parts = parts

    def apply(self) -> None:
        stack = ExitStack()
        self.on_exit(stack.close)
        for part in self.parts:
            stack.enter_context(part)


def compose(*parts: Intervention) -> Intervention:
    """Apply ``parts`` in the given order and undo them in reverse.

    Order matters where parts interact: steering hooks whatever block sits at its index when it
    is entered. Put a ``LayerProgram`` first to steer the residual after ``layer`` steps of the
    program; put it last and the hook stays on the intact model's block, firing wherever (and as
    often as) the program runs that block, and never if the program skips it.
    """
    for part in parts:
        if not isinstance(part, Intervention):
            raise TypeError(f"compose() takes interventions, got {type(part).__name__}")
    return _Composed(parts)


def check_injection_layer(model: nn.Module, layer: int) -> int:
    """Steering changes the residual after ``layer`` blocks, so valid layers are ``0..n_layers``."""
    n = n_blocks(model)
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise TypeError(f"layer must be an integer (a count of blocks, 0..{n}), got {layer!r} of type {type(layer).__name__}")
    if not 0 <= layer <= n:
        raise InputError(
            f"layer {layer!r} out of range: steering adds to the residual after `layer` blocks, "
            f"valid layers are 0..{n} for this {n}-block model"
        )
    return layer


def check_coefficient(coefficient: float) -> float:
    value = float(coefficient)
    if not math.isfinite(value):
        raise ValueError(f"coefficient {coefficient!r} is not a finite number; give any finite float")
    return value


def hook_count(model: nn.Module) -> int:
    """Forward hooks and pre-hooks on all modules: 0 on a clean model (tests check nothing leaks)."""
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
