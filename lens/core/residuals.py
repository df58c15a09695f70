"""Capture the raw residual stream of every block with hooks.

``output_hidden_states=True`` is not used on purpose: for GPT-2, NeoX and Llama the last entry
already has the final norm applied, and a lens must read the raw stream the block wrote.
Layer ``l`` means "residual after ``l`` blocks": layer 0 is the embedding output (the input of
block 0) and layer ``n_layers`` is the last block's raw output. Each is captured as the input of
what reads it next (block ``l``, and the final norm after the last block), so a model running no
blocks at all (a layer program that removes every one) still has its one residual.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Iterator

import torch
from torch import nn
from transformers import PreTrainedModel

from lens.core.arch import get_blocks, get_final_norm, get_unembed


def block_hidden(output: torch.Tensor | tuple) -> torch.Tensor:
    """Blocks return a tensor in recent transformers and a tuple in older ones."""
    return output[0] if isinstance(output, tuple) else output


def block_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


@contextmanager
def record_residuals(
    model: PreTrainedModel, detach: bool = True, positions: torch.Tensor | None = None
) -> Iterator[list[torch.Tensor]]:
    """Within the block, every forward pass appends ``n_layers + 1`` tensors ``[B, T, d]``: the input
    of every block, then the input of the final norm. With ``positions`` (indices into the flattened
    ``B * T``), each is ``[k, d]``: only those positions are kept alive."""
    store: list[torch.Tensor] = []

    def pre_hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        h = block_input(args, kwargs)
        h = h.detach() if detach else h
        store.append(h if positions is None else h.flatten(0, 1)[positions])

    readers = [*get_blocks(model), get_final_norm(model)]
    handles = [reader.register_forward_pre_hook(pre_hook, with_kwargs=True) for reader in readers]
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def unembedding_skipped(model: PreTrainedModel) -> Iterator[None]:
    """Within the block the model's unembedding sees zero positions, so its logits are ``[B, 0, V]``.

    A caller that needs logits at a few positions only (a training step's kept positions) or none
    (least-squares fits) computes them from the last residual itself and never pays for, or
    holds, the ``[B, T, V]`` block: the largest single buffer of a small model's forward.
    """
    handle = get_unembed(model).register_forward_pre_hook(lambda _m, args: (args[0][..., :0, :], *args[1:]))
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def capture_residuals(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    logits: bool = True,
    positions: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the frozen model once; return residuals ``[L+1, B, T, d]`` and final logits ``[B, T, V]``
    (``None`` with ``logits=False``: the unembedding is skipped, see ``unembedding_skipped``).
    ``positions`` (indices into the flattened ``B * T``, with ``logits=False``) keeps only those:
    residuals ``[L+1, k, d]``, the others freed as the pass goes."""
    if positions is not None and logits:
        raise ValueError("positions= keeps residuals only: pass logits=False and read the kept positions' logits from the last residual")
    skip = unembedding_skipped(model) if not logits else nullcontext()
    with record_residuals(model, positions=positions) as store, skip:
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    n_layers = len(get_blocks(model))
    if len(store) != n_layers + 1:
        raise RuntimeError(
            f"Expected {n_layers + 1} residuals from one forward pass, got {len(store)}: "
            "was a block skipped or called twice?"
        )
    return torch.stack(store), out.logits if logits else None
