"""Translators: affine maps ``h -> h + A h + b`` on the residual stream, A and b starting at zero.

A ``TunedLens`` holds one translator per layer, stacked into one ``[L, d, d]`` weight so all
layers translate in a single batched matmul, mapping each layer's residual to something the
model's own final norm and unembedding can read; untrained, it *is* the logit lens. The final
layer (index ``L``) needs no translator. A ``SpanTranslator`` stands in for a span of blocks;
untrained, it *is* plain skipping of the span.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel

from lens.config import InputError
from lens.core.arch import get_final_norm, get_unembed, n_blocks


class Unembed(nn.Module):
    """The model's own final norm + unembedding, frozen; never saved with a lens."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.final_norm = get_final_norm(model)
        self.unembed = get_unembed(model)

    @property
    def weight(self) -> torch.Tensor:  # [V, d]
        return self.unembed.weight

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # [..., d] -> [..., V]
        return self.unembed(self.final_norm(h))


class Lens(nn.Module):
    """Interface shared by every lens: translate residuals of any layer into the final layer's space."""

    kind: str = "lens"

    def __init__(self, n_layers: int, d_model: int) -> None:
        super().__init__()
        self.n_layers = n_layers
        self.d_model = d_model
        self.origin = f"{self.kind} lens"
        """Which lens this is and how it was made, for figure titles (loaders say more)."""

    def translate_layer(self, h: torch.Tensor, layer: int) -> torch.Tensor:  # [..., d] -> [..., d]
        raise NotImplementedError

    def translate(self, residuals: torch.Tensor) -> torch.Tensor:
        """``[L+1, ..., d] -> [L+1, ..., d]``; row ``L`` passes through unchanged."""
        return torch.stack([self.translate_layer(h, i) for i, h in enumerate(residuals)])

    def check_layer(self, layer: int) -> None:
        if not 0 <= layer <= self.n_layers:
            raise IndexError(f"layer {layer} out of range: this lens reads layers 0..{self.n_layers}")


class LogitLens(Lens):
    """The identity translator: read every layer with the final norm and unembedding as they are."""

    kind = "logit"

    def translate_layer(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        self.check_layer(layer)
        return h

    def translate(self, residuals: torch.Tensor) -> torch.Tensor:
        return residuals


class TunedLens(Lens):
    """Affine translators ``h + A_l h + b_l`` for layers ``0..L-1`` (Belrose et al. 2023)."""

    kind = "tuned"

    def __init__(self, n_layers: int, d_model: int) -> None:
        super().__init__(n_layers, d_model)
        self.weight = nn.Parameter(torch.zeros(n_layers, d_model, d_model))  # A: [L, d_out, d_in]
        self.bias = nn.Parameter(torch.zeros(n_layers, d_model))  # b: [L, d]

    @classmethod
    def for_model(cls, model: PreTrainedModel) -> "TunedLens":
        return cls(n_blocks(model), model.config.hidden_size)

    def translate_layer(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        self.check_layer(layer)
        if layer == self.n_layers:
            return h
        w, b = self.weight[layer].to(h.dtype), self.bias[layer].to(h.dtype)
        return h + h @ w.T + b

    def translate(self, residuals: torch.Tensor) -> torch.Tensor:
        n_rows = residuals.shape[0]
        if n_rows != self.n_layers + 1:
            raise ValueError(f"expected {self.n_layers + 1} layers of residuals, got {n_rows}")
        inner = residuals[:-1]  # [L, ..., d]
        flat = inner.reshape(self.n_layers, -1, self.d_model)  # [L, N, d]
        w, b = self.weight.to(flat.dtype), self.bias.to(flat.dtype)
        moved = torch.baddbmm(b[:, None, :], flat, w.transpose(1, 2))  # [L, N, d]
        return torch.cat([inner + moved.reshape(inner.shape), residuals[-1:]])


def logit_lens_for(model: PreTrainedModel) -> LogitLens:
    return LogitLens(n_blocks(model), model.config.hidden_size)


def check_span(model: nn.Module, start: int, end: int) -> tuple[int, int]:
    """A span ``start..end`` maps the residual after ``start`` blocks to the one after ``end`` blocks."""
    n = n_blocks(model)
    if isinstance(start, bool) or isinstance(end, bool) or not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end <= n):
        raise InputError(f"span {start!r}..{end!r} is not valid: need 0 <= start <= end <= {n} (blocks in the model)")
    return start, end


class SpanTranslator(nn.Module):
    """``h + A h + b`` in place of blocks ``start..end-1``; zero-initialised (= plain skip)."""

    kind = "span_affine"

    def __init__(self, d_model: int, start: int, end: int) -> None:
        super().__init__()
        self.d_model, self.start, self.end = d_model, start, end
        self.weight = nn.Parameter(torch.zeros(d_model, d_model))  # A: [d_out, d_in]
        self.bias = nn.Parameter(torch.zeros(d_model))  # b: [d]

    @classmethod
    def for_span(cls, model: PreTrainedModel, start: int, end: int) -> "SpanTranslator":
        check_span(model, start, end)
        return cls(model.config.hidden_size, start, end)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # [..., d] -> [..., d]
        return h + h @ self.weight.to(h.dtype).T + self.bias.to(h.dtype)
