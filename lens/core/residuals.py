"""Capture the raw residual stream of every block with hooks.

``output_hidden_states=True`` is not used on purpose: for GPT-2, NeoX and Llama the last entry
already has the final norm applied, and a lens must read the raw stream the block wrote.
Layer ``l`` means "residual after ``l`` blocks": layer 0 is the embedding output (the input of
block 0) and layer ``n_layers`` is the last block's raw output. Each is captured as the input of
what reads it next (block ``l``, and the final norm after the last block), so a model running no
blocks at all (a layer program that removes every one) still has its one residual.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn
from transformers import PreTrainedModel

from lens.core.arch import get_blocks, get_final_norm


def block_hidden(output: torch.Tensor | tuple) -> torch.Tensor:
    """Blocks return a tensor in recent transformers and a tuple in older ones."""
    return output[0] if isinstance(output, tuple) else output


def block_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


@contextmanager
def record_residuals(model: PreTrainedModel, detach: bool = True) -> Iterator[list[torch.Tensor]]:
    """Within the block, every forward pass appends ``n_layers + 1`` tensors ``[B, T, d]``: the input
    of every block, then the input of the final norm."""
    store: list[torch.Tensor] = []

    def pre_hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        h = block_input(args, kwargs)
        store.append(h.detach() if detach else h)

    readers = [*get_blocks(model), get_final_norm(model)]
    handles = [reader.register_forward_pre_hook(pre_hook, with_kwargs=True) for reader in readers]
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def capture_residuals(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the frozen model once; return residuals ``[L+1, B, T, d]`` and final logits ``[B, T, V]``."""
    with record_residuals(model) as store:
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    n_layers = len(get_blocks(model))
    if len(store) != n_layers + 1:
        raise RuntimeError(
            f"Expected {n_layers + 1} residuals from one forward pass, got {len(store)}: "
            "was a block skipped or called twice?"
        )
    return torch.stack(store), out.logits
