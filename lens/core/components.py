"""Read and overwrite what each block computes, not only the residual stream between blocks.

Causal tracing restores one (token, block) state of a clean run inside a corrupted one; ROME
reads the MLP key and overwrites the MLP output; function vectors read and patch single attention
heads. Every one of those is a *site* of a block, found through the architecture table:

- ``block_in``  ``[B, T, d]``: the residual entering the block (layer ``block``);
- ``block_out`` ``[B, T, d]``: the residual the block writes (layer ``block + 1``);
- ``attention`` ``[B, T, d]``: what the attention adds to the residual;
- ``mlp``       ``[B, T, d]``: what the MLP adds to the residual;
- ``mlp_in``    ``[B, T, d]``: the MLP's input (after its norm);
- ``mlp_key``   ``[B, T, d_mlp]``: the input of the MLP's output projection (ROME's key ``k``);
- ``heads``     ``[B, T, n_heads * head_dim]``: the input of the attention's output projection,
  the heads' outputs side by side.

For every family in the table, ``block_out == block_in + attention + mlp`` (tested), whether the
block is sequential (GPT-2, Llama) or parallel (NeoX).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Literal, get_args

import torch
from torch import nn

from lens.config import InputError
from lens.core.arch import get_blocks, get_component

Site = Literal["block_in", "block_out", "attention", "mlp", "mlp_in", "mlp_key", "heads"]
SITES: tuple[str, ...] = get_args(Site)

_OUTPUT_OF = {"block_out": None, "attention": "attention", "mlp": "mlp"}
"""Sites that are a module's output (``None``: the block itself)."""
_INPUT_OF = {"block_in": None, "mlp_in": "mlp", "mlp_key": "mlp_out", "heads": "attention_out"}
"""Sites that are a module's first input."""


def site_module(model: nn.Module, block: int, site: Site) -> nn.Module:
    """The module whose output (or first input) is ``site`` of block ``block``."""
    if site not in SITES:
        raise InputError(f"unknown site {site!r}; sites are {list(SITES)}")
    n = len(get_blocks(model))
    if isinstance(block, bool) or not isinstance(block, int) or not 0 <= block < n:
        raise InputError(f"block {block!r} out of range: valid blocks are 0..{n - 1}")
    part = _OUTPUT_OF.get(site, _INPUT_OF.get(site))
    return get_blocks(model)[block] if part is None else get_component(model, block, part)


def _first(output: torch.Tensor | tuple) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _with_first(output: torch.Tensor | tuple, tensor: torch.Tensor) -> torch.Tensor | tuple:
    return (tensor, *output[1:]) if isinstance(output, tuple) else tensor


def _first_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_first_input(args: tuple, kwargs: dict, tensor: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (tensor, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": tensor}


@contextmanager
def edit_site(model: nn.Module, block: int, site: Site, edit: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Within the block, every forward pass replaces ``site`` of ``block`` by ``edit(tensor)``.

    ``edit`` sees the tensor the model computed and returns the one it continues with (same
    shape); recording the site with ``record_sites`` in the same pass sees the edited tensor."""
    module = site_module(model, block, site)
    if site in _OUTPUT_OF:

        def hook(_m: nn.Module, _args: tuple, output: torch.Tensor | tuple) -> torch.Tensor | tuple:
            return _with_first(output, edit(_first(output)))

        handle = module.register_forward_hook(hook)
    else:

        def pre_hook(_m: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            return _with_first_input(args, kwargs, edit(_first_input(args, kwargs)))

        handle = module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def record_sites(
    model: nn.Module, sites: tuple[Site, ...] | list[Site], blocks: list[int] | None = None, detach: bool = True
) -> Iterator[dict[str, dict[int, torch.Tensor]]]:
    """Within the block, ``store[site][block]`` holds that site's tensor from the latest forward pass
    (for ``blocks``, default all). Hooks are added after any already there, so edits made by
    ``edit_site`` or an intervention entered first are what gets recorded."""
    store: dict[str, dict[int, torch.Tensor]] = {site: {} for site in sites}
    handles = []
    for block in range(len(get_blocks(model))) if blocks is None else blocks:
        for site in sites:
            module = site_module(model, block, site)

            def keep(tensor: torch.Tensor, site: str = site, block: int = block) -> None:
                store[site][block] = tensor.detach() if detach else tensor

            if site in _OUTPUT_OF:
                handles.append(module.register_forward_hook(lambda _m, _a, out, keep=keep: keep(_first(out))))
            else:
                handles.append(
                    module.register_forward_pre_hook(lambda _m, args, kwargs, keep=keep: keep(_first_input(args, kwargs)), with_kwargs=True)
                )
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


def out_in_weight(linear: nn.Module) -> torch.Tensor:
    """A projection's weight as ``[out, in]``, sharing storage: ``nn.Linear`` stores it that way,
    GPT-2's ``Conv1D`` stores ``[in, out]``, so an in-place change of the view changes the model."""
    weight = linear.weight
    if isinstance(linear, nn.Linear):
        return weight
    if type(linear).__name__ == "Conv1D":
        return weight.T
    raise TypeError(f"{type(linear).__name__} is not a linear projection this project knows (nn.Linear or Conv1D)")


def n_heads(model: nn.Module) -> int:
    """Attention heads per block (``heads`` sites split into this many equal slices)."""
    config = model.config
    for name in ("num_attention_heads", "n_head"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    raise InputError(f"{type(model).__name__}'s config names no head count (num_attention_heads / n_head)")
