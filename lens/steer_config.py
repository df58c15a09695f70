"""Typed schema of ``python -m lens.steer`` runs (loaded with ``lens.config.load_config``, like training)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from lens.config import DataConfig, RunConfig


@dataclass
class SteeringConfig:
    kind: str = "actadd"
    """``actadd``: prompt pairs, added position-wise to the first tokens of the text; ``vector``: one
    direction (from ``positives``/``negatives`` or ``vector_path``) added at every position."""
    pairs: list[list[str]] = field(default_factory=lambda: [["Love", "Hate"]])
    """ActAdd ``[plus, minus]`` prompt pairs; their steering tensors add up."""
    layer: int = 6
    """Steering enters block ``layer``: it is added to the residual after ``layer`` blocks."""
    coefficient: float = 4.0
    """Multiplies the steering tensor; negative values steer the other way."""
    positives: list[str] = field(default_factory=list)
    """``vector``: prompts on the plus side of the contrast."""
    negatives: list[str] = field(default_factory=list)
    """``vector``: prompts on the minus side of the contrast."""
    method: str = "mean"
    """``vector`` from contrast sets: ``mean`` difference or ``pca`` (first principal component)."""
    vector_path: Optional[str] = None
    """``vector``: a file written by ``SteeringVector.save`` (instead of contrast sets)."""
    min_token_index: int = 0
    """``vector``: first token position that is steered."""


@dataclass
class PictureConfig:
    text: str = "I hate you because you never listen to me, and I am tired of it."
    """The text whose per-token loss picture is drawn (base vs steered)."""
    top_k: int = 5
    """Top tokens kept per cell (HTML hover)."""
    unit: str = "bits"
    """``bits`` or ``nats`` for every figure, the HTML and the picture JSON."""
    metrics: list[str] = field(default_factory=lambda: ["ce", "kl"])
    """Heatmap PNGs written, one per metric: ``ce``, ``kl``, ``entropy``."""


@dataclass
class GenerateConfig:
    prompt: str = "I hate you because"
    """Greedy continuations of this prompt, intact vs steered, go into the summary."""
    max_new_tokens: int = 24
    """0 skips generation."""


@dataclass
class SteerEvalConfig:
    enabled: bool = True
    """Evaluate the steered model on held-out text (``data``) and on ``texts``."""
    sequences: int = 8
    """Held-out sequences of ``data.seq_len`` tokens from the corpus."""
    texts: list[str] = field(default_factory=list)
    """Extra texts evaluated separately, e.g. on the steered topic (ActAdd's topical check)."""
    confidence: float = 0.95
    """Confidence level of the log-prob difference interval."""
    lens_shift: bool = True
    """Also report the per-layer lens loss shift on the held-out sequences (the slow part)."""
    skips: list[list[int]] = field(default_factory=list)
    """Spans ``[i, j]`` of blocks to skip (unsteered): their final held-out loss goes next to the steering's."""


@dataclass
class SteerConfig(RunConfig):
    """``python -m lens.steer --config configs/steer_<name>.yaml``: one steering run and its pictures.
    Runs go to ``eval/out/steer/<run_name>`` (git-ignored); generation is greedy, so the seed only
    matters for future sampling options."""

    run_name: str = "steer"
    output_dir: str = "eval/out/steer"
    seed: int = 0
    lens: str = "auto"
    """``auto`` (the trained lens at ``checkpoints/<model.name>/`` if it exists, else the logit lens),
    ``logit``, or a lens folder holding ``lens.safetensors``."""
    data: DataConfig = field(default_factory=lambda: DataConfig(seq_len=64))
    steering: SteeringConfig = field(default_factory=SteeringConfig)
    picture: PictureConfig = field(default_factory=PictureConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    eval: SteerEvalConfig = field(default_factory=SteerEvalConfig)
