"""Saving and loading every artifact through one path: one record, one set of checks, one reader registry.

``read_artifact`` finds the folder (a local path, or a tuned-lens hub id), asks each reader in
``READERS`` whether it knows the layout, checks the tensors against the record and, given a
model, checks that the artifact was made for it (block count, width, span or layer, unembedding
fingerprint). The typed loaders (``load_lens``, ``load_span_translator``; steering vectors load
in ``lens.interventions``) only turn tensors into modules.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lens.artifacts import tuned_lens
from lens.artifacts.files import staged_folder, write_bytes, write_json
from lens.artifacts.pretrained import pretrained_folder
from lens.artifacts.metadata import (
    CONFIG,
    FORMAT_VERSION,
    WEIGHTS,
    ArtifactError,
    ArtifactMeta,
    ArtifactMismatchError,
    ArtifactNotFoundError,
    Kind,
    ModelRecord,
    library_versions,
    model_fingerprint,
)
from lens.config import lens_recipe, written_as_path
from lens.core.arch import n_blocks
from lens.core.model import load_run_model, model_id
from lens.core.translators import Lens, SpanTranslator, TunedLens, logit_lens_for


@dataclass
class Artifact:
    """What a reader returns: the record, the tensors, and where they came from."""

    meta: ArtifactMeta
    tensors: dict[str, torch.Tensor]
    source: str


class Reader(Protocol):
    """One on-disk layout."""

    def finds(self, folder: Path) -> bool: ...

    def read(self, folder: Path) -> Artifact: ...


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{path} is not valid JSON ({err}); the file is corrupt") from err


class OurFolder:
    """This project's layout: ``config.json`` (``ArtifactMeta``) + ``<kind>.safetensors``."""

    def finds(self, folder: Path) -> bool:
        return any((folder / name).is_file() for name in WEIGHTS.values())

    def read(self, folder: Path) -> Artifact:
        if not (folder / CONFIG).is_file():
            raise ArtifactNotFoundError(f"{folder / CONFIG} is missing: an artifact folder holds {CONFIG} next to its .safetensors file")
        meta = ArtifactMeta.from_json(_read_json(folder / CONFIG), str(folder))
        weights = folder / meta.weights_name
        if not weights.is_file():
            raise ArtifactNotFoundError(f"{weights} is missing: a {meta.kind} folder holds {meta.weights_name} and {CONFIG}")
        try:
            tensors = load_file(str(weights))
        except (SafetensorError, OSError) as err:
            raise ArtifactError(f"{weights} cannot be read ({err}); the file is corrupt or truncated") from err
        return Artifact(meta, tensors, str(folder))


class TunedLensFolder:
    """The ``tuned-lens`` package's layout: ``params.pt`` + its ``config.json``."""

    def finds(self, folder: Path) -> bool:
        return (folder / tuned_lens.PARAMS).is_file()

    def read(self, folder: Path) -> Artifact:
        if not (folder / CONFIG).is_file():
            raise ArtifactNotFoundError(f"{folder / CONFIG} is missing: a tuned-lens folder holds {tuned_lens.PARAMS} and {CONFIG}")
        raw = _read_json(folder / CONFIG)
        if not isinstance(raw, dict):
            raise ArtifactError(f"{folder / CONFIG} should hold a JSON object")
        meta = tuned_lens.read_meta(folder, raw)
        n, d = meta.model.num_layers, meta.model.hidden_size
        return Artifact(meta, tuned_lens.read_params(folder / tuned_lens.PARAMS, n, d), str(folder))


READERS: tuple[Reader, ...] = (OurFolder(), TunedLensFolder())


def locate(src: str | Path, kind: Kind | None) -> Path:
    """A local folder as given; otherwise a tuned-lens hub id (only lenses come from the hub)."""
    folder = Path(src)
    if folder.is_dir():
        return folder
    if kind in (None, "tuned_lens") and not (written_as_path(str(src)) or folder.exists()):
        return tuned_lens.fetch_hub_lens(str(src))
    what = f"a saved {kind}" if kind else "an artifact"
    raise ArtifactNotFoundError(f"{src} is not a folder: {what} is a folder holding its .safetensors file and {CONFIG}")


def read_artifact(
    src: str | Path, kind: Kind | None = None, model: PreTrainedModel | None = None, allow_mismatch: bool = False
) -> Artifact:
    """Any saved artifact, checked: tensors against the record, ``kind`` if given, ``model`` if given."""
    folder = locate(src, kind)
    reader = next((r for r in READERS if r.finds(folder)), None)
    if reader is None:
        layouts = ", ".join(sorted(WEIGHTS.values()))
        raise ArtifactNotFoundError(f"{folder} holds none of {layouts} (this project) or {tuned_lens.PARAMS} (tuned-lens), each with {CONFIG}")
    artifact = reader.read(folder)
    meta = artifact.meta
    if kind is not None and meta.kind != kind:
        raise ArtifactError(f"{folder} holds a {meta.kind}, not a {kind}")
    check_tensors(meta, artifact.tensors, artifact.source)
    if model is not None:
        check_fits(meta, model, artifact.source, allow_mismatch)
    return artifact


def check_tensors(meta: ArtifactMeta, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Every tensor the record lists is there with its shape and finite; no others."""
    if set(tensors) != set(meta.tensors):
        raise ArtifactError(f"{source}: tensors {sorted(tensors)} do not match {CONFIG}'s {sorted(meta.tensors)}")
    for name, shape in meta.tensors.items():
        if list(tensors[name].shape) != list(shape):
            raise ArtifactError(f"{source}: tensor {name!r} should have shape {tuple(shape)} per {CONFIG}, got {tuple(tensors[name].shape)}")
        if not torch.isfinite(tensors[name]).all():
            raise ArtifactError(f"{source}: tensor {name!r} holds NaN or inf; this {meta.kind} is unusable")


def check_fits(meta: ArtifactMeta, model: PreTrainedModel, source: str, allow_mismatch: bool = False) -> None:
    """Raise naming both sides when ``meta`` was made for another model; ``allow_mismatch`` accepts
    another fingerprint (e.g. a fine-tuned revision), never another shape."""
    made_for = meta.model
    problems = []
    if made_for.num_layers != n_blocks(model):
        problems.append(f"blocks: {made_for.num_layers} vs model {n_blocks(model)}")
    if made_for.hidden_size != model.config.hidden_size:
        problems.append(f"hidden size: {made_for.hidden_size} vs model {model.config.hidden_size}")
    if problems:
        raise ArtifactMismatchError(
            f"{meta.kind} {source} (made for {made_for.base_model}) does not fit {type(model).__name__} "
            f"{model_id(model)!r}: {'; '.join(problems)}. Load the one made for this model."
        )
    if made_for.unembed_sha256 is None or allow_mismatch:
        return
    actual = model_fingerprint(model)
    if made_for.unembed_sha256 != actual:
        raise ArtifactMismatchError(
            f"{meta.kind} {source} was made for {made_for.base_model} (unembedding sha256 {made_for.unembed_sha256[:16]}...), "
            f"but {model_id(model)} has unembedding sha256 {actual[:16]}...: it belongs to another model "
            "(or another revision of it). Pass allow_mismatch=True (allow_mismatch=true) to use it anyway."
        )


def save_artifact(
    folder: str | Path, meta: ArtifactMeta, tensors: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32
) -> Path:
    """Write ``<kind>.safetensors`` then ``config.json`` into ``folder``, each atomically, stamped with
    the shapes written and the writer's library versions; refuse NaN/inf so a broken run never leaves
    a usable-looking file behind. ``dtype`` is the storage type (loading always gives float32
    modules): half precision halves the file at a KL cost measured in docs/learning_curves.md."""
    folder = Path(folder)
    tensors = {name: t.detach().to("cpu", dtype).contiguous() for name, t in tensors.items()}
    shapes = {name: list(t.shape) for name, t in tensors.items()}
    meta = replace(meta, tensors=shapes, versions=library_versions(), format_version=FORMAT_VERSION)
    for name, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise ArtifactError(f"refusing to save a {meta.kind} whose {name} holds NaN or inf")
    write_bytes(save(tensors, metadata={"format_version": str(FORMAT_VERSION), "kind": meta.kind}), folder / meta.weights_name)
    write_json(meta.to_json(), folder / CONFIG)
    return folder


def model_record(model: PreTrainedModel | None, n_layers: int, d_model: int) -> ModelRecord:
    """The record of ``model`` (with its fingerprint), or a bare shape when none is given."""
    return ModelRecord.of(model) if model is not None else ModelRecord("?", n_layers, d_model)


def save_lens(
    lens: TunedLens,
    folder: str | Path,
    model: PreTrainedModel | None = None,
    train_config: dict | None = None,
    dtype: torch.dtype = torch.float32,
    **details: Any,
) -> Path:
    """Write a tuned lens; with ``model``, record the model it reads so later loads can check it."""
    if not isinstance(lens, TunedLens):
        raise TypeError(f"only tuned lenses have weights to save, got {type(lens).__name__}")
    meta = ArtifactMeta("tuned_lens", model_record(model, lens.n_layers, lens.d_model), {}, details, train_config)
    return save_artifact(folder, meta, {"weight": lens.weight, "bias": lens.bias}, dtype)


def save_span_translator(
    translator: SpanTranslator, folder: str | Path, model: PreTrainedModel, train_config: dict | None = None, **details: Any
) -> Path:
    """Write a span translator with the model it stands in for (a span only means something in its model)."""
    meta = ArtifactMeta(
        "span_translator", ModelRecord.of(model), {}, {"start": translator.start, "end": translator.end, **details}, train_config
    )
    return save_artifact(folder, meta, dict(translator.named_parameters()))


def filled(module: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """``module`` with ``tensors`` copied in (names and shapes were checked against the record)."""
    module.load_state_dict(tensors, strict=True)
    return module


def describe_lens(meta: ArtifactMeta, source: str) -> str:
    """How a saved lens was made, in a few words (figure titles name it)."""
    recipe = lens_recipe(meta.train_config or {})
    if recipe is not None:
        return recipe
    if meta.details.get("source_layout") == "tuned-lens" or "converted_from" in meta.details:
        return f"tuned lens from the tuned-lens layout ({Path(str(meta.details.get('converted_from', source))).name})"
    return f"tuned lens from {Path(source).name}"


def load_lens(src: str | Path, model: PreTrainedModel | None = None, allow_mismatch: bool = False) -> TunedLens:
    """A tuned lens from our folder, a tuned-lens folder or a tuned-lens hub id (e.g. ``gpt2``);
    with ``model``, checked against it (shape and unembedding fingerprint)."""
    artifact = read_artifact(src, "tuned_lens", model, allow_mismatch)
    record = artifact.meta.model
    lens = filled(TunedLens(record.num_layers, record.hidden_size), artifact.tensors)
    lens.origin = describe_lens(artifact.meta, artifact.source)
    return lens  # type: ignore[return-value]


def load_span_translator(src: str | Path, model: PreTrainedModel | None = None, allow_mismatch: bool = False) -> SpanTranslator:
    """A span translator; with ``model``, checked against it (blocks, width, span, fingerprint)."""
    artifact = read_artifact(src, "span_translator", model, allow_mismatch)
    details = artifact.meta.details
    translator = SpanTranslator(artifact.meta.model.hidden_size, details["start"], details["end"])
    return filled(translator, artifact.tensors)  # type: ignore[return-value]


def load_pretrained(name: str, model: PreTrainedModel | None = None, allow_mismatch: bool = False) -> TunedLens:
    """A pretrained lens, no training and (for shipped ones) no network: ``load_pretrained("smollm2-135m")``
    reads the lens that ships in ``checkpoints/pretrained/``; a folder or the hub id of a lens
    published with ``lens push`` also works. With ``model``, checked against it like any lens."""
    return load_lens(pretrained_folder(name), model, allow_mismatch)


def resolve_lens(spec: str, model: PreTrainedModel, model_name: str, allow_mismatch: bool = False) -> Lens:
    """``logit``; ``auto``: the lens trained under ``checkpoints/<model_name>/`` if there is one, else
    the logit lens; ``pretrained``: the lens shipped for ``model_name`` (``load_pretrained``);
    anything else: a lens folder or tuned-lens hub id that must load."""
    if spec == "logit":
        return logit_lens_for(model)
    if spec == "pretrained":
        return load_pretrained(model_name, model, allow_mismatch)
    if spec == "auto":
        trained = Path("checkpoints") / model_name
        if not (trained / WEIGHTS["tuned_lens"]).is_file():
            return logit_lens_for(model)
        spec = str(trained)
    return load_lens(spec, model, allow_mismatch)


def run_model_and_lens(cfg: Any) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, Lens]:
    """A run's model (its config checked against the model's first) and the lens it reads it with."""
    model, tokenizer = load_run_model(cfg)
    return model, tokenizer, resolve_lens(cfg.lens, model, cfg.model.name, cfg.allow_mismatch)


def convert(
    src: str | Path, dst: str | Path, model: PreTrainedModel | None = None, allow_mismatch: bool = False, overwrite: bool = False
) -> Path:
    """Write any loadable lens in our format; ``dst`` appears complete or not at all. With ``model``,
    the lens is checked against it and its fingerprint is recorded."""
    artifact = read_artifact(src, "tuned_lens", model, allow_mismatch)
    meta = artifact.meta
    if model is not None:
        meta = replace(meta, model=ModelRecord.of(model))
    meta = replace(meta, details={**meta.details, "converted_from": str(src)})
    with staged_folder(Path(dst), overwrite) as staging:
        save_artifact(staging, meta, artifact.tensors)
    return Path(dst)
