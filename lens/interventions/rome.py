"""A rank-one edit of one MLP's output projection (ROME, Meng et al. 2022), applied for a ``with`` block.

The edit is ``W' = W + v uᵀ`` on the ``[out, in]`` weight of block ``block``'s MLP output
projection: ``u`` ``[d_mlp]`` picks the key it answers to (``C⁻¹k* / (C⁻¹k*)ᵀk*``, so ``uᵀk* = 1``),
``v`` ``[d]`` is what it adds to the MLP output for that key (``v* − W k*``). Entering adds the
delta; leaving copies the saved weight back, so the model is bit-identical afterwards, also when
the body raised. Saved as one artifact (``u``, ``v``, the block), checked against the model on load.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from lens.artifacts.metadata import ArtifactError, ArtifactMeta, ArtifactMismatchError, ModelRecord
from lens.artifacts.registry import read_artifact, save_artifact
from lens.config import InputError
from lens.core.arch import get_component, n_blocks
from lens.core.components import out_in_weight
from lens.interventions.base import Intervention


def mlp_out_weight(model: nn.Module, block: int) -> torch.Tensor:
    """``[d, d_mlp]``: block ``block``'s MLP output projection as ``[out, in]`` (a view sharing storage)."""
    n = n_blocks(model)
    if isinstance(block, bool) or not isinstance(block, int) or not 0 <= block < n:
        raise InputError(f"block {block!r} out of range: valid blocks are 0..{n - 1}")
    return out_in_weight(get_component(model, block, "mlp_out"))


@dataclass
class RankOneDelta:
    """``ΔW = v uᵀ`` for block ``block``'s MLP output projection, and what it was made from."""

    block: int
    u: torch.Tensor  # [d_mlp]
    v: torch.Tensor  # [d]
    details: dict[str, Any] = field(default_factory=dict)
    """The request (subject, prompt, new object) and how the vectors were found."""
    built_for: ModelRecord | None = None

    def matrix(self) -> torch.Tensor:
        """``[d, d_mlp]``: the weight change, in float32."""
        return torch.outer(self.v.float(), self.u.float())

    def check_fits(self, model: nn.Module) -> None:
        """Raise naming both sides when this delta cannot edit ``model`` (block, widths, values)."""
        weight = mlp_out_weight(model, self.block)
        if self.u.shape != (weight.shape[1],) or self.v.shape != (weight.shape[0],):
            raise ArtifactMismatchError(
                f"rank-one edit has u {tuple(self.u.shape)} and v {tuple(self.v.shape)}, but block {self.block}'s MLP "
                f"output projection of {type(model).__name__} is [out, in] = {tuple(weight.shape)}: it was made for another model"
            )
        if not (torch.isfinite(self.u).all() and torch.isfinite(self.v).all()):
            raise ArtifactError("rank-one edit holds NaN or inf")

    def save(self, folder: str | Path) -> Path:
        """``edit.safetensors`` (``u``, ``v``) + ``config.json`` (the shared record, the block, the request)."""
        if self.built_for is None:
            raise ArtifactError("this rank-one edit records no model: set built_for=ModelRecord.of(model)")
        meta = ArtifactMeta("rank_one_edit", self.built_for, {}, {**self.details, "block": self.block})
        return save_artifact(folder, meta, {"u": self.u, "v": self.v})

    @classmethod
    def load(cls, src: str | Path, model: PreTrainedModel | None = None, allow_mismatch: bool = False) -> "RankOneDelta":
        """A saved edit; with ``model``, checked like every artifact (blocks, width, fingerprint) and for its block."""
        artifact = read_artifact(src, "rank_one_edit", model, allow_mismatch)
        details = dict(artifact.meta.details)
        block = details.pop("block")
        delta = cls(block, artifact.tensors["u"], artifact.tensors["v"], details, artifact.meta.model)
        if model is not None:
            delta.check_fits(model)
        return delta


class RankOneEdit(Intervention):
    """Add ``delta`` to the model's weight on enter; copy the original weight back on exit."""

    def __init__(self, model: nn.Module, delta: RankOneDelta) -> None:
        super().__init__()
        delta.check_fits(model)
        self.model, self.delta = model, delta

    @torch.no_grad()
    def apply(self) -> None:
        weight = mlp_out_weight(self.model, self.delta.block)  # [d, d_mlp] view
        original = weight.detach().clone()

        @torch.no_grad()
        def undo() -> None:
            weight.copy_(original)

        self.on_exit(undo)  # registered before the change, so a failure half-way is undone too
        weight.add_(self.delta.matrix().to(weight.device, weight.dtype))
