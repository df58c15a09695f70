"""The table of ``lens`` commands: each names its schema (in ``lens.config``) and the function that
runs it. Run functions are imported only when their command runs, so ``lens --help`` and a bad
config answer at once, and commands without training never import Lightning."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

from lens.runs.result import Done
from lens.config import (
    EDIT_KINDS,
    STEER_KINDS,
    SURGERY_KINDS,
    TRAIN_KINDS,
    ConvertConfig,
    CorpusConfig,
    FunctionVectorConfig,
    LensEvalConfig,
    PushConfig,
    TraceConfig,
    TrajectoryConfig,
)


class Outcome(Protocol):
    """What every command returns: where its files are and the few lines worth printing."""

    run_dir: Path

    def lines(self) -> list[str]: ...


def convert(cfg: ConvertConfig) -> Done:
    from lens.artifacts.registry import convert as convert_lens
    from lens.artifacts.registry import read_artifact
    from lens.core.model import load_model

    model = load_model(cfg.model)[0] if cfg.model else None
    out = convert_lens(cfg.src, cfg.dst, model, allow_mismatch=cfg.allow_mismatch, overwrite=cfg.overwrite)
    record = read_artifact(out).meta.model
    fingerprint = record.unembed_sha256 or "none (give model=NAME to record one)"
    return Done(out, [f"{record.num_layers} layers, d={record.hidden_size}, base model {record.base_model}, fingerprint {fingerprint}"])


def corpus(cfg: CorpusConfig) -> Done:
    from lens.data.corpus import describe, prepare_default_corpus

    path = prepare_default_corpus(force=cfg.force)
    return Done(path.parent, [describe(path)])


@dataclass(frozen=True)
class Command:
    summary: str
    schema: type | Mapping[str, type]
    """One schema, or schemas by the config's top-level ``kind``."""
    runs: Mapping[str, str] | str
    """``module:function`` that runs a loaded config (per kind where ``schema`` is a mapping)."""

    def runner(self, cfg: Any) -> Callable[[Any], Outcome]:
        target = self.runs if isinstance(self.runs, str) else self.runs[cfg.kind]
        module, _, name = target.partition(":")
        return getattr(importlib.import_module(module), name)


COMMANDS: dict[str, Command] = {
    "train": Command(
        "train a tuned lens (kind: lens) or a span translator (kind: translator) with Lightning",
        TRAIN_KINDS,
        {"lens": "lens.training.lens_run:train", "translator": "lens.training.translator_run:train_translator"},
    ),
    "eval": Command("evaluate a lens in depth on held-out text, next to the logit lens", LensEvalConfig, "lens.runs.evaluate:evaluate"),
    "steer": Command(
        "steer a model (ActAdd, steering vectors) and read it through a lens (kind: run), or sweep layers x coefficients (kind: sweep)",
        STEER_KINDS,
        {"run": "lens.runs.steer:steer", "sweep": "lens.runs.steer:steer_sweep"},
    ),
    "surgery": Command(
        "cut the model: sweep skips, repeats and swaps (kind: sweep), draw per-token pictures (kind: picture), truncate either end (kind: truncate)",
        SURGERY_KINDS,
        {"sweep": "lens.training.surgery:skip_sweep", "picture": "lens.runs.surgery:surgery_pictures", "truncate": "lens.training.surgery:truncation"},
    ),
    "edit": Command(
        "edit one fact with ROME (kind: rome), read the edit through the lens, score one edit per known fact; "
        "or find an attribute direction among many edits' values and apply it (kind: direction)",
        EDIT_KINDS,
        {"rome": "lens.runs.edit:edit", "direction": "lens.runs.direction:direction"},
    ),
    "trace": Command(
        "causal tracing (ROME) of one fact: token x block heatmaps, the mean effect per block over the known facts, the traced runs through the lens",
        TraceConfig,
        "lens.runs.trace:trace",
    ),
    "function-vector": Command(
        "find the heads that carry an in-context task, add their sum (a function vector) to zero-shot prompts, read it through the lens",
        FunctionVectorConfig,
        "lens.runs.function_vector:function_vector",
    ),
    "trajectory": Command("what every layer predicts at every token of one text", TrajectoryConfig, "lens.runs.trajectory:trajectory"),
    "convert": Command("write any loadable lens (ours, tuned-lens folder or hub id) in this project's format", ConvertConfig, "lens.cli.commands:convert"),
    "push": Command("write a trained lens as a hub-ready folder with its model card, and upload it when the hub answers", PushConfig, "lens.runs.push:push"),
    "corpus": Command("fetch and extract the embedded default corpus into the cache", CorpusConfig, "lens.cli.commands:corpus"),
}
