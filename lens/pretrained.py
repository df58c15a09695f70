"""Lenses trained elsewhere: our folders, the tuned-lens package's folders, and its hub space.

The tuned-lens layout is ``params.pt`` (``torch.save`` of the translators' state dict: keys
``"{i}.weight"`` ``[d, d]`` and ``"{i}.bias"`` ``[d]`` for ``i`` in ``0..L-1``, an ``nn.Linear``
applied as ``h + W h + b``) plus ``config.json`` (``d_model``, ``num_hidden_layers``...). Its index
``i`` reads ``hidden_states[i]``, which is our layer ``i`` (residual after ``i`` blocks), so the
weights map over unchanged. ``params.pt`` is a pickle, so it is only ever opened with
``torch.load(weights_only=True)`` and must be a flat dict of tensors with exactly the expected keys.

Its ``unembed_hash`` hashes numpy's printed summary of the matrix (a few corner values), so it cannot
tell two models apart; we fingerprint the full unembedding instead (``unembed_sha256``).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from lens.arch import get_unembed
from lens.corpus import cache_dir
from lens.io import CONFIG, WEIGHTS, check_compatible, load_lens, logit_lens_for, read_lens_config, save_lens
from lens.model import model_id
from lens.translators import Lens, TunedLens

TL_WEIGHTS = "params.pt"
TL_REPO = "AlignmentResearch/tuned-lens"
TL_REPO_TYPE = "space"
TL_LENS_TYPE = "linear_tuned_lens"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?$")


class LensMismatchError(ValueError):
    """The lens was made for another model (its unembedding fingerprint differs)."""


class LensNotFoundError(FileNotFoundError):
    """Neither a local lens folder nor a hub lens we could fetch."""


def unembed_fingerprint(weight: torch.Tensor) -> str:
    """SHA-256 of the shape and every float32 byte: a summary hash misses models that share corners."""
    data = weight.detach().to("cpu", torch.float32).contiguous()
    digest = hashlib.sha256(("x".join(map(str, data.shape)) + ";float32;").encode())
    digest.update(data.numpy().tobytes())  # little-endian on every platform torch supports
    return digest.hexdigest()


def model_fingerprint(model: PreTrainedModel) -> str:
    return unembed_fingerprint(get_unembed(model).weight)


def lens_metadata(model: PreTrainedModel) -> dict[str, str]:
    """What ``save_lens`` should record so a later load can check the lens against its model."""
    return {"base_model": model_id(model), "unembed_sha256": model_fingerprint(model)}


def check_fingerprint(config: dict[str, Any], model: PreTrainedModel, source: str, allow_mismatch: bool) -> None:
    """Compare the recorded fingerprint with the model's; a lens without one is only shape-checked."""
    recorded = config.get("unembed_sha256")
    if recorded is None or allow_mismatch:
        return
    actual = model_fingerprint(model)
    if recorded != actual:
        raise LensMismatchError(
            f"lens {source} was made for {config.get('base_model', '?')} (unembedding sha256 {recorded[:16]}...), "
            f"but {model_id(model)} has unembedding sha256 {actual[:16]}...: the lens belongs to another model "
            "(or another revision of it). Pass allow_mismatch=True (--allow-mismatch) to use it anyway."
        )


def hub_folder(lens_id: str) -> Path:
    """Where a hub lens is (or should be put): mirrors the space's ``lens/<model>/`` layout."""
    return cache_dir() / "tuned-lens" / "lens" / lens_id


def _hub_instructions(lens_id: str, reason: str) -> str:
    url = f"https://huggingface.co/spaces/{TL_REPO}/resolve/main/lens/{lens_id}"
    return (
        f"no local lens folder {lens_id!r} and the tuned-lens hub could not serve it ({reason}).\n"
        f"Download these two files from the Hugging Face space {TL_REPO} (folder lens/{lens_id}/):\n"
        f"  {url}/{TL_WEIGHTS}\n  {url}/{CONFIG}\n"
        f"and put them in {hub_folder(lens_id)}/ (or any folder, then pass that folder's path). "
        f"Available lenses: https://huggingface.co/spaces/{TL_REPO}/tree/main/lens"
    )


def fetch_hub_lens(lens_id: str) -> Path:
    """Find a hub lens in the local cache, else download its two files there."""
    if not _HUB_ID.match(lens_id) or ".." in lens_id:
        raise LensNotFoundError(f"{lens_id!r} is neither an existing folder nor a hub model name like 'gpt2' or 'org/model'")
    folder = hub_folder(lens_id)
    if all((folder / name).is_file() for name in (TL_WEIGHTS, CONFIG)):
        return folder
    from huggingface_hub import hf_hub_download  # lazy: only hub ids need it

    try:
        for name in (TL_WEIGHTS, CONFIG):
            hf_hub_download(
                TL_REPO, name, subfolder=f"lens/{lens_id}", repo_type=TL_REPO_TYPE, local_dir=folder.parents[1]
            )
    except Exception as err:  # offline, unknown id, HTTP errors: all end in the same instructions
        raise LensNotFoundError(_hub_instructions(lens_id, f"{type(err).__name__}: {str(err).splitlines()[0]}")) from err
    return folder


def read_tuned_lens_config(folder: Path) -> dict[str, Any]:
    """The reference ``config.json``, mapped to our keys and checked."""
    raw = read_lens_config(folder)
    missing = [k for k in ("d_model", "num_hidden_layers") if not isinstance(raw.get(k), int)]
    if missing:
        raise ValueError(f"{folder / CONFIG}: tuned-lens config lacks integer field(s) {missing}; got keys {sorted(raw)}")
    if raw.get("lens_type", TL_LENS_TYPE) != TL_LENS_TYPE or raw.get("bias", True) is not True:
        raise ValueError(
            f"{folder / CONFIG}: only lens_type={TL_LENS_TYPE!r} with bias=true is supported, "
            f"got lens_type={raw.get('lens_type')!r}, bias={raw.get('bias')!r}"
        )
    return {
        "num_layers": raw["num_hidden_layers"],
        "hidden_size": raw["d_model"],
        "base_model": raw.get("base_model_name_or_path", "?"),
        "base_model_revision": raw.get("base_model_revision"),
        "tuned_lens_unembed_hash": raw.get("unembed_hash"),
    }


def read_params(path: Path, n_layers: int, d_model: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked ``[L, d, d]`` weight and ``[L, d]`` bias from ``params.pt``, refusing anything unexpected."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: a tuned-lens folder holds {TL_WEIGHTS} and {CONFIG}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(f"{path} holds objects other than tensors; refused (only weights_only loading is allowed): {str(err).splitlines()[0]}") from err
    except (RuntimeError, EOFError, OSError) as err:
        raise ValueError(f"{path} cannot be read ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'empty'}); the file is corrupt or truncated") from err
    if not isinstance(state, dict):
        raise ValueError(f"{path} should hold a dict of tensors, got {type(state).__name__}")
    expected = {f"{i}.{p}": (d_model, d_model) if p == "weight" else (d_model,) for i in range(n_layers) for p in ("weight", "bias")}
    missing, extra = sorted(expected.keys() - state.keys()), sorted(map(str, state.keys() - expected.keys()))
    if missing or extra:
        raise ValueError(
            f"{path} does not look like a {n_layers}-layer tuned lens: missing keys {missing[:4]}, "
            f"unexpected keys {extra[:4]} (expected '0.weight', '0.bias', ... '{n_layers - 1}.bias')"
        )
    for key, shape in expected.items():
        tensor = state[key]
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise ValueError(f"{path}: {key!r} should be a floating-point tensor, got {type(tensor).__name__}")
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{path}: {key!r} should have shape {shape} per {CONFIG}, got {tuple(tensor.shape)}")
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{path}: {key!r} holds NaN or inf; this lens is unusable")
    weight = torch.stack([state[f"{i}.weight"].float() for i in range(n_layers)])  # [L, d, d]
    bias = torch.stack([state[f"{i}.bias"].float() for i in range(n_layers)])  # [L, d]
    return weight, bias


def read_pretrained(
    path_or_id: str | Path, model: PreTrainedModel | None = None, allow_mismatch: bool = False
) -> tuple[TunedLens, dict[str, Any]]:
    """The lens and its config (our keys) from any supported source, checked against ``model``."""
    folder = Path(path_or_id)
    if not folder.is_dir():
        folder = fetch_hub_lens(str(path_or_id))
    source = str(folder)
    if (folder / WEIGHTS).is_file():
        config = read_lens_config(folder)
        lens = load_lens(folder, model)
    elif (folder / TL_WEIGHTS).is_file():
        config = read_tuned_lens_config(folder)
        weight, bias = read_params(folder / TL_WEIGHTS, config["num_layers"], config["hidden_size"])
        if model is not None:
            check_compatible(config, model, source)
        lens = TunedLens(config["num_layers"], config["hidden_size"])
        with torch.no_grad():
            lens.weight.copy_(weight)
            lens.bias.copy_(bias)
    else:
        raise LensNotFoundError(f"{folder} holds neither {WEIGHTS} (this project) nor {TL_WEIGHTS} (tuned-lens), each with {CONFIG}")
    if model is not None:
        check_fingerprint(config, model, source, allow_mismatch)
    return lens, config


def load_pretrained(
    path_or_id: str | Path, model: PreTrainedModel | None = None, allow_mismatch: bool = False
) -> TunedLens:
    """Load a lens from our folder, a tuned-lens folder, or a tuned-lens hub id (e.g. ``gpt2``)."""
    return read_pretrained(path_or_id, model, allow_mismatch)[0]


def lens_or_logit(path: str | Path | None, model: PreTrainedModel, model_name: str, allow_mismatch: bool = False) -> Lens:
    """``path`` (folder or hub id) must load; without one, ``checkpoints/<model_name>`` if trained, else the logit lens."""
    if path is None:
        trained = Path("checkpoints") / model_name
        if not (trained / WEIGHTS).is_file():
            return logit_lens_for(model)
        path = trained
    return load_pretrained(path, model, allow_mismatch)


def convert(
    src: str | Path,
    dst: str | Path,
    model: PreTrainedModel | None = None,
    allow_mismatch: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write any loadable lens as our format; ``dst`` appears complete or not at all."""
    dst = Path(dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not overwrite:
        raise FileExistsError(f"{dst} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
    lens, config = read_pretrained(src, model, allow_mismatch)
    metadata = {k: v for k, v in config.items() if k not in ("num_layers", "hidden_size", "format_version", "lens_type", "versions")}
    metadata["converted_from"] = str(src)
    if model is not None:
        metadata.update(lens_metadata(model))
    dst.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp"))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes folders only their owner can enter
    try:
        save_lens(lens, staging, metadata)
        publish_folder(staging, dst)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dst


def publish_folder(staging: Path, dst: Path) -> None:
    """Rename a finished folder into place; an old ``dst`` is moved aside first, then deleted."""
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
        os.replace(staging, dst)
        if old.is_dir():
            shutil.rmtree(old)
        else:
            old.unlink()
    else:
        os.replace(staging, dst)

