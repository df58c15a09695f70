"""The one metadata record every saved artifact carries (``config.json`` next to its safetensors).

Tuned lenses, span translators and steering vectors share it: what kind of thing it is, the shapes
of its tensors, the model it was made for (name, block count, width, unembedding fingerprint),
the format version, the training config and the library versions. Loading checks all of it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from typing import Any, Literal, get_args

import torch
from transformers import PreTrainedModel

from lens.config import LensError
from lens.core.arch import get_unembed, n_blocks
from lens.core.model import model_id

Kind = Literal["tuned_lens", "span_translator", "steering_vector", "rank_one_edit"]
KINDS: tuple[str, ...] = get_args(Kind)
CONFIG = "config.json"
WEIGHTS: dict[str, str] = {
    "tuned_lens": "lens.safetensors",
    "span_translator": "translator.safetensors",
    "steering_vector": "vector.safetensors",
    "rank_one_edit": "edit.safetensors",
}
"""The safetensors file of each kind, next to ``config.json``."""
FORMAT_VERSION = 2
LIBRARIES = ("lens", "torch", "transformers", "safetensors", "lightning")


class ArtifactError(LensError, ValueError):
    """A saved artifact that is missing parts, corrupt, or of another kind than asked for."""


class ArtifactMismatchError(ArtifactError):
    """An artifact made for another model (other shape, or other unembedding fingerprint)."""


class ArtifactNotFoundError(LensError, FileNotFoundError):
    """Neither a local artifact folder nor a hub lens that could be fetched."""


def unembed_fingerprint(weight: torch.Tensor) -> str:
    """SHA-256 of the shape and every float32 byte: a summary hash misses models that share corners."""
    data = weight.detach().to("cpu", torch.float32).contiguous()
    digest = hashlib.sha256(("x".join(map(str, data.shape)) + ";float32;").encode())
    digest.update(data.numpy().tobytes())  # little-endian on every platform torch supports
    return digest.hexdigest()


def model_fingerprint(model: PreTrainedModel) -> str:
    return unembed_fingerprint(get_unembed(model).weight)


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries that shape a result, read without importing them."""
    found = {}
    for name in LIBRARIES:
        try:
            found[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            continue
    return found


@dataclass(frozen=True)
class ModelRecord:
    """Which model an artifact was made for."""

    base_model: str
    """The name the model was loaded by (hub id, folder, .gguf, or the embedded default's name)."""
    num_layers: int
    """Blocks of the model."""
    hidden_size: int
    """Width of its residual stream."""
    unembed_sha256: str | None = None
    """Fingerprint of the full unembedding (``unembed_fingerprint``); None where the source had none."""

    @classmethod
    def of(cls, model: PreTrainedModel) -> "ModelRecord":
        return cls(model_id(model), n_blocks(model), model.config.hidden_size, model_fingerprint(model))


@dataclass
class ArtifactMeta:
    """The record in ``config.json``; ``details`` holds what only one kind has (a span's ends, a
    steering vector's layer and prompts, training time, where a conversion came from)."""

    kind: Kind
    model: ModelRecord
    tensors: dict[str, list[int]]
    """Name -> shape of every tensor in the safetensors file."""
    details: dict[str, Any] = field(default_factory=dict)
    train_config: dict[str, Any] | None = None
    versions: dict[str, str] = field(default_factory=dict)
    """Library versions of the writer (``save_artifact`` stamps them)."""
    format_version: int = FORMAT_VERSION

    @property
    def weights_name(self) -> str:
        return WEIGHTS[self.kind]

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "kind": self.kind,
            "base_model": self.model.base_model,
            "num_layers": self.model.num_layers,
            "hidden_size": self.model.hidden_size,
            "unembed_sha256": self.model.unembed_sha256,
            "tensors": self.tensors,
            "details": self.details,
            "train_config": self.train_config,
            "versions": self.versions,
        }

    @classmethod
    def from_json(cls, raw: Any, source: str) -> "ArtifactMeta":
        """Parse and check a ``config.json``; format 1 (before the shared record) is upgraded."""
        if not isinstance(raw, dict):
            raise ArtifactError(f"{source}: {CONFIG} should hold a JSON object, got {type(raw).__name__}")
        if raw.get("format_version") == 1:
            raw = _upgrade_v1(raw)
        missing = [k for k in ("kind", "num_layers", "hidden_size", "tensors") if k not in raw]
        if missing:
            raise ArtifactError(f"{source}: {CONFIG} lacks {missing}; it was not written by this project (keys: {sorted(raw)})")
        if raw["kind"] not in KINDS:
            raise ArtifactError(f"{source}: kind {raw['kind']!r} is none of {list(KINDS)}")
        if raw.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
            raise ArtifactError(f"{source}: format {raw['format_version']} is newer than this lens (reads <= {FORMAT_VERSION}); upgrade lens")
        for key in ("num_layers", "hidden_size"):
            if not isinstance(raw[key], int) or isinstance(raw[key], bool) or raw[key] < 1:
                raise ArtifactError(f"{source}: {CONFIG} field {key!r} should be a positive integer, got {raw[key]!r}")
        record = ModelRecord(str(raw.get("base_model", "?")), raw["num_layers"], raw["hidden_size"], raw.get("unembed_sha256"))
        return cls(
            kind=raw["kind"],
            model=record,
            tensors={name: list(shape) for name, shape in raw["tensors"].items()},
            details=dict(raw.get("details") or {}),
            train_config=raw.get("train_config"),
            versions=dict(raw.get("versions") or {}),
        )


_V1_RECORD = ("format_version", "lens_type", "translator_type", "num_layers", "hidden_size", "base_model", "unembed_sha256", "train_config", "versions")


def _upgrade_v1(raw: dict[str, Any]) -> dict[str, Any]:
    """Format 1 wrote lenses (``lens_type``) and span translators (``translator_type``) with flat keys."""
    d = raw.get("hidden_size")
    if raw.get("translator_type") == "span_affine":
        kind, tensors = "span_translator", {"weight": [d, d], "bias": [d]}
    else:
        kind, tensors = "tuned_lens", {"weight": [raw.get("num_layers"), d, d], "bias": [raw.get("num_layers"), d]}
    details = {k: v for k, v in raw.items() if k not in _V1_RECORD}
    return {**{k: raw[k] for k in _V1_RECORD if k in raw}, "kind": kind, "tensors": tensors, "details": details}
