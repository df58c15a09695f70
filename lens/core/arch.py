"""The one place that knows where each architecture keeps its blocks, final norm and unembedding.

Everything else asks this table, so adding an architecture is one line here, never an
``isinstance`` ladder elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lens.config import LensError


@dataclass(frozen=True)
class ArchSpec:
    """Attribute paths, relative to the ``*ForCausalLM`` module, for one architecture."""

    blocks: str
    """The ``nn.ModuleList`` of transformer blocks, applied in order."""
    final_norm: str
    """The norm applied to the last block's output before the unembedding."""
    unembed: str
    """The linear map from the hidden size to the vocabulary; ``a|b`` lists names used by
    different transformers versions, first match wins."""
    attention: str
    """Inside a block: the attention module, whose output the block adds to the residual."""
    mlp: str
    """Inside a block: the MLP module, whose output the block adds to the residual."""
    attention_out: str
    """Inside a block: the attention's output projection; its input is the heads' outputs side by
    side (``[B, T, heads * head_dim]``), which function vectors read one head at a time."""
    mlp_out: str
    """Inside a block: the MLP's output projection; its input is the MLP key ROME edits for."""


_LLAMA_LIKE = ArchSpec(
    blocks="model.layers", final_norm="model.norm", unembed="lm_head", attention="self_attn", mlp="mlp",
    attention_out="self_attn.o_proj", mlp_out="mlp.down_proj",
)

ARCHITECTURES: dict[str, ArchSpec] = {
    "gpt2": ArchSpec(
        blocks="transformer.h", final_norm="transformer.ln_f", unembed="lm_head", attention="attn", mlp="mlp",
        attention_out="attn.c_proj", mlp_out="mlp.c_proj",
    ),
    "gpt_neox": ArchSpec(
        blocks="gpt_neox.layers", final_norm="gpt_neox.final_layer_norm", unembed="lm_head|embed_out", attention="attention", mlp="mlp",
        attention_out="attention.dense", mlp_out="mlp.dense_4h_to_h",
    ),
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "phi3": _LLAMA_LIKE,
    "olmo": _LLAMA_LIKE,
}


def _get_path(root: nn.Module, path: str) -> nn.Module:
    *alternatives, last = path.split("|")
    for candidate in alternatives:
        if hasattr(root, candidate):
            return getattr(root, candidate)
    module = root
    for part in last.split("."):
        module = getattr(module, part)
    return module


class UnsupportedArchitecture(LensError, NotImplementedError):
    """A model whose ``config.model_type`` has no entry in ``ARCHITECTURES``."""


def spec_for(model_type: str | None, what: str) -> ArchSpec:
    """The table entry for ``model_type`` (``what`` names the model in the error), checkable from a
    config alone, before any weights load."""
    if model_type not in ARCHITECTURES:
        raise UnsupportedArchitecture(
            f"lens cannot map {what} (config.model_type={model_type!r}); "
            f"supported model types: {sorted(ARCHITECTURES)}. Add an ArchSpec for it in lens/core/arch.py."
        )
    return ARCHITECTURES[model_type]


def arch_spec(model: nn.Module) -> ArchSpec:
    """Look up the table entry for a Hugging Face causal LM, or say clearly why there is none."""
    return spec_for(getattr(getattr(model, "config", None), "model_type", None), type(model).__name__)


def get_blocks(model: nn.Module) -> nn.ModuleList:
    return _get_path(model, arch_spec(model).blocks)  # type: ignore[return-value]


def n_blocks(model: nn.Module) -> int:
    """Transformer blocks the model runs (a layer program changes it while active)."""
    return len(get_blocks(model))


def get_component(model: nn.Module, block: int, part: str) -> nn.Module:
    """``part`` (``attention``, ``mlp``, ``attention_out`` or ``mlp_out``) of block ``block``."""
    return _get_path(get_blocks(model)[block], getattr(arch_spec(model), part))


def get_final_norm(model: nn.Module) -> nn.Module:
    return _get_path(model, arch_spec(model).final_norm)


def get_unembed(model: nn.Module) -> nn.Linear:
    return _get_path(model, arch_spec(model).unembed)  # type: ignore[return-value]


def set_blocks(model: nn.Module, blocks: nn.ModuleList) -> None:
    """Swap the block list (used by layer surgery, which restores the original afterwards)."""
    parent_path, _, name = arch_spec(model).blocks.rpartition(".")
    setattr(_get_path(model, parent_path), name, blocks)
