"""Lightning training of a span translator against the frozen model it stands in for."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from lens.config import OptimConfig, SpanLoss
from lens.core.metrics import kl_to_teacher
from lens.core.residuals import capture_residuals
from lens.core.translators import SpanTranslator
from lens.interventions.surgery import LayerProgram
from lens.training.module import FrozenModelModule


class SpanTranslatorModule(FrozenModelModule):
    """One part: KL(intact final distribution || model with the span replaced), or MSE to the
    true residual after ``end`` blocks. Gradients reach the translator through the frozen blocks
    after the span (KL) or directly (MSE)."""

    part_name = "span"

    def __init__(self, model: PreTrainedModel, translator: SpanTranslator, loss: SpanLoss, optim: OptimConfig) -> None:
        super().__init__(model, translator, optim)
        self.loss = loss

    @property
    def translator(self) -> SpanTranslator:
        return self.trainable  # type: ignore[return-value]

    def part_losses(self, input_ids: torch.Tensor) -> torch.Tensor:
        model, t = self.base_model, self.translator
        if self.loss == "mse":
            residuals, _ = capture_residuals(model, input_ids, logits=False)  # [L+1, B, T, d]
            return (t(residuals[t.start].float()) - residuals[t.end].float()).pow(2).mean()[None]
        with torch.no_grad():
            teacher_logp = model(input_ids, use_cache=False).logits.float().log_softmax(-1)  # [B, T, V]
        with LayerProgram.translated(model, t):
            logits = model(input_ids, use_cache=False).logits  # [B, T, V]
        return kl_to_teacher(teacher_logp, logits).mean()[None]
