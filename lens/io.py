"""Lenses on disk: ``lens.safetensors`` + ``config.json``, written atomically, checked on load."""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from lens.arch import get_blocks
from lens.translators import Lens, LogitLens, TunedLens

WEIGHTS = "lens.safetensors"
CONFIG = "config.json"
FORMAT_VERSION = 1


@contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temp path next to ``final``; rename over it only if the body finished."""
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes files only their owner can read
    try:
        yield Path(tmp)
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(data: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def versions() -> dict[str, str]:
    import lightning
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "lightning": lightning.__version__}


def save_tensors(folder: Path, weights_name: str, tensors: dict[str, torch.Tensor], config: dict[str, Any], what: str) -> Path:
    """Write ``tensors`` as safetensors and ``config`` as JSON into ``folder``, both atomically;
    refuse NaN/inf so a broken run never leaves a usable-looking file behind."""
    tensors = {name: t.detach().float().cpu().contiguous() for name, t in tensors.items()}
    for name, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise ValueError(f"refusing to save a {what} whose {name} holds NaN or inf")
    with atomic_path(folder / weights_name) as tmp:
        save_file(tensors, str(tmp), metadata={"format_version": str(FORMAT_VERSION)})
    write_json({"format_version": FORMAT_VERSION, **config, "versions": versions()}, folder / CONFIG)
    return folder


def save_lens(lens: Lens, folder: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write ``folder/lens.safetensors`` and ``folder/config.json``; returns the folder."""
    if not isinstance(lens, TunedLens):
        raise TypeError(f"only tuned lenses have weights to save, got {type(lens).__name__}")
    config = {"lens_type": lens.kind, "num_layers": lens.n_layers, "hidden_size": lens.d_model, **(metadata or {})}
    return save_tensors(Path(folder), WEIGHTS, {"weight": lens.weight, "bias": lens.bias}, config, "lens")


def read_lens_config(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    path = folder / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: a lens folder holds {WEIGHTS} and {CONFIG}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); the file is corrupt") from err


def load_lens(folder: str | Path, model: PreTrainedModel | None = None) -> TunedLens:
    """Load a lens; with ``model``, check that it was trained for a model of that shape."""
    folder = Path(folder)
    config = read_lens_config(folder)
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing: a lens folder holds {WEIGHTS} and {CONFIG}")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{weights} cannot be read ({err}); the file is corrupt or truncated") from err
    n_layers, d_model = config["num_layers"], config["hidden_size"]
    expected = {"weight": (n_layers, d_model, d_model), "bias": (n_layers, d_model)}
    for name, shape in expected.items():
        if name not in tensors or tuple(tensors[name].shape) != shape:
            got = tuple(tensors[name].shape) if name in tensors else "missing"
            raise ValueError(f"{weights}: tensor {name!r} should have shape {shape} per {CONFIG}, got {got}")
        if not torch.isfinite(tensors[name]).all():
            raise ValueError(f"{weights}: tensor {name!r} holds NaN or inf; this lens is unusable")
    if model is not None:
        check_compatible(config, model, source=str(folder))
    lens = TunedLens(n_layers, d_model)
    with torch.no_grad():
        lens.weight.copy_(tensors["weight"])
        lens.bias.copy_(tensors["bias"])
    return lens


def check_compatible(config: dict[str, Any], model: PreTrainedModel, source: str) -> None:
    """Raise naming both sides when a lens was made for a model of another shape."""
    model_layers, model_d = len(get_blocks(model)), model.config.hidden_size
    problems = []
    if config["num_layers"] != model_layers:
        problems.append(f"layers: lens {config['num_layers']} vs model {model_layers}")
    if config["hidden_size"] != model_d:
        problems.append(f"hidden size: lens {config['hidden_size']} vs model {model_d}")
    if problems:
        raise ValueError(
            f"lens {source} (trained for {config.get('base_model', '?')}) does not fit "
            f"{type(model).__name__}: {'; '.join(problems)}. Load the lens trained for this model."
        )


def logit_lens_for(model: PreTrainedModel) -> LogitLens:
    return LogitLens(len(get_blocks(model)), model.config.hidden_size)
