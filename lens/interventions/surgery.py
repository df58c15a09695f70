"""Layer surgery: run a model on any program of its blocks (skip, repeat, permute, replace a span).

The model's block list is swapped for one "slot" per program step and restored on exit. Two
things keep the rewritten model honest:

* ``config.num_hidden_layers`` (and a per-layer ``layer_types`` list, where the config has one)
  follow the program, because Llama-family models loop over ``layers[:num_hidden_layers]`` and
  caches are sized from the config.
* KV caches are re-indexed, not disabled: while a block runs in slot ``s`` its attention's
  ``layer_idx`` is the number of block slots before ``s``, so a repeated block writes its own
  cache entry instead of overwriting its first visit's. Translator slots use no cache.
"""

from __future__ import annotations

import operator
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence, Union

import torch
from torch import nn
from transformers import PreTrainedModel

from lens.artifacts.registry import load_span_translator
from lens.config import InputError, ProgramConfig
from lens.core.arch import get_blocks, n_blocks, set_blocks
from lens.core.residuals import block_input
from lens.core.translators import SpanTranslator, check_span
from lens.interventions.base import Intervention

Step = Union[int, nn.Module]
"""A program step: a block index of the intact model, or a module mapping residuals ``[..., d] -> [..., d]``."""


@contextmanager
def _layer_index(block: nn.Module, index: int) -> Iterator[None]:
    """Temporarily give every submodule that reads a cache by ``layer_idx`` the slot's index."""
    modules = [m for m in block.modules() if isinstance(getattr(m, "layer_idx", None), int)]
    saved = [m.layer_idx for m in modules]
    for m in modules:
        m.layer_idx = index
    try:
        yield
    finally:
        for m, old in zip(modules, saved):
            m.layer_idx = old


class _BlockSlot(nn.Module):
    def __init__(self, block: nn.Module, cache_index: int) -> None:
        super().__init__()
        self.block, self.cache_index = block, cache_index

    def forward(self, *args, **kwargs):
        with _layer_index(self.block, self.cache_index):
            return self.block(*args, **kwargs)


class _TranslatorSlot(nn.Module):
    """Stands in for a block: maps the incoming residual, ignores masks, positions and caches."""

    def __init__(self, translator: nn.Module) -> None:
        super().__init__()
        self.translator = translator

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.translator(block_input(args, kwargs))  # [B, T, d]


class LayerProgram(Intervention):
    """Run the model's blocks in the order ``program`` lists them (indices of the intact model)."""

    def __init__(self, model: nn.Module, program: Sequence[Step]) -> None:
        super().__init__()
        self.model = model
        self.program = self._check(model, program)
        self.built_for = n_blocks(model)

    @staticmethod
    def _check(model: nn.Module, program: Sequence[Step]) -> list[Step]:
        n = n_blocks(model)
        if isinstance(program, (str, bytes)) or not isinstance(program, Sequence):
            raise TypeError(f"program must be a sequence of block indices 0..{n - 1} or modules, got {program!r}")
        steps: list[Step] = []
        for position, step in enumerate(program):
            if isinstance(step, nn.Module):
                steps.append(step)
                continue
            try:
                index = operator.index(step) if not isinstance(step, bool) else None
            except TypeError:
                index = None
            if index is None or not 0 <= index < n:
                raise ValueError(
                    f"program step {position} is {step!r}: program steps are block indices 0..{n - 1} "
                    f"(this model has {n} blocks) or translator modules"
                )
            steps.append(index)
        return steps

    @classmethod
    def skip(cls, model: nn.Module, start: int, end: int) -> "LayerProgram":
        """Drop blocks ``start..end-1``: the residual after ``start`` blocks goes on as if after ``end``."""
        start, end = check_span(model, start, end)
        return cls(model, [*range(start), *range(end, n_blocks(model))])

    @classmethod
    def repeat(cls, model: nn.Module, block: int, times: int) -> "LayerProgram":
        """Run block ``block`` ``times`` times in a row (1 = intact model)."""
        n = n_blocks(model)
        if not (isinstance(block, int) and 0 <= block < n):
            raise ValueError(f"block {block!r} out of range: valid blocks are 0..{n - 1}")
        if not (isinstance(times, int) and times >= 1):
            raise ValueError(f"times {times!r} must be an integer >= 1 (use skip() to drop a block)")
        return cls(model, [*range(block), *[block] * times, *range(block + 1, n)])

    @classmethod
    def permute(cls, model: nn.Module, order: Sequence[int]) -> "LayerProgram":
        """Run every block exactly once, in ``order`` (a permutation of ``0..n_layers-1``)."""
        n = n_blocks(model)
        strays = [x for x in order if isinstance(x, bool) or not isinstance(x, int)]
        if strays:
            raise ValueError(f"order {list(order)!r} holds {strays!r}: a permutation lists block indices 0..{n - 1}")
        if sorted(order) != list(range(n)):
            raise ValueError(f"order {list(order)!r} is not a permutation of the block indices 0..{n - 1}")
        return cls(model, list(order))

    @classmethod
    def swap(cls, model: nn.Module, block: int) -> "LayerProgram":
        """Run blocks ``block`` and ``block + 1`` in the other order."""
        n = n_blocks(model)
        if not (isinstance(block, int) and 0 <= block < n - 1):
            raise InputError(f"swap {block!r} out of range: it swaps blocks i and i+1, i runs 0..{n - 2}")
        order = list(range(n))
        order[block], order[block + 1] = block + 1, block
        return cls(model, order)

    @classmethod
    def replace(cls, model: nn.Module, start: int, end: int, translator: nn.Module) -> "LayerProgram":
        """Replace blocks ``start..end-1`` by ``translator`` (residual after start -> after end blocks)."""
        start, end = check_span(model, start, end)
        if not isinstance(translator, nn.Module):
            raise TypeError(f"translator must be an nn.Module mapping [..., d] -> [..., d], got {type(translator).__name__}")
        return cls(model, [*range(start), translator, *range(end, n_blocks(model))])

    @classmethod
    def translated(cls, model: nn.Module, translator: SpanTranslator) -> "LayerProgram":
        """The model with a span translator in place of the span it was made for."""
        return cls.replace(model, translator.start, translator.end, translator)

    @classmethod
    def from_file(cls, model: PreTrainedModel, path: str | Path, allow_mismatch: bool = False) -> "LayerProgram":
        """A saved span translator in place of its span, after the checks every artifact gets
        (blocks, width, span, unembedding fingerprint of ``model``)."""
        return cls.translated(model, load_span_translator(path, model, allow_mismatch))

    @classmethod
    def from_config(cls, model: PreTrainedModel, cfg: ProgramConfig) -> "LayerProgram":
        """The program a config describes (``skip``, ``repeat``, ``swap``, ``steps`` or ``replace``)."""
        if cfg.skip is not None:
            return cls.skip(model, *cfg.skip)
        if cfg.repeat is not None:
            return cls.repeat(model, *cfg.repeat)
        if cfg.swap is not None:
            return cls.swap(model, cfg.swap)
        if cfg.steps is not None:
            return cls(model, list(cfg.steps))
        assert cfg.replace is not None, "ProgramConfig.problems() admits exactly one kind"
        program = cls.from_file(model, cfg.replace.path)
        translator = next(step for step in program.program if isinstance(step, SpanTranslator))
        wanted = {"start": cfg.replace.start, "end": cfg.replace.end}
        got = {"start": translator.start, "end": translator.end}
        wrong = [f"replace.{key}={value} (the file has {got[key]})" for key, value in wanted.items() if value is not None and value != got[key]]
        if wrong:
            raise InputError(f"replace.path={cfg.replace.path} stands in for blocks {got['start']}..{got['end']}: " + ", ".join(wrong))
        return program

    def apply(self) -> None:
        model, config = self.model, self.model.config
        original = get_blocks(model)
        if len(original) != self.built_for:
            if any(isinstance(block, (_BlockSlot, _TranslatorSlot)) for block in original):
                situation = "another program is active: build the inner program inside the outer one's `with`"
            else:
                situation = (
                    "it was built while another program was active, and that program has ended: "
                    "build it again, on the model as it is now"
                )
            raise RuntimeError(f"this program indexes {self.built_for} blocks but the model has {len(original)} on entry ({situation})")
        slots: list[nn.Module] = []
        for step in self.program:
            if isinstance(step, nn.Module):
                slots.append(_TranslatorSlot(step))
            else:
                slots.append(_BlockSlot(original[step], cache_index=sum(isinstance(s, _BlockSlot) for s in slots)))
        set_blocks(model, nn.ModuleList(slots))
        self.on_exit(lambda: set_blocks(model, original))

        old_count = config.num_hidden_layers
        config.num_hidden_layers = len(slots)
        self.on_exit(lambda: setattr(config, "num_hidden_layers", old_count))
        layer_types = getattr(config, "layer_types", None)
        if isinstance(layer_types, list):
            # cache layer k belongs to the k-th block slot; translator slots hold no cache
            blocks_in_order = [layer_types[s] for s in self.program if not isinstance(s, nn.Module)]
            config.layer_types = blocks_in_order + [layer_types[0]] * (len(slots) - len(blocks_in_order))
            self.on_exit(lambda: setattr(config, "layer_types", layer_types))
