"""Per-token statistics of lens predictions, shared by training, evaluation and plots.

The unembedding is the expensive part (``d -> V`` for every layer and token), so everything
here works on chunks of rows and never holds ``[layers, tokens, vocab]`` at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from lens.core.translators import Lens, Unembed

DEFAULT_CHUNK = 1024
"""Rows of ``[rows, vocab]`` logits materialised at a time."""


class StreamingKL(torch.autograd.Function):
    """Sum over rows of KL(teacher || softmax(x @ W.T + bias)), with the gradient computed in forward.

    d KL / d logits = softmax(student) - teacher, so ``grad_x = (q - p) @ W`` falls out of the
    forward pass chunk by chunk; backward only rescales it. Peak memory is one ``[chunk, V]``
    block instead of ``[rows, V]`` kept alive for autograd.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: torch.Tensor,  # [N, d] normed hidden states (student)
        weight: torch.Tensor,  # [V, d] unembedding, frozen
        bias: torch.Tensor | None,  # [V]
        teacher_logp: torch.Tensor,  # [M, V] log-probs; row i of x uses teacher row i % M
        chunk: int,
    ) -> torch.Tensor:
        total = x.new_zeros((), dtype=torch.float32)
        grad = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        n_teacher = teacher_logp.shape[0]
        for start in range(0, x.shape[0], chunk):
            rows = torch.arange(start, min(start + chunk, x.shape[0]), device=x.device)
            logits = F.linear(x[rows], weight, bias).float()  # [c, V]
            log_q = logits.log_softmax(-1)
            log_p = teacher_logp[rows % n_teacher].float()
            p = log_p.exp()
            total += (p * (log_p - log_q)).sum()
            if grad is not None:
                grad[rows] = ((log_q.exp() - p).to(weight.dtype) @ weight).to(x.dtype)
        ctx.save_for_backward(grad if grad is not None else x.new_empty(0))
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        grad_x = grad * grad_out.to(grad.dtype) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None, None


def lens_kl_loss(
    lens: Lens,
    unembed: Unembed,
    residuals: torch.Tensor,  # [L+1, N, d]
    teacher_logp: torch.Tensor,  # [N, V]
    chunk: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """Per-layer mean KL(final || lens) for layers ``0..L-1``, shape ``[L]``; one backward serves all."""
    n_layers, n_tokens = residuals.shape[0] - 1, residuals.shape[1]
    translated = lens.translate(residuals)[:-1]  # [L, N, d]
    normed = unembed.final_norm(translated).reshape(n_layers * n_tokens, -1)
    w, b = unembed.unembed.weight, unembed.unembed.bias
    per_layer = [
        StreamingKL.apply(normed[i * n_tokens : (i + 1) * n_tokens], w, b, teacher_logp, chunk)
        for i in range(n_layers)
    ]
    return torch.stack(per_layer) / n_tokens


def lens_kl_loss_reference(
    lens: Lens, unembed: Unembed, residuals: torch.Tensor, teacher_logp: torch.Tensor
) -> torch.Tensor:
    """The straightforward computation (full logits per layer) the streaming path must match."""
    losses = []
    for layer in range(residuals.shape[0] - 1):
        log_q = unembed(lens.translate_layer(residuals[layer], layer)).float().log_softmax(-1)
        losses.append(F.kl_div(log_q, teacher_logp.float(), log_target=True, reduction="batchmean"))
    return torch.stack(losses)


NO_TARGET = -100
"""Target id of positions with no next token (the last of each sequence)."""


def next_token_targets(ids: torch.Tensor) -> torch.Tensor:
    """``[..., T] -> [..., T]``: the token each position predicts, ``NO_TARGET`` at the last one."""
    return torch.cat([ids[..., 1:], torch.full_like(ids[..., :1], NO_TARGET)], dim=-1)


@dataclass
class Reading:
    """What one pass of the frozen model gives a lens to read, at ``N`` positions."""

    residuals: torch.Tensor  # [L+1, N, d]: row l is the residual after l blocks
    final_logits: torch.Tensor  # [N, V]: the model's own output
    targets: torch.Tensor | None = None  # [N]: the next token at each position, NO_TARGET where there is none

    def positions(self, index: torch.Tensor | slice) -> "Reading":
        """The same reading at a subset of positions."""
        targets = None if self.targets is None else self.targets[index]
        return Reading(self.residuals[:, index], self.final_logits[index], targets)

    @classmethod
    def scored(cls, residuals: torch.Tensor, logits: torch.Tensor, ids: torch.Tensor) -> "Reading":
        """One batch's reading (residuals ``[R, b, T, d]``, logits ``[b, T, V]``, ids ``[b, T]``) in
        float32, at the positions that have a next token to score."""
        targets = next_token_targets(ids).flatten()  # [b*T]
        return cls(residuals.flatten(1, 2).float(), logits.flatten(0, 1).float(), targets).positions(targets >= 0)

    @classmethod
    def cat(cls, parts: "list[Reading]") -> "Reading":
        """Readings of several batches as one, positions in order."""
        targets = None if parts[0].targets is None else torch.cat([p.targets for p in parts])  # type: ignore[misc]
        return cls(torch.cat([p.residuals for p in parts], dim=1), torch.cat([p.final_logits for p in parts]), targets)


@torch.no_grad()
def lens_token_stats(
    lens: Lens, unembed: Unembed, reading: Reading, top_k: int = 1, chunk: int = DEFAULT_CHUNK, layers: Sequence[int] | None = None
) -> dict[str, torch.Tensor]:
    """Per row x token: CE vs the reading's targets, KL to the final layer, entropy, top-k ids and probs.

    Row ``r`` of the residuals is read with the lens' translator for layer ``layers[r]`` (default:
    ``r``; a layer program's rows stand for other layers, see ``lens.analysis.picture.program_rows``).
    All arrays are ``[R, N]`` (top-k: ``[R, N, k]``), in nats; CE and target ranks only when the
    reading has targets. When the last row is read as the final layer ``L``, it is read from
    ``final_logits``: every lens reads the last layer as the model does, so that row *is* the
    model's output (KL exactly 0, CE the model's own loss), not a re-computation that differs from
    it in the last bits.
    """
    residuals, final_logits, targets = reading.residuals, reading.final_logits, reading.targets
    n_rows, n_tokens = residuals.shape[0], residuals.shape[1]
    layers = list(range(n_rows)) if layers is None else list(layers)
    if len(layers) != n_rows:
        raise ValueError(f"{n_rows} rows of residuals but {len(layers)} layers to read them as")
    output_row = n_rows - 1 if layers[-1] == lens.n_layers else None
    out: dict[str, torch.Tensor] = {
        name: torch.empty(n_rows, n_tokens) for name in ("kl", "entropy", "ce", "target_rank")
    }
    out["top_ids"] = torch.empty(n_rows, n_tokens, top_k, dtype=torch.long)
    out["top_probs"] = torch.empty(n_rows, n_tokens, top_k)
    for start in range(0, n_tokens, chunk):
        sl = slice(start, start + chunk)
        log_p = final_logits[sl].float().log_softmax(-1)  # [c, V]
        tgt = targets[sl] if targets is not None else None
        for layer in range(n_rows):
            if layer == output_row:
                log_q = log_p
            else:
                log_q = unembed(lens.translate_layer(residuals[layer, sl], layers[layer])).float().log_softmax(-1)  # [c, V]
            q = log_q.exp()
            # a KL is >= 0; rounding leaves a hair below 0 where lens and model nearly agree
            out["kl"][layer, sl] = (log_p.exp() * (log_p - log_q)).sum(-1).clamp(min=0.0)
            out["entropy"][layer, sl] = -(q * log_q).sum(-1)
            probs, ids = q.topk(top_k, dim=-1)
            out["top_ids"][layer, sl], out["top_probs"][layer, sl] = ids, probs
            if tgt is not None:
                valid = tgt >= 0
                safe = tgt.clamp(min=0)
                tgt_logq = log_q.gather(-1, safe[:, None])[:, 0]
                out["ce"][layer, sl] = torch.where(valid, -tgt_logq, torch.nan)
                rank = (log_q > tgt_logq[:, None]).sum(-1).float()
                out["target_rank"][layer, sl] = torch.where(valid, rank, torch.nan)
    if targets is None:
        del out["ce"], out["target_rank"]
    return out


def kl_to_teacher(teacher_logp: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per-token KL(teacher || softmax(logits)) in nats: ``[..., V], [..., V] -> [...]``."""
    log_q = logits.float().log_softmax(-1)
    return (teacher_logp.exp() * (teacher_logp - log_q)).sum(-1)


def next_token_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Log-prob of every actual next token: ``[..., T, V], [..., T] -> [..., T-1]``. The log-softmax
    over the vocabulary is the one ``lens_token_stats`` takes, so a model's own loss computed here
    and its output row read there agree to the bit."""
    return logits[..., :-1, :].float().log_softmax(-1).gather(-1, ids[..., 1:, None])[..., 0]


def next_token_ce(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy against the next token: ``[B, T, V], [B, T] -> [B, T-1]``."""
    return -next_token_logprobs(logits, ids)


def nats_to_bits(x: torch.Tensor | float) -> torch.Tensor | float:
    return x / math.log(2)
