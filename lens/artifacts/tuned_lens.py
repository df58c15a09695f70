"""Lenses published by the ``tuned-lens`` package: its folder layout and its hub space.

The layout is ``params.pt`` (``torch.save`` of the translators' state dict: keys ``"{i}.weight"``
``[d, d]`` and ``"{i}.bias"`` ``[d]`` for ``i`` in ``0..L-1``, an ``nn.Linear`` applied as
``h + W h + b``) plus ``config.json`` (``d_model``, ``num_hidden_layers``...). Its index ``i``
reads ``hidden_states[i]``, which is our layer ``i`` (residual after ``i`` blocks), so the weights
map over unchanged. ``params.pt`` is a pickle, so it is only ever opened with
``torch.load(weights_only=True)`` and must be a flat dict of tensors with exactly the expected keys.

Its ``unembed_hash`` hashes numpy's printed summary of the matrix (a few corner values), so it cannot
tell two models apart; such lenses are checked by shape only until converted with a model
(``lens convert``), which records our full fingerprint.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch

from lens.artifacts.files import cache_dir
from lens.artifacts.metadata import CONFIG, ArtifactError, ArtifactMeta, ArtifactNotFoundError, ModelRecord

PARAMS = "params.pt"
SPACE = "AlignmentResearch/tuned-lens"
LENS_TYPE = "linear_tuned_lens"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?$")


def hub_folder(lens_id: str) -> Path:
    """Where a hub lens is (or should be put): mirrors the space's ``lens/<model>/`` layout."""
    return cache_dir() / "tuned-lens" / "lens" / lens_id


def _hub_instructions(lens_id: str, reason: str) -> str:
    url = f"https://huggingface.co/spaces/{SPACE}/resolve/main/lens/{lens_id}"
    return (
        f"no local lens folder {lens_id!r} and the tuned-lens hub could not serve it ({reason}).\n"
        f"Download these two files from the Hugging Face space {SPACE} (folder lens/{lens_id}/):\n"
        f"  {url}/{PARAMS}\n  {url}/{CONFIG}\n"
        f"and put them in {hub_folder(lens_id)}/ (or any folder, then pass that folder's path). "
        f"Available lenses: https://huggingface.co/spaces/{SPACE}/tree/main/lens"
    )


def fetch_hub_lens(lens_id: str) -> Path:
    """Find a hub lens in the local cache, else download its two files there."""
    if not _HUB_ID.match(lens_id) or ".." in lens_id:
        raise ArtifactNotFoundError(f"{lens_id!r} is neither an existing folder nor a hub model name like 'gpt2' or 'org/model'")
    folder = hub_folder(lens_id)
    if all((folder / name).is_file() for name in (PARAMS, CONFIG)):
        return folder
    from huggingface_hub import hf_hub_download  # lazy: only hub ids need it

    try:
        for name in (PARAMS, CONFIG):
            hf_hub_download(SPACE, name, subfolder=f"lens/{lens_id}", repo_type="space", local_dir=folder.parents[1])
    except Exception as err:  # offline, unknown id, HTTP errors: all end in the same instructions
        raise ArtifactNotFoundError(_hub_instructions(lens_id, f"{type(err).__name__}: {str(err).splitlines()[0]}")) from err
    return folder


def read_meta(folder: Path, raw: dict[str, Any]) -> ArtifactMeta:
    """The reference ``config.json`` as our record (no fingerprint: the reference's hash cannot identify a model)."""
    missing = [k for k in ("d_model", "num_hidden_layers") if not isinstance(raw.get(k), int)]
    if missing:
        raise ArtifactError(f"{folder / CONFIG}: tuned-lens config lacks integer field(s) {missing}; got keys {sorted(raw)}")
    if raw.get("lens_type", LENS_TYPE) != LENS_TYPE or raw.get("bias", True) is not True:
        raise ArtifactError(
            f"{folder / CONFIG}: only lens_type={LENS_TYPE!r} with bias=true is supported, "
            f"got lens_type={raw.get('lens_type')!r}, bias={raw.get('bias')!r}"
        )
    n, d = raw["num_hidden_layers"], raw["d_model"]
    details = {"tuned_lens_config": raw, "source_layout": "tuned-lens"}
    record = ModelRecord(str(raw.get("base_model_name_or_path", "?")), n, d)
    return ArtifactMeta("tuned_lens", record, {"weight": [n, d, d], "bias": [n, d]}, details=details)


def read_params(path: Path, n_layers: int, d_model: int) -> dict[str, torch.Tensor]:
    """Stacked ``weight`` ``[L, d, d]`` and ``bias`` ``[L, d]`` from ``params.pt``, refusing anything unexpected."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message goes on to suggest weights_only=False: never for a file refused as unsafe
        raise ArtifactError(f"{path} holds objects other than tensors; refused unread (only plain tensors are loaded)") from err
    except (RuntimeError, EOFError, OSError) as err:
        raise ArtifactError(f"{path} cannot be read ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'empty'}); the file is corrupt or truncated") from err
    if not isinstance(state, dict):
        raise ArtifactError(f"{path} should hold a dict of tensors, got {type(state).__name__}")
    expected = {f"{i}.{p}": (d_model, d_model) if p == "weight" else (d_model,) for i in range(n_layers) for p in ("weight", "bias")}
    missing, extra = sorted(expected.keys() - state.keys()), sorted(map(str, state.keys() - expected.keys()))
    if missing or extra:
        raise ArtifactError(
            f"{path} does not look like a {n_layers}-layer tuned lens: missing keys {missing[:4]}, "
            f"unexpected keys {extra[:4]} (expected '0.weight', '0.bias', ... '{n_layers - 1}.bias')"
        )
    for key, shape in expected.items():
        tensor = state[key]
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise ArtifactError(f"{path}: {key!r} should be a floating-point tensor, got {type(tensor).__name__}")
        if tuple(tensor.shape) != shape:
            raise ArtifactError(f"{path}: {key!r} should have shape {shape} per {CONFIG}, got {tuple(tensor.shape)}")
    return {
        "weight": torch.stack([state[f"{i}.weight"].float() for i in range(n_layers)]),  # [L, d, d]
        "bias": torch.stack([state[f"{i}.bias"].float() for i in range(n_layers)]),  # [L, d]
    }
