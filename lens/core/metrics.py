"""Per-token statistics of lens predictions, shared by training, evaluation and plots.

The unembedding is the expensive part (``d -> V`` for every layer and token), so everything
here works on chunks of rows and never holds ``[layers, tokens, vocab]`` at once.
"""

from __future__ import annotations

import math
import warnings
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
    block (plus the teacher) instead of ``[rows, V]`` kept alive for autograd. The teacher comes as
    probabilities ``p`` and ``sum p log p`` per row, computed once for all layers (``teacher_terms``).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: torch.Tensor,  # [N, d] normed hidden states (student)
        weight: torch.Tensor,  # [V, d] unembedding, frozen
        bias: torch.Tensor | None,  # [V]
        teacher_p: torch.Tensor,  # [M, V] probabilities; row i of x uses teacher row i % M
        teacher_p_log_p: torch.Tensor,  # [M]: sum_v p log p of each teacher row
        chunk: int,
    ) -> torch.Tensor:
        total = x.new_zeros((), dtype=torch.float32)
        grad = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        n_teacher = teacher_p.shape[0]
        for start in range(0, x.shape[0], chunk):
            stop = min(start + chunk, x.shape[0])
            first = start % n_teacher
            rows = slice(first, first + stop - start) if first + stop - start <= n_teacher else torch.arange(start, stop) % n_teacher
            p = teacher_p[rows]  # a view unless the chunk wraps around the teacher
            log_q = F.linear(x[start:stop], weight, bias).float().log_softmax(-1)  # [c, V]
            total += teacher_p_log_p[rows].sum() - batched_dot(p, log_q).sum()  # no [c, V] products
            if grad is not None:
                grad[start:stop] = (log_q.exp_().sub_(p).to(weight.dtype) @ weight).to(x.dtype)  # q - p, in place
        ctx.save_for_backward(grad if grad is not None else x.new_empty(0))
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        grad_x = grad * grad_out.to(grad.dtype) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None, None, None


def teacher_terms(teacher_logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[M, V]`` log-probs -> probabilities ``[M, V]`` and ``sum p log p`` ``[M]`` (float32)."""
    log_p = teacher_logp.float()
    p = log_p.exp()
    return p, batched_dot(p, log_p)


def lens_kl_loss(
    lens: Lens,
    unembed: Unembed,
    residuals: torch.Tensor,  # [L+1, N, d]
    teacher_logp: torch.Tensor,  # [N, V]
    chunk: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """Per-layer mean KL(final || lens) for layers ``0..L-1``, shape ``[L]``; one backward serves all.
    Pass ``teacher_logp`` without keeping a reference, and only its probabilities stay alive."""
    teacher_p, teacher_p_log_p = teacher_terms(teacher_logp)
    del teacher_logp
    n_layers, n_tokens = residuals.shape[0] - 1, residuals.shape[1]
    translated = lens.translate(residuals)[:-1]  # [L, N, d]
    normed = unembed.final_norm(translated).reshape(n_layers * n_tokens, -1)
    w, b = unembed.unembed.weight, unembed.unembed.bias
    per_layer = [
        StreamingKL.apply(normed[i * n_tokens : (i + 1) * n_tokens], w, b, teacher_p, teacher_p_log_p, chunk)
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


def _row_stats(z: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    z = z.float()  # [c, V]
    top = z.amax(-1, keepdim=True)  # [c, 1]
    shifted = z - top
    e = shifted.exp()
    total = e.sum(-1)
    log_total = total.log()
    # entropy = lse - E_q[z] = log(total) - E_q[z - top]: no cancellation between two large numbers
    return top[:, 0] + log_total, z.gather(-1, target)[:, 0], log_total - (e * shifted).sum(-1) / total


_compiled_row_stats = None


def row_stats(z: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of logits ``[c, V]`` (any float dtype) and targets ``[c, 1]``: logsumexp, the target's
    logit and the entropy of the softmax, float32 ``[c]`` each.

    Compiled (``torch.compile``), this is two passes over ``z``, the row maximum and then one loop
    that exponentiates and sums both reductions, where an eager log-softmax, exp and dot product
    each read the vocabulary-sized block again (and two of them write one): 5x less time on this
    CPU, most of an evaluation's time after the logits themselves (docs/performance.md). Where
    compiling fails (no C++ compiler), it warns once and runs eagerly.
    """
    global _compiled_row_stats
    if _compiled_row_stats is None:
        _compiled_row_stats = torch.compile(_row_stats, dynamic=True)
    if _compiled_row_stats is not _row_stats:
        try:
            return _compiled_row_stats(z, target)
        except Exception as err:  # the compiler's own error types vary by backend and version
            warnings.warn(f"torch.compile failed ({type(err).__name__}: {err}); evaluation runs uncompiled, slower")
            _compiled_row_stats = _row_stats
    return _row_stats(z, target)


@torch.no_grad()
def lens_layer_stats(
    lens: Lens,
    unembed: Unembed,
    reading: Reading,
    chunk: int = DEFAULT_CHUNK,
    entropy: bool = True,
    matmul_dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Per layer x token cross-entropy, KL(final || lens) and entropy ``[L+1, N]`` in nats: what a
    held-out evaluation averages, with as few passes over each ``[chunk, V]`` block of logits as
    they allow.

    ``KL = sum p log p - sum p z + logsumexp(z)`` for lens logits ``z = W x + b``, and
    ``sum_v p_v z_v = (p W) . x + p . b``: the teacher's side is one ``[c, V] @ [V, d]`` product per
    chunk shared by every layer, so a layer's KL, CE and entropy cost its logits and ``row_stats``' two
    passes over them. ``lens_token_stats`` (ranks,
    top-k, any reading) gives the same numbers to float rounding. The reading needs targets, and its
    last row is the final layer (read from ``final_logits``, so KL is exactly 0 there).
    ``entropy=False`` leaves the entropy out; ``matmul_dtype=torch.bfloat16`` computes the lens
    logits from bf16 inputs (3.6x the float32 matmul on a CPU with AMX; its error on the mean
    statistics is measured in docs/learning_curves.md).
    """
    residuals, final_logits, targets = reading.residuals, reading.final_logits, reading.targets
    if targets is None:
        raise ValueError("lens_layer_stats scores next tokens: the reading needs targets")
    n_rows, n_tokens = residuals.shape[0], residuals.shape[1]
    out = {name: torch.empty(n_rows, n_tokens) for name in ("ce", "kl", "entropy")[: 3 if entropy else 2]}
    weight, bias = unembed.unembed.weight, unembed.unembed.bias  # [V, d], [V] or None
    dtype = matmul_dtype or weight.dtype
    weight, bias = weight.to(dtype), bias.to(dtype) if bias is not None else None
    for start in range(0, n_tokens, chunk):
        sl = slice(start, start + chunk)
        valid = targets[sl] >= 0
        tgt = targets[sl].clamp(min=0)[:, None]  # [c, 1]
        final = final_logits[sl].float()  # [c, V]
        final_lse, final_target, final_entropy = row_stats(final, tgt)  # the model's own prediction
        p = (final - final_lse[:, None]).exp_()  # [c, V]
        p_log_p = -final_entropy
        p_weight = p @ weight.float()  # [c, d]
        p_bias = p @ bias.float() if bias is not None else 0.0
        for row in range(n_rows - 1):
            x = unembed.final_norm(lens.translate_layer(residuals[row, sl], row)).to(dtype)  # [c, d]
            lse, target_logit, lens_entropy = row_stats(F.linear(x, weight, bias), tgt)  # [c] each
            out["ce"][row, sl] = torch.where(valid, lse - target_logit, torch.nan)
            # a KL is >= 0; rounding leaves a hair below 0 where lens and model nearly agree
            out["kl"][row, sl] = (p_log_p - (x.float() * p_weight).sum(-1) - p_bias + lse).clamp(min=0.0)
            if entropy:
                out["entropy"][row, sl] = lens_entropy
        out["ce"][-1, sl] = torch.where(valid, final_lse - final_target, torch.nan)
        out["kl"][-1, sl] = 0.0
        if entropy:
            out["entropy"][-1, sl] = final_entropy
    return out


def batched_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot products ``[c, V], [c, V] -> [c]`` without an elementwise-product temporary."""
    return torch.bmm(a[:, None, :], b[:, :, None])[:, 0, 0]


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
