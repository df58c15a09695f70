"""``lens push RUN REPO_ID``: a trained lens as a hub-ready folder (weights, config, card, eval,
figure), uploaded with ``huggingface_hub`` when the hub can be reached."""

from __future__ import annotations

import json
import os
import shutil
import socket
from dataclasses import replace
from pathlib import Path

import torch
from omegaconf import OmegaConf

from lens.artifacts.files import staged_folder, write_bytes
from lens.artifacts.metadata import ArtifactError
from lens.artifacts.registry import read_artifact, save_artifact
from lens.config import PushConfig
from lens.report.card import model_card
from lens.runs.result import Done

STORAGE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
EVAL_FILES = ("eval.json", "eval.png")
HUB_HOST = ("huggingface.co", 443)


def hub_folder(cfg: PushConfig) -> Path:
    return Path(cfg.out) if cfg.out else Path("checkpoints") / "hub" / cfg.repo_id.replace("/", "--")


def write_hub_folder(cfg: PushConfig) -> Path:
    """Check the run's lens, then write ``lens.safetensors`` (in ``cfg.storage``), ``config.json``,
    ``train_config.yaml``, ``eval.json``, ``eval.png`` and the card; the folder appears complete or not at all."""
    run = Path(cfg.run)
    artifact = read_artifact(run, "tuned_lens")
    if not (run / "eval.json").is_file():
        raise ArtifactError(f"{run / 'eval.json'} is missing: the card's table comes from it; run `lens train` with eval.enabled=true")
    if not artifact.meta.train_config:
        raise ArtifactError(f"{run} records no training config: the card could not say how the lens was made")
    out = hub_folder(cfg)
    meta = replace(artifact.meta, details={**artifact.meta.details, "storage_dtype": cfg.storage, "repo_id": cfg.repo_id})
    with staged_folder(out, cfg.overwrite) as staging:
        save_artifact(staging, meta, artifact.tensors, STORAGE[cfg.storage])
        for name in EVAL_FILES:
            if (run / name).is_file():
                shutil.copy2(run / name, staging / name)
        write_bytes(OmegaConf.to_yaml(meta.train_config).encode(), staging / "train_config.yaml")
        figure = "eval.png" if (run / "eval.png").is_file() else None
        card = model_card(meta, json.loads((run / "eval.json").read_text()), cfg.repo_id, figure, cfg.storage)
        write_bytes(card.encode(), staging / "README.md")
    return out


def hub_unreachable() -> str | None:
    """Why an upload cannot happen now (None when it can be tried)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return "HF_HUB_OFFLINE is set"
    try:
        socket.create_connection(HUB_HOST, timeout=3).close()
    except OSError as err:
        return f"{HUB_HOST[0]} cannot be reached ({err})"
    return None


def push(cfg: PushConfig) -> Done:
    out = write_hub_folder(cfg)
    lines = [f"hub-ready folder {out}: {', '.join(sorted(p.name for p in out.iterdir()))}"]
    manual = f"upload it later with `huggingface-cli upload {cfg.repo_id} {out} .`"
    why = "upload=false" if not cfg.upload else hub_unreachable()
    if why is not None:
        return Done(out, [*lines, f"not uploaded ({why}); {manual}"])
    from huggingface_hub import HfApi  # lazy: only uploads need it

    try:
        api = HfApi()
        api.create_repo(cfg.repo_id, exist_ok=True)
        commit = api.upload_folder(repo_id=cfg.repo_id, folder_path=str(out), commit_message="lens push")
    except Exception as err:  # no token, no rights, HTTP errors: the folder stays, with the way to finish
        first = str(err).splitlines()[0] if str(err) else ""
        return Done(out, [*lines, f"upload failed ({type(err).__name__}: {first}); log in with `huggingface-cli login`, or {manual}"])
    return Done(out, [*lines, f"uploaded: {getattr(commit, 'commit_url', commit)}"])
