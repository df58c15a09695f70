"""Typed run configuration: dataclasses merged with a YAML file and ``key=value`` overrides.

OmegaConf checks every key and type against these dataclasses, so ``optim.lr_sclae=2`` is an
error naming the key and the valid ones, not a silently ignored setting.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError


@dataclass
class ModelConfig:
    name: str = "smollm2-135m"
    """Hub id, local folder, local ``.gguf`` file, or ``smollm2-135m`` (the embedded default)."""
    dtype: str = "float32"
    """Weights dtype of the frozen base model (``float32``, ``bfloat16``, ``float16``)."""


@dataclass
class DataConfig:
    dataset: str = "debian-handbook"
    """``debian-handbook`` (embedded default corpus), a local .txt/.json/.jsonl file or folder,
    or a ``datasets`` hub name."""
    subset: Optional[str] = None
    """``datasets`` configuration name (e.g. ``wikitext-103-raw-v1``)."""
    split: str = "train"
    """Split read from the dataset; the held-out part is carved out of it by document."""
    text_column: str = "text"
    """Column holding the raw text."""
    streaming: bool = False
    """Stream the dataset instead of tokenising it all up front (large corpora)."""
    seq_len: int = 256
    """Tokens per packed training sequence (tuned-lens uses 2048; small here for CPU runs)."""
    eval_percent: float = 5.0
    """Percent of documents held out for evaluation (chosen by a hash of the document index)."""
    max_eval_sequences: int = 8
    """Held-out sequences used by validation and the final evaluation."""
    max_train_sequences: Optional[int] = None
    """Cap on packed training sequences (None: all)."""
    batch_size: int = 4
    """Sequences per device per step."""
    num_workers: int = 0
    """DataLoader workers."""


@dataclass
class LensConfig:
    init: str = "lstsq"
    """``zero`` (the published recipe: start as the logit lens) or ``lstsq`` (closed-form ridge
    regression onto the final residual, then KL fine-tuning)."""
    lstsq_sequences: int = 64
    """Training sequences used to accumulate the closed-form statistics."""
    ridge: float = 1e-3
    """Ridge penalty relative to the mean Gram diagonal of each layer."""
    positions_per_layer: Optional[int] = None
    """If set, the KL loss uses this many random positions per batch (all layers share them)."""
    kl_chunk: int = 1024
    """Rows of full-vocabulary logits computed at a time by the streaming KL."""


@dataclass
class OptimConfig:
    optimizer: str = "sgd"
    """``sgd`` (SGD with Nesterov momentum, tuned-lens scripts/ingredients.py) or ``adam``."""
    lr_scale: float = 1.0
    """Learning rate is ``lr_scale * (1 - momentum)`` for SGD (tuned-lens ingredients.py)."""
    momentum: float = 0.9
    """SGD Nesterov momentum (tuned-lens ingredients.py)."""
    weight_decay: float = 1e-3
    """L2 weight decay (tuned-lens ingredients.py)."""
    warmup_steps: int = 0
    """Linear warmup steps; tuned-lens uses 0 for SGD (ingredients.py create_scheduler)."""
    num_steps: int = 250
    """Optimizer steps; the learning rate decays linearly to 0 over them (tuned-lens train_loop.py)."""
    grad_clip: float = 1.0
    """Gradient norm clip (tuned-lens train_loop.py)."""


@dataclass
class TrainerConfig:
    accelerator: str = "auto"
    """Lightning accelerator: ``auto``, ``cpu``, ``gpu``."""
    devices: Any = 1
    """Devices (or processes on CPU) per node."""
    strategy: str = "auto"
    """Lightning strategy: ``auto``, ``ddp``, ``fsdp``..."""
    precision: str = "auto"
    """``auto`` picks ``bf16-mixed`` on a GPU that supports it, else ``32-true``."""
    accumulate_grad_batches: int = 1
    """Batches per optimizer step (tuned-lens reaches 2**18 tokens per step this way)."""
    log_every_n_steps: int = 1
    """TensorBoard logging interval."""
    val_every_n_steps: int = 50
    """Held-out KL is computed every this many optimizer steps and at the end."""
    progress_bar: bool = True
    """Show Lightning's progress bar."""
    checkpoint_every_n_steps: int = 50
    """Write ``<run>/resume/last.ckpt`` (translators, optimizer, data position, RNG) this often; 0: never."""
    on_nonfinite: str = "stop"
    """A NaN/inf training loss ``stop``s the run (naming layer and step) or ``skip``s that optimizer step."""


@dataclass
class EvalConfig:
    enabled: bool = True
    """Evaluate tuned vs logit lens on held-out text after training."""
    sequences: int = 8
    """Held-out sequences evaluated."""


@dataclass
class RunConfig:
    """What every run shares: its folder, its seed, the frozen model and the corpus."""

    run_name: str = "run"
    """Folder name under ``output_dir`` for this run's files."""
    output_dir: str = "checkpoints"
    """Where run folders are written."""
    seed: int = 42
    """Seeds Python, NumPy and torch (tuned-lens default)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.run_name


@dataclass
class TrainConfig(RunConfig):
    """``python train.py --config configs/<name>.yaml``: train and evaluate a tuned lens."""

    run_name: str = "smollm2-135m"
    lens: LensConfig = field(default_factory=LensConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    resume: bool = False
    """Continue from ``<run>/resume/last.ckpt`` when it exists (``train.py --resume PATH`` names another)."""


@dataclass
class SpanConfig:
    start: int = 10
    """The translator reads the residual after ``start`` blocks..."""
    end: int = 12
    """...and stands in for blocks ``start..end-1``, predicting the residual after ``end`` blocks."""
    loss: str = "kl"
    """``kl``: KL(intact model's final distribution || model with the span replaced); ``mse``: squared
    error to the true residual after ``end`` blocks."""
    init: str = "zero"
    """``zero`` (start as plain skipping) or ``lstsq`` (ridge regression onto the true residual first)."""
    lstsq_sequences: int = 32
    """Training sequences used by the ``lstsq`` start."""
    ridge: float = 1e-3
    """Ridge penalty of the ``lstsq`` start, relative to the mean Gram diagonal."""


def _translator_optim() -> OptimConfig:
    # Adam: one d x d map behind a frozen model tolerates it better than the lens recipe's SGD
    return OptimConfig(optimizer="adam", lr_scale=1.0, weight_decay=0.0, num_steps=40)


@dataclass
class TranslatorTrainConfig(RunConfig):
    """``python train.py --config configs/translator_<name>.yaml`` (YAML top-level ``kind: translator``)."""

    kind: str = "translator"
    """Which run ``train.py`` starts: ``translator`` here; YAMLs without ``kind`` train a lens."""
    run_name: str = "translator-smollm2-135m"
    span: SpanConfig = field(default_factory=SpanConfig)
    optim: OptimConfig = field(default_factory=_translator_optim)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


@dataclass
class SkipSweepConfig(RunConfig):
    """``python -m lens.skip_sweep --config configs/<name>.yaml`` (YAML top-level ``kind: skip_sweep``)."""

    kind: str = "skip_sweep"
    run_name: str = "skip-sweep-smollm2-135m"
    span_lengths: list[int] = field(default_factory=lambda: [1])
    """Every span ``i..i+n`` for each length ``n`` listed."""
    translators: str = "lstsq"
    """Per span: ``none``, ``lstsq`` (closed-form best linear guess of the residual, cheap) or ``kl``
    (lstsq start, then ``optim.num_steps`` KL steps with Lightning; slow on a CPU)."""
    lstsq_sequences: int = 16
    ridge: float = 1e-3
    sequences: int = 8
    """Held-out sequences every span is scored on."""
    optim: OptimConfig = field(default_factory=_translator_optim)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


def run_cli(main: Callable[[], None]) -> None:
    """Run a CLI entry point: a bad key, a bad value or a missing file ends with one line naming
    it, not a traceback."""
    try:
        main()
    except (ConfigError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from None


def load_config(schema: type, path: str | Path | None = None, overrides: list[str] | None = None):
    """Merge ``schema`` defaults <- YAML file <- dotlist overrides, checked against ``schema``."""
    base = OmegaConf.structured(schema)
    layers = []
    if path is not None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"config file {path} does not exist (see configs/ for examples)")
        layers.append(OmegaConf.load(path))
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"overrides must look like key=value, got {bad}")
        layers.append(OmegaConf.from_dotlist(overrides))
    try:
        merged = OmegaConf.merge(base, *layers)
    except ConfigKeyError as err:
        raise ConfigError(
            f"unknown config key {err.full_key!r}; valid keys there: {_valid_keys(schema, err.full_key)}"
        ) from err
    except ValidationError as err:
        raise ConfigError(f"bad value for {err.full_key!r}: {err.msg}") from err
    return OmegaConf.to_object(merged)


def _valid_keys(schema: type, full_key: str | None) -> list[str]:
    node = OmegaConf.structured(schema)
    for part in (full_key or "").split(".")[:-1]:
        if part not in node:
            break
        node = node[part]
    return sorted(node.keys()) if OmegaConf.is_dict(node) else []


def to_dict(cfg: Any) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]
