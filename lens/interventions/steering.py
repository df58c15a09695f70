"""Activation steering: add an offset to the residual stream entering one block.

Two ways to build the offset: ActAdd (Turner et al. 2023), the difference of the residuals of a
prompt pair, added position by position to the first ``k`` tokens; and a steering vector, one
``[d]`` direction from contrast sets, added at every position from ``min_token_index`` on.

Offsets are keyed on *absolute* token positions (the ``position_ids`` every block receives), so
a cached decode step at position ``p`` gets exactly what a full re-run gives position ``p``: for
ActAdd nothing once ``p >= k``, i.e. decode steps are not steered again. The offset is added to
the residual after ``layer`` blocks (valid layers ``0..n_layers``): a pre-hook on block 0 for
layer 0, else a hook on the output of block ``layer-1``, placed before any other hook so that
``record_residuals`` sees the steered residual at index ``layer``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lens.artifacts.metadata import ArtifactError, ArtifactMeta, ModelRecord
from lens.artifacts.registry import read_artifact, save_artifact
from lens.config import InputError
from lens.core.arch import get_blocks, n_blocks
from lens.core.residuals import block_hidden, block_input, capture_residuals
from lens.interventions.base import Intervention, check_coefficient, check_injection_layer


class ResidualAdd(Intervention):
    """Add ``rows[p - start]`` to the residual after ``layer`` blocks at positions
    ``start <= p < start + k``, and ``tail`` at positions after them.

    ``rows``: ``[k, d]`` (``k`` may be 0); ``tail``: ``[d]`` or None (nothing after the rows).
    """

    def __init__(
        self, model: nn.Module, layer: int, rows: torch.Tensor | None = None, tail: torch.Tensor | None = None, start: int = 0
    ) -> None:
        super().__init__()
        self.model = model
        self.layer = check_injection_layer(model, layer)
        self.rows, self.tail, self.start = rows, tail, start

    def offsets(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(rows [k, d], tail [d] or None)``; subclasses that need a model run compute them here."""
        d = self.model.config.hidden_size
        return (self.rows if self.rows is not None else torch.zeros(0, d)), self.tail

    def apply(self) -> None:
        rows, tail = self.offsets()
        k, d = rows.shape
        zero = rows.new_zeros(1, d)
        # row 0: before start (nothing); rows 1..k: the steering rows; row k+1: after them
        table = torch.cat([zero, rows, zero if tail is None else tail.to(rows)[None]])  # [k+2, d]
        start = self.start

        def shifted(hidden: torch.Tensor, positions: torch.Tensor | None, module: nn.Module) -> torch.Tensor:
            if positions is None:  # [B or 1, T]
                raise RuntimeError(
                    f"{type(module).__name__} was called without position_ids; steering needs absolute "
                    "positions to stay consistent between cached and uncached generation"
                )
            index = (positions.to(hidden.device) - start + 1).clamp(0, k + 1)  # [B or 1, T]
            return hidden + table.to(device=hidden.device, dtype=hidden.dtype)[index]  # [B, T, d]

        def before_first(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            hidden = shifted(block_input(args, kwargs), kwargs.get("position_ids"), module)
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        def after(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor | tuple) -> torch.Tensor | tuple:
            hidden = shifted(block_hidden(output), kwargs.get("position_ids"), module)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        # prepend: other hooks (record_residuals) then see the steered residual at index `layer`
        blocks = get_blocks(self.model)
        if self.layer == 0:
            handle = blocks[0].register_forward_pre_hook(before_first, with_kwargs=True, prepend=True)
        else:
            handle = blocks[self.layer - 1].register_forward_hook(after, with_kwargs=True, prepend=True)
        self.on_exit(handle.remove)


def space_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """ActAdd pads the shorter prompt with a space token, or the pad token if a space is not one token."""
    space = tokenizer.encode(" ", add_special_tokens=False)
    if len(space) == 1:
        return space[0]
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has neither a single-token space nor a pad token to pad prompts with")
    return tokenizer.pad_token_id


def encode(tokenizer: PreTrainedTokenizerBase, text: str, prepend_bos: bool = False, add_special_tokens: bool = True) -> list[int]:
    """Token ids of ``text``; with ``prepend_bos``, the tokenizer's BOS first (as the published ActAdd
    runs on GPT-2 do), so position 0 holds the same token in every prompt and every steered text."""
    ids = tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
    return [bos_id(tokenizer), *ids] if prepend_bos else ids


def bos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The tokenizer's BOS id, or an error saying how to do without one."""
    if tokenizer.bos_token_id is None:
        raise InputError(f"{type(tokenizer).__name__} has no BOS token to prepend: set steering.prepend_bos=false")
    return tokenizer.bos_token_id


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str, add_special_tokens: bool = True, prepend_bos: bool = False) -> list[int]:
    """Tokenize like the steered text (same BOS handling); reject prompts with no real token."""
    if not isinstance(prompt, str) or prompt == "":
        raise ValueError(f"empty prompt {prompt!r}: every steering prompt needs at least one character of text")
    ids = encode(tokenizer, prompt, prepend_bos, add_special_tokens)
    special = set(tokenizer.all_special_ids)
    if not any(i not in special for i in ids):
        raise ValueError(f"prompt {prompt!r} tokenizes to nothing but special tokens ({ids}); give real text")
    return ids


@torch.no_grad()
def actadd_tensor(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[tuple[str, str]],
    layer: int,
    coefficient: float,
    add_special_tokens: bool = True,
    prepend_bos: bool = False,
) -> torch.Tensor:
    """Sum over pairs of ``coefficient * (h_plus - h_minus)`` at ``layer``: ``[k, d]``, k = longest prompt.
    With ``prepend_bos`` row 0 is BOS - BOS: zero, so position 0 (the attention sink) is not steered."""
    check_injection_layer(model, layer)
    coefficient = check_coefficient(coefficient)
    pad = space_token_id(tokenizer)
    diffs = []
    for plus, minus in pairs:
        ids = [prompt_ids(tokenizer, p, add_special_tokens, prepend_bos) for p in (plus, minus)]
        length = max(map(len, ids))
        batch = torch.tensor([seq + [pad] * (length - len(seq)) for seq in ids], device=model.device)  # [2, k]
        residuals, _ = capture_residuals(model, batch, logits=False)  # [L+1, 2, k, d]
        h = residuals[layer].float()  # [2, k, d]
        diffs.append(coefficient * (h[0] - h[1]))  # [k, d]
    k = max(diff.shape[0] for diff in diffs)
    total = diffs[0].new_zeros(k, diffs[0].shape[1])
    for diff in diffs:
        total[: diff.shape[0]] += diff
    return total  # [k, d]


class ActAdd(ResidualAdd):
    """Prompt-pair steering; the steering tensor is computed on entry (``self.steering``: ``[k, d]``)."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        pairs: Sequence[tuple[str, str]],
        layer: int,
        coefficient: float = 1.0,
        add_special_tokens: bool = True,
        prepend_bos: bool = False,
    ) -> None:
        super().__init__(model, layer)
        self.coefficient = check_coefficient(coefficient)
        if not pairs:
            raise ValueError("ActAdd needs at least one (plus, minus) prompt pair")
        for pair in pairs:
            if len(pair) != 2:
                raise ValueError(f"each ActAdd pair is (plus_prompt, minus_prompt), got {pair!r}")
            for prompt in pair:
                prompt_ids(tokenizer, prompt, add_special_tokens, prepend_bos)  # fail now, before anything is hooked
        self.tokenizer, self.pairs, self.add_special_tokens = tokenizer, list(pairs), add_special_tokens
        self.prepend_bos = prepend_bos
        self.steering: torch.Tensor | None = None

    def offsets(self) -> tuple[torch.Tensor, None]:
        self.steering = actadd_tensor(
            self.model, self.tokenizer, self.pairs, self.layer, self.coefficient, self.add_special_tokens, self.prepend_bos
        )
        return self.steering, None


@dataclass
class SteeringVector:
    """A ``[d]`` direction added, times ``coefficient``, at every position ``>= min_token_index``."""

    vector: torch.Tensor  # [d]
    layer: int
    coefficient: float = 1.0
    min_token_index: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)
    """How it was built: method, token index, prompts."""
    built_for: ModelRecord | None = None
    """The model it was read from (name, blocks, width, unembedding fingerprint); saved with it."""

    def check_fits(self, model: PreTrainedModel) -> None:
        """Raise naming both sides when this vector cannot steer ``model`` (width, blocks, layer, values);
        the fingerprint is checked when a saved vector is loaded for a model."""
        d = model.config.hidden_size
        if self.vector.ndim != 1 or self.vector.shape[0] != d:
            raise ValueError(
                f"steering vector has shape {tuple(self.vector.shape)}, but {type(model).__name__} "
                f"needs a vector of width {d} (its hidden size)"
            )
        if self.built_for is not None and self.built_for.num_layers != n_blocks(model):
            raise ValueError(
                f"steering vector was built for {self.built_for.base_model}, a {self.built_for.num_layers}-block model; "
                f"this one has {n_blocks(model)}"
            )
        check_injection_layer(model, self.layer)
        if self.min_token_index < 0:
            raise ValueError(f"min_token_index {self.min_token_index} must be >= 0 (an absolute token position)")
        if not torch.isfinite(self.vector).all():
            raise ValueError("steering vector holds NaN or inf")
        check_coefficient(self.coefficient)

    def applied(self, model: PreTrainedModel) -> ResidualAdd:
        self.check_fits(model)
        tail = self.coefficient * self.vector.float()
        return ResidualAdd(model, self.layer, tail=tail, start=self.min_token_index)

    @classmethod
    @torch.no_grad()
    def from_contrast(
        cls,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        positives: Sequence[str],
        negatives: Sequence[str],
        layer: int,
        token_index: int = -1,
        method: str = "mean",
        add_special_tokens: bool = True,
    ) -> "SteeringVector":
        """Mean difference of positive and negative residuals at ``token_index`` (``mean``), or the
        first principal component of the paired differences (``pca``), scaled to the mean
        difference's projection onto it so sign and size are comparable to ``mean``."""
        check_injection_layer(model, layer)
        if not positives or not negatives:
            raise ValueError(f"contrast sets must be non-empty, got {len(positives)} positives, {len(negatives)} negatives")

        def read(prompt: str) -> torch.Tensor:  # [d]
            ids = prompt_ids(tokenizer, prompt, add_special_tokens)
            if not -len(ids) <= token_index < len(ids):
                raise ValueError(
                    f"token_index {token_index} out of range for prompt {prompt!r} ({len(ids)} tokens): "
                    f"valid {-len(ids)}..{len(ids) - 1}"
                )
            residuals, _ = capture_residuals(model, torch.tensor([ids], device=model.device), logits=False)
            return residuals[layer, 0, token_index].float().cpu()

        pos = torch.stack([read(p) for p in positives])  # [P, d]
        neg = torch.stack([read(p) for p in negatives])  # [N, d]
        if method == "mean":
            vector = pos.mean(0) - neg.mean(0)
        elif method == "pca":
            if len(pos) != len(neg) or len(pos) < 2:
                raise ValueError(
                    f"method 'pca' pairs positives with negatives: needs equal counts of at least 2, "
                    f"got {len(pos)} and {len(neg)}"
                )
            diffs = pos - neg  # [P, d]
            _, _, vh = torch.linalg.svd(diffs - diffs.mean(0), full_matrices=False)
            pc = vh[0]  # [d], unit norm
            vector = pc * (diffs.mean(0) @ pc)
        else:
            raise ValueError(f"method must be 'mean' or 'pca', got {method!r}")
        metadata = {"method": method, "token_index": token_index, "positives": list(positives), "negatives": list(negatives)}
        return cls(vector, layer, metadata=metadata, built_for=ModelRecord.of(model))

    def save(self, folder: str | Path) -> Path:
        """``vector.safetensors`` + ``config.json`` (the shared artifact record) in ``folder``."""
        if self.built_for is None:
            raise ArtifactError("this steering vector records no model: build it with from_contrast, or set built_for=ModelRecord.of(model)")
        details = {**self.metadata, "layer": self.layer, "coefficient": self.coefficient, "min_token_index": self.min_token_index}
        return save_artifact(folder, ArtifactMeta("steering_vector", self.built_for, {}, details), {"vector": self.vector})

    @classmethod
    def load(cls, src: str | Path, model: PreTrainedModel | None = None, allow_mismatch: bool = False) -> "SteeringVector":
        """A saved vector; with ``model``, checked like every artifact (blocks, width, fingerprint) and for its layer."""
        artifact = read_artifact(src, "steering_vector", model, allow_mismatch)
        details = dict(artifact.meta.details)
        layer, coefficient, start = details.pop("layer"), details.pop("coefficient"), details.pop("min_token_index")
        steering = cls(artifact.tensors["vector"], layer, coefficient, start, details, artifact.meta.model)
        if model is not None:
            steering.check_fits(model)
        return steering
