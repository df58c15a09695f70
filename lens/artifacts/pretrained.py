"""Where pretrained lenses live: the ones shipped in the repository's ``checkpoints/pretrained/``,
and the ones published to the Hugging Face hub with ``lens push`` (a model repository in this
project's layout: ``lens.safetensors``, ``config.json``, ``README.md`` card)."""

from __future__ import annotations

from pathlib import Path

from lens.artifacts.files import cache_dir, staged_folder
from lens.artifacts.metadata import CONFIG, WEIGHTS, ArtifactNotFoundError
from lens.config import HUB_REPO_ID, SHIPPED_LENSES

CHECKPOINTS = Path(__file__).resolve().parents[2] / "checkpoints"
"""The repository's ``checkpoints/`` (present in a clone and an editable install, not in a wheel)."""
HUB_FILES = (WEIGHTS["tuned_lens"], CONFIG)
"""What a published lens needs; the card, eval JSON and figure come along when present."""


def shipped_folder(name: str) -> Path:
    folder = CHECKPOINTS / SHIPPED_LENSES[name]
    if not (folder / WEIGHTS["tuned_lens"]).is_file():
        raise ArtifactNotFoundError(
            f"the lens shipped for {name} is not at {folder}: it lives in the repository's checkpoints/, which an "
            "install from a wheel leaves out. Use a clone (pip install -e .) or pass the lens folder itself."
        )
    return folder


def hub_cache(repo_id: str) -> Path:
    return cache_dir() / "hub" / repo_id.replace("/", "--")


def fetch_published(repo_id: str) -> Path:
    """A lens published with ``lens push``: from the cache, else downloaded there when the hub answers."""
    folder = hub_cache(repo_id)
    if all((folder / name).is_file() for name in HUB_FILES):
        return folder
    from huggingface_hub import snapshot_download  # lazy: only hub lenses need it

    try:
        with staged_folder(folder, overwrite=True) as staging:
            snapshot_download(repo_id, local_dir=staging, allow_patterns=[*HUB_FILES, "README.md", "eval.json", "*.png"])
            missing = [name for name in HUB_FILES if not (staging / name).is_file()]
            if missing:
                raise ArtifactNotFoundError(f"hub repository {repo_id} has no {', '.join(missing)}: it is not a lens in this project's layout")
    except ArtifactNotFoundError:
        raise
    except Exception as err:  # offline, unknown repository, HTTP errors: the same instructions
        reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        raise ArtifactNotFoundError(
            f"could not download the lens {repo_id} from the hub ({reason}). Offline, fetch "
            f"https://huggingface.co/{repo_id}/resolve/main/{{{','.join(HUB_FILES)}}} into {folder}/"
        ) from err
    return folder


def pretrained_folder(name: str) -> Path:
    """The folder of a pretrained lens: a shipped model name (``smollm2-135m``), a local folder, or the
    hub repository id of a lens published with ``lens push`` (``owner/name``)."""
    if name in SHIPPED_LENSES:
        return shipped_folder(name)
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if HUB_REPO_ID.fullmatch(name) and not path.exists():
        return fetch_published(name)
    raise ArtifactNotFoundError(
        f"no pretrained lens {name!r}: give a shipped model name ({', '.join(sorted(SHIPPED_LENSES))}), "
        "a lens folder, or the hub id (owner/name) of a lens published with `lens push`"
    )
