"""Closed-form start for tuned lenses: per-layer ridge regression onto the final residual.

One pass over data accumulates ``X^T X`` and ``X^T Y`` with ``X = [h_l, 1]`` and ``Y = h_L`` (the
last block's raw output, which the final norm + unembedding read). Solving gives the affine map
that best predicts the final residual in least squares: no vocabulary-sized work at all, so it is
cheap next to KL steps, and KL fine-tuning starts from there instead of from the identity.
"""

from __future__ import annotations

import torch

from lens.translators import TunedLens


class RidgeStats:
    """Running ``[L, d+1, d+1]`` Gram and ``[L, d+1, d]`` cross-moment matrices, in float64."""

    def __init__(self, n_layers: int, d_model: int) -> None:
        self.xtx = torch.zeros(n_layers, d_model + 1, d_model + 1, dtype=torch.float64)
        self.xty = torch.zeros(n_layers, d_model + 1, d_model, dtype=torch.float64)
        self.count = 0

    def update(self, residuals: torch.Tensor) -> None:
        """``residuals``: ``[L+1, N, d]``; rows ``0..L-1`` are inputs, row ``L`` the target."""
        x = residuals[:-1].double()  # [L, N, d]
        x = torch.cat([x, torch.ones_like(x[..., :1])], dim=-1)  # [L, N, d+1]
        y = residuals[-1].double()  # [N, d]
        self.xtx += x.transpose(1, 2) @ x
        self.xty += x.transpose(1, 2) @ y
        self.count += y.shape[0]

    def solve(self, ridge: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(A, b)`` of ``h + A h + b``: ``[L, d, d]`` and ``[L, d]``.

        The ridge is relative to the mean diagonal of each layer's Gram matrix so one value
        works across layers whose residual norms differ by orders of magnitude. The bias
        column is not penalised.
        """
        if self.count == 0:
            raise ValueError("no data accumulated: call update() with residuals first")
        d = self.xtx.shape[-1] - 1
        scale = self.xtx.diagonal(dim1=1, dim2=2)[:, :d].mean(-1)  # [L]
        penalty = torch.zeros_like(self.xtx)
        penalty[:, range(d), range(d)] = 1.0
        lhs = self.xtx + ridge * scale[:, None, None] * penalty
        coef = torch.linalg.solve(lhs, self.xty)  # [L, d+1, d]: y = x @ coef
        linear, bias = coef[:, :d, :], coef[:, d, :]
        eye = torch.eye(d, dtype=coef.dtype)
        return (linear.transpose(1, 2) - eye).float(), bias.float()

    def apply_to(self, lens: TunedLens, ridge: float = 1e-3) -> None:
        weight, bias = self.solve(ridge)
        with torch.no_grad():
            lens.weight.copy_(weight)
            lens.bias.copy_(bias)
