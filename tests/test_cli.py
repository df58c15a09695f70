"""The one command line: help lists commands and every key, bad values fail before any model loads."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from lens import config as schemas
from lens.cli import COMMANDS, key_lines, main
from lens.cli.commands import Command, Done

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.mark.parametrize("entry", [[str(BIN / "lens")], [sys.executable, "-m", "lens"]], ids=["console script", "python -m"])
def test_help_lists_every_command(entry):
    out = subprocess.run([*entry, "--help"], capture_output=True, text=True, check=True, cwd=REPO).stdout
    for name in ("train", "eval", "steer", "surgery", "edit", "trace", "function-vector", "trajectory", "convert", "push", "corpus"):
        assert f"    {name}" in out
    assert set(COMMANDS) == {"train", "eval", "steer", "surgery", "edit", "trace", "function-vector", "trajectory", "convert", "push", "corpus"}


def leaf_keys(schema: type, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(schema):
        value = getattr(schema(), f.name)
        keys += leaf_keys(type(value), f"{prefix}{f.name}.") if dataclasses.is_dataclass(value) else [prefix + f.name]
    return keys


def all_schemas() -> list[type]:
    found = []
    for command in COMMANDS.values():
        found += list(command.schema.values()) if isinstance(command.schema, dict) else [command.schema]
    return found


@pytest.mark.parametrize("schema", all_schemas(), ids=lambda s: s.__name__)
def test_every_key_has_a_docstring_in_the_help(schema):
    text = "\n".join(key_lines(schema))
    for key in leaf_keys(schema):
        assert f"  {key}  (" in text, key
    docs = {}
    for f in dataclasses.fields(schema):
        value = getattr(schema(), f.name)
        if not dataclasses.is_dataclass(value):
            docs[f.name] = schemas.field_docs(schema)[f.name]
        else:
            assert all(schemas.field_docs(type(value)).values()), f"{schema.__name__}.{f.name} has a field without a docstring"
    assert all(docs.values()), [name for name, doc in docs.items() if not doc]


def test_command_help_shows_keys_types_and_docs(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["steer", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "picture.unit  (one of nats, bits; default 'bits')" in out
    assert "Steering enters block ``layer``" in out
    out = subprocess.run([sys.executable, "train.py", "--help"], capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert "keys for kind=lens" in out and "keys for kind=translator" in out and "lens.init  (one of zero, lstsq" in out


BAD_VALUES = [
    (["train", "lens.init=foo"], "lens.init"),
    (["train", "optim.optimizer=rmsprop"], "optim.optimizer"),
    (["train", "trainer.on_nonfinite=ignore"], "trainer.on_nonfinite"),
    (["train", "trainer.precision=fp8"], "trainer.precision"),
    (["train", "optim.lr_scale=-1"], "optim.lr_scale=-1.0 must be > 0"),
    (["train", "data.seq_len=0"], "data.seq_len=0 must be >= 2"),
    (["train", "kind=tokenizer"], "'kind'"),
    (["train", "--config", "configs/translator_smollm2.yaml", "span.loss=l1"], "span.loss"),
    (["train", "--config", "configs/translator_smollm2.yaml", "span.start=5", "span.end=2"], "span.end=2"),
    (["eval", "transfer_stride=0"], "transfer_stride=0 must be >= 1"),
    (["steer", "steering.kind=patch"], "steering.kind"),
    (["steer", "picture.unit=furlongs"], "picture.unit"),
    (["steer", "picture.metrics=[ce,loss]"], "picture.metrics"),
    (["steer", "picture.text=''"], "picture.text"),
    (["steer", "steering.layer=6.5"], "steering.layer"),
    (["steer", "eval.texts=[only one]"], "eval.texts"),
    (["surgery", "translators=mlp"], "translators"),
    (["surgery", "span_lengths=[0]"], "span_lengths"),
    (["trajectory", "metric=loss"], "metric"),
    (["trajectory", "model.dtype=int8"], "model.dtype"),
    (["convert"], "src"),
    (["corpus", "force=maybe"], "force"),
    (["steer", "lens=/no/such/lens"], "lens='/no/such/lens': no such folder"),
    (["steer", "steering.kind=vector", "steering.vector_path=/no/such/vector"], "steering.vector_path"),
    (["surgery", "translator_files=[/no/such/translator]"], "translator_files"),
    (["steer", "kind=sweep", "coefficients=[]"], "coefficients"),
    (["steer", "kind=sweep", "layers=[-1]"], "layers"),
    (["steer", "generate.top_p=0"], "generate.top_p=0.0 must be in (0, 1]"),
    (["surgery", "kind=picture", "programs=[{skip: [1, 2], swap: 3}]"], "programs[0].skip=[1, 2]: give exactly one of"),
    (["surgery", "kind=picture", "programs=[{replace: {path: /no/such}}]"], "programs[0].replace.path"),
    (["surgery", "kind=truncate", "ends=[middle]"], "ends"),
    (["surgery", "operations=[melt]"], "operations"),
    (["steer", "optim.lr_scale=1"], "unknown config key 'optim'"),
    (["steer", "--config", "configs/nope.yaml"], "configs/nope.yaml does not exist"),
]


@pytest.mark.parametrize("argv, names", BAD_VALUES, ids=[" ".join(a) for a, _ in BAD_VALUES])
def test_bad_values_fail_before_anything_runs(argv, names, capsys, monkeypatch):
    def must_not_run(self, cfg):
        raise AssertionError("the command ran: the bad value was not caught when the config loaded")

    monkeypatch.setattr(Command, "runner", must_not_run)
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and names in err and err.count("\n") == 1, err


def test_debug_shows_the_traceback(monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(schemas.ConfigError, match="lens.init"):
        main(["train", "--debug", "lens.init=foo"])


def test_positional_keys(monkeypatch, capsys):
    seen = []

    def record(cfg):
        seen.append(cfg)
        return Done(Path(cfg.dst), ["converted"])

    monkeypatch.setattr(Command, "runner", lambda self, cfg: record)
    main(["convert", "in_folder", "out_folder", "model=gpt2"])
    assert (seen[0].src, seen[0].dst, seen[0].model) == ("in_folder", "out_folder", "gpt2")
    assert capsys.readouterr().out == "converted\nwrote out_folder\n"
