"""LightningModules that train small translators against a frozen base model.

``FrozenModelModule`` owns what every such run shares: the frozen model (kept out of the module
tree, so it is never checkpointed, wrapped by DDP or touched by the optimizer), the optimizer and
schedule of the published tuned-lens recipe, and per-part logging. Subclasses say what the
per-part losses are.
"""

from __future__ import annotations

import time

import lightning as L
import torch
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel
from transformers import PreTrainedModel

from lens.config import LensConfig, OnNonFinite, OptimConfig
from lens.core.metrics import lens_kl_loss
from lens.core.residuals import capture_residuals
from lens.core.translators import TunedLens, Unembed
from lens.training.guards import nonfinite_parts, should_skip


def make_optimizer(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        lr = cfg.lr_scale * (1 - cfg.momentum)  # tuned-lens: undo SGD's 1/(1-momentum) gain
        # fused: the update in place, without the two grad-sized temporaries of the foreach path
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, nesterov=True, weight_decay=cfg.weight_decay, fused=True)
    # "adam" (the schema allows no other), fused for the same reason: the for-loop update forms
    # sqrt(v) / bias correction as two temporaries the size of the whole [L, d, d] weight
    return torch.optim.AdamW(params, lr=cfg.lr_scale * 1e-3, weight_decay=cfg.weight_decay, fused=True)


def warmup_then_linear_decay(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


class FrozenModelModule(L.LightningModule):
    part_name = "part"

    def __init__(
        self, model: PreTrainedModel, trainable: nn.Module, optim: OptimConfig, on_nonfinite: OnNonFinite = "stop"
    ) -> None:
        super().__init__()
        self.trainable = trainable
        self.optim_cfg = optim
        self.on_nonfinite = on_nonfinite
        self._frozen: dict[str, nn.Module] = {"model": model, "unembed": Unembed(model)}
        self._batch_started = 0.0
        self.skipped_steps = 0

    @property
    def base_model(self) -> PreTrainedModel:
        return self._frozen["model"]  # type: ignore[return-value]

    @property
    def unembed(self) -> Unembed:
        return self._frozen["unembed"]  # type: ignore[return-value]

    def on_fit_start(self) -> None:
        self.base_model.to(self.device)

    def part_losses(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Per-part mean losses ``[K]``; the training loss is their sum."""
        raise NotImplementedError

    def _log_parts(self, stage: str, losses: torch.Tensor) -> None:
        on_step = stage == "train"
        self.log(f"{stage}/loss_mean", losses.mean(), prog_bar=True, on_step=on_step, on_epoch=not on_step, sync_dist=not on_step)
        for i, value in enumerate(losses.detach()):
            self.log(f"{stage}/{self.part_name}_{i:02d}", value, on_step=on_step, on_epoch=not on_step, sync_dist=not on_step)

    def _any_process_nonfinite(self, losses: torch.Tensor) -> bool:
        flag = torch.tensor(float(bool(nonfinite_parts(losses))), device=losses.device)
        return bool(self.trainer.strategy.reduce(flag, reduce_op="sum") > 0)

    def training_step(self, batch: tuple[torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        losses = self.part_losses(batch[0])
        if should_skip(losses, self._any_process_nonfinite(losses), self.part_name, self.global_step, self.on_nonfinite):
            self.skipped_steps += 1
            self.log("train/skipped_steps", float(self.skipped_steps), on_step=True)
            return None  # Lightning then skips backward and the optimizer update
        self._log_parts("train", losses)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], on_step=True)
        return losses.sum()

    def on_train_batch_start(self, batch: tuple[torch.Tensor], batch_idx: int) -> None:
        self._batch_started = time.perf_counter()

    def on_train_batch_end(self, outputs: object, batch: tuple[torch.Tensor], batch_idx: int) -> None:
        """Tokens per second over all processes, forward + backward + optimizer included."""
        seconds = time.perf_counter() - self._batch_started
        self.log("train/tokens_per_s", batch[0].numel() * self.trainer.world_size / seconds, on_step=True)

    def validation_step(self, batch: tuple[torch.Tensor], batch_idx: int) -> None:
        self._log_parts("val", self.part_losses(batch[0]))

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None
    ) -> None:
        """Under FSDP the gradients are sharded: only the wrapper can take their global norm."""
        if gradient_clip_val and isinstance(self.trainer.model, FullyShardedDataParallel):
            self.trainer.model.clip_grad_norm_(gradient_clip_val)
        else:
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        """Free the gradients once the update has used them. Lightning clears them only just before
        the next backward, so they would sit through the next step's forward, the step's largest
        moment, as a third of the lens' training state."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        optimizer.zero_grad(set_to_none=True)

    def configure_optimizers(self):
        cfg = self.optim_cfg
        opt = make_optimizer(self.trainable.parameters(), cfg)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: warmup_then_linear_decay(step, cfg.warmup_steps, cfg.num_steps)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class TunedLensModule(FrozenModelModule):
    """Trains a tuned lens: loss = sum over layers of KL(final distribution || lens distribution)."""

    part_name = "kl_layer"

    def __init__(
        self, model: PreTrainedModel, lens: TunedLens, lens_cfg: LensConfig, optim: OptimConfig, on_nonfinite: OnNonFinite = "stop"
    ) -> None:
        super().__init__(model, lens, optim, on_nonfinite)
        self.lens_cfg = lens_cfg

    @property
    def lens(self) -> TunedLens:
        return self.trainable  # type: ignore[return-value]

    def part_losses(self, input_ids: torch.Tensor) -> torch.Tensor:
        n, k = input_ids.numel(), self.lens_cfg.positions_per_layer
        keep = torch.randperm(n, device=input_ids.device)[:k] if k is not None and k < n else None
        # only the kept positions' residuals stay alive, and the model's own head computes nothing
        residuals, _ = capture_residuals(self.base_model, input_ids, logits=False, positions=keep)
        residuals = residuals.flatten(1, -2)  # [L+1, k, d] (already flat when positions were kept)
        # the teacher [k, V] only where the KL is taken: the model's own final norm + unembedding on its last
        # residual, handed over without a reference here, so only its probabilities stay alive
        return lens_kl_loss(
            self.lens, self.unembed, residuals, self.unembed(residuals[-1]).float().log_softmax(-1), self.lens_cfg.kl_chunk
        )
