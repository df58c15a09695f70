"""Zero-ablation of one component: a block's attention or MLP adds nothing to the residual stream.

Ablating both parts of a block is skipping the block (the residual passes through unchanged), so
the two parts' costs can be read next to the block's: which of them the model cannot do without.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from lens.config import InputError
from lens.core.arch import get_component, n_blocks
from lens.interventions.base import Intervention

Part = Literal["attention", "mlp"]


class Ablation(Intervention):
    """``part`` of block ``block`` outputs zeros (its other outputs, such as attention weights, pass)."""

    def __init__(self, model: nn.Module, block: int, part: Part) -> None:
        super().__init__()
        n = n_blocks(model)
        if isinstance(block, bool) or not isinstance(block, int) or not 0 <= block < n:
            raise InputError(f"block {block!r} out of range: valid blocks are 0..{n - 1}")
        if part not in ("attention", "mlp"):
            raise InputError(f"part must be 'attention' or 'mlp', got {part!r}")
        self.model, self.block, self.part = model, block, part

    def apply(self) -> None:
        def zero(_module: nn.Module, _args: tuple, output: torch.Tensor | tuple) -> torch.Tensor | tuple:
            if isinstance(output, tuple):
                return (torch.zeros_like(output[0]), *output[1:])
            return torch.zeros_like(output)

        handle = get_component(self.model, self.block, self.part).register_forward_hook(zero)
        self.on_exit(handle.remove)
