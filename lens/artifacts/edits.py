"""The MLP-key covariance cache of ROME edits: one safetensors file per (model, block, corpus, token count).

Estimating ``C = E[k kᵀ]`` takes a pass over tens of thousands of corpus tokens, and every edit of
the same block of the same model needs the same ``C``; so it is written once under the cache dir,
keyed by the model's fingerprint (not its name: a fine-tuned copy has other keys), the block, the
corpus and the token count, atomically so an interrupted run never leaves a short file behind.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from transformers import PreTrainedModel

from lens.artifacts.files import cache_dir, write_bytes
from lens.artifacts.metadata import ArtifactError, model_fingerprint


def covariance_path(fingerprint: str, block: int, corpus: str, tokens: int) -> Path:
    """Where the covariance of block ``block``'s MLP keys over ``tokens`` tokens of ``corpus`` is kept."""
    corpus_tag = hashlib.sha256(corpus.encode()).hexdigest()[:12]
    return cache_dir() / "rome" / f"keycov-{fingerprint[:20]}-block{block}-{corpus_tag}-{tokens}tok.safetensors"


def read_covariance(path: Path) -> torch.Tensor:
    """``[d_mlp, d_mlp]`` from a cache file; a clear error if it is corrupt."""
    try:
        return load_file(str(path))["covariance"]
    except (SafetensorError, OSError, KeyError) as err:
        raise ArtifactError(f"{path} cannot be read ({err}); delete it and it is computed again") from err


def cached_covariance(
    model: PreTrainedModel, block: int, corpus: str, tokens: int, compute: Callable[[], torch.Tensor]
) -> tuple[torch.Tensor, Path, bool]:
    """The cached covariance ``[d_mlp, d_mlp]`` (float32), computing and writing it on a miss; also
    the file and whether it was read from the cache."""
    path = covariance_path(model_fingerprint(model), block, corpus, tokens)
    if path.is_file():
        return read_covariance(path), path, True
    covariance = compute().float().contiguous()
    if not torch.isfinite(covariance).all():
        raise ArtifactError(f"the key covariance of block {block} holds NaN or inf; not caching it")
    meta = {"block": str(block), "tokens": str(tokens), "corpus": corpus}
    write_bytes(save({"covariance": covariance.cpu()}, metadata=meta), path)
    return covariance, path, False
