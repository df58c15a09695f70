"""Whole training runs on a tiny model, for the long-run tests: files on disk, overrides, train.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from conftest import TEXT, make_model, make_tokenizer
from lens.config import TrainConfig, load_config
from lens.artifacts.registry import load_lens
from lens.training.lens_run import train
from lens.core.translators import TunedLens

REPO = Path(__file__).resolve().parents[1]


def write_tiny_inputs(folder: Path) -> Path:
    """A saved tiny GPT-2 + tokenizer (``folder/model``) and a JSONL corpus (``folder/corpus.jsonl``)."""
    make_model("gpt2").save_pretrained(folder / "model")
    make_tokenizer().save_pretrained(folder / "model")
    sentences = TEXT.split(". ")
    with (folder / "corpus.jsonl").open("w") as f:
        for i in range(60):
            f.write(json.dumps({"text": ". ".join(sentences[i % 7 : i % 7 + 5])}) + "\n")
    return folder


def overrides(inputs: Path, out: Path, run_name: str, *more: str) -> list[str]:
    """Small-run settings as ``key=value`` strings; ``more`` come last, so they win."""
    settings: dict[str, object] = {
        "model.name": inputs / "model",
        "data.dataset": inputs / "corpus.jsonl",
        "data.seq_len": 32,
        "data.batch_size": 2,
        "data.eval_percent": 20,
        "data.max_eval_sequences": 2,
        "lens.init": "zero",
        "optim.num_steps": 12,
        "trainer.accelerator": "cpu",
        "trainer.progress_bar": False,
        "trainer.val_every_n_steps": 5,
        "trainer.checkpoint_every_n_steps": 1,
        "eval.enabled": False,
        "output_dir": out,
        "run_name": run_name,
    }
    return [f"{k}={v}" for k, v in settings.items()] + list(more)


def config(args: list[str]) -> TrainConfig:
    return load_config(TrainConfig, None, args)


def train_in_process(args: list[str]) -> TunedLens:
    cfg = config(args)
    train(cfg)
    return load_lens(cfg.run_dir)


def train_py(args: list[str], log: Path) -> subprocess.Popen:
    """``python train.py ARGS`` in the repository, output to ``log``."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    with log.open("w") as f:
        return subprocess.Popen([sys.executable, "train.py", *args], cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env)


def assert_same_lens(a: TunedLens, b: TunedLens, atol: float = 1e-6) -> None:
    torch.testing.assert_close(a.weight, b.weight, atol=atol, rtol=0)
    torch.testing.assert_close(a.bias, b.bias, atol=atol, rtol=0)
