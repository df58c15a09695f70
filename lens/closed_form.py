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
        n_layers, n_tokens, d = residuals[:-1].shape
        x = torch.ones(n_layers, n_tokens, d + 1, dtype=torch.float64)  # [L, N, d+1]: [h, 1]
        x[..., :d] = residuals[:-1]
        y = residuals[-1].double()  # [N, d]
        self.xtx.baddbmm_(x.transpose(1, 2), x)  # in place: no second [L, d+1, d+1] buffer
        self.xty.baddbmm_(x.transpose(1, 2), y.expand(x.shape[0], -1, -1))
        self.count += y.shape[0]

    def solve(self, ridge: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(A, b)`` of ``h + A h + b``: ``[L, d, d]`` and ``[L, d]``.

        The ridge is relative to the mean diagonal of each layer's Gram matrix so one value
        works across layers whose residual norms differ by orders of magnitude. The bias
        column is not penalised.
        """
        if self.count == 0:
            raise ValueError("no data accumulated: call update() with residuals first")
        n_layers, d = self.xty.shape[0], self.xty.shape[-1]
        weight, bias = torch.empty(n_layers, d, d), torch.empty(n_layers, d)
        eye = torch.eye(d, dtype=self.xtx.dtype)
        for layer in range(n_layers):  # one layer at a time: no [L, d+1, d+1] temporaries
            lhs = self.xtx[layer].clone()
            diag = lhs.diagonal()[:d]
            diag += ridge * diag.mean()
            coef = torch.linalg.solve(lhs, self.xty[layer])  # [d+1, d]: y = x @ coef
            weight[layer], bias[layer] = coef[:d].T - eye, coef[d]
        return weight, bias

    def apply_to(self, lens: TunedLens, ridge: float = 1e-3) -> None:
        weight, bias = self.solve(ridge)
        with torch.no_grad():
            lens.weight.copy_(weight)
            lens.bias.copy_(bias)
