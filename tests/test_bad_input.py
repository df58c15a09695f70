"""Bad input, one at a time, as a new user would give it: each is one clear line, before any weights
load where it can be, and leaves nothing half-made on disk (docs/reliability.md lists them all)."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, T5Config

from conftest import TEXT, make_model, make_tokenizer
from lens.artifacts.files import OutputError, write_json
from lens.cli import main
from lens.config import TrainConfig, load_config
from lens.data.documents import iter_documents
from lens.config import DataConfig
from lens.interventions import ActAdd, LayerProgram
from lens.training.checkpointing import AtomicCheckpointIO

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def config_only_model(tmp_path_factory) -> Path:
    """A tiny GPT-2 folder whose weights file is gone: only a check that runs before loading can pass."""
    folder = tmp_path_factory.mktemp("no-weights")
    make_model("gpt2").save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    return folder


def run_cli(argv: list[str], capsys) -> str:
    """Run ``lens ...``, expect the one-line error and exit code 2, return the message."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert err.startswith(f"lens {argv[0]}: error: ") and "Traceback" not in err
    return err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "data.seq_len=9000"], "data.seq_len=9000 exceeds the 128 positions"),
        (["steer", "steering.layer=99"], "steering.layer=99 is past the last block: steering layers (residual after that many blocks) of"),
        (["steer", "eval.skips=[[0,7]]"], "eval.skips=[[0, 7]] a span ends past the last block"),
        (["train", "kind=translator", "span.start=1", "span.end=9"], "span.end=9 is past the last block"),
        (["surgery", "span_lengths=[5]"], "has 3 blocks: lengths run 1..3"),
    ],
)
def test_what_depends_on_the_model_is_checked_before_its_weights_load(argv, message, config_only_model, tmp_path, capsys):
    err = run_cli([*argv, f"model.name={config_only_model}", f"output_dir={tmp_path}"], capsys)
    assert message in err and "config does not fit" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda folder: None, "cannot read a model config"),
        (lambda folder: T5Config(d_model=16, num_layers=1, num_heads=2, d_kv=8, d_ff=32).save_pretrained(folder), "cannot map model"),
        (lambda folder: BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2).save_pretrained(folder), "config.model_type='bert'"),
    ],
    ids=["empty folder", "t5", "bert"],
)
def test_models_that_cannot_work_are_named_before_weights_load(make, message, tmp_path, capsys):
    folder = tmp_path / "model"
    folder.mkdir()
    make(folder)
    err = run_cli(["trajectory", f"model.name={folder}", f"output_dir={tmp_path / 'out'}"], capsys)
    assert message in err and not (tmp_path / "out").exists()


def test_bad_numbers_leave_no_run_folder(tmp_path, capsys):
    err = run_cli(["train", "optim.lr_scale=-1", "optim.num_steps=-1", f"output_dir={tmp_path}"], capsys)
    assert "optim.lr_scale=-1.0 must be > 0" in err and "optim.num_steps=-1 must be >= 0" in err
    assert list(tmp_path.iterdir()) == []


def test_an_output_folder_that_cannot_be_written(tmp_path, capsys, monkeypatch):
    (tmp_path / "a-file").write_text("x")
    err = run_cli(["train", f"output_dir={tmp_path / 'a-file' / 'runs'}"], capsys)
    assert "a-file is a file" in err
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == tmp_path else real_access(path, mode))
    err = run_cli(["train", f"output_dir={tmp_path / 'runs'}"], capsys)
    assert f"{tmp_path} is not writable" in err and "choose another output_dir" in err


@pytest.mark.parametrize("code, message", [(errno.ENOSPC, "no space left on the device of"), (errno.EROFS, "read-only folder")])
def test_a_full_or_read_only_disk_during_a_checkpoint_names_the_file(tmp_path, monkeypatch, code, message):
    def fail(fd: int) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr("lens.artifacts.files.os.fsync", fail)
    path = tmp_path / "resume" / "last.ckpt"
    with pytest.raises(OutputError, match=message) as err:
        AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(1000)}, "global_step": 1}, path)
    assert str(path) in str(err.value) and list(path.parent.iterdir()) == []
    if code == errno.ENOSPC:
        assert "bytes to write" in str(err.value) and "bytes free" in str(err.value)
    with pytest.raises(OutputError, match=message):
        write_json({"a": 1}, tmp_path / "eval.json")


class FillsUp:
    """A file on a disk with 1,000 bytes left."""

    def __init__(self, file) -> None:
        self.file, self.left = file, 1000

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()

    def write(self, data) -> int:
        size = memoryview(data).nbytes
        if size > self.left:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.left -= size
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()

    def fileno(self) -> int:
        return self.file.fileno()


def test_a_disk_that_fills_while_a_checkpoint_streams_is_named(tmp_path, monkeypatch):
    """torch.save reports a failed write as its own RuntimeError; the errno must still reach the user."""
    monkeypatch.setattr("lens.artifacts.files.open", lambda path, mode: FillsUp(open(path, mode)), raising=False)
    path = tmp_path / "resume" / "last.ckpt"
    with pytest.raises(OutputError, match="no space left on the device of") as err:
        AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(10_000)}, "global_step": 1}, path)
    assert str(path) in str(err.value) and list(path.parent.iterdir()) == []


def test_a_single_text_file_is_split_so_both_splits_get_text(tmp_path, tokenizer):
    corpus = tmp_path / "book.txt"
    corpus.write_text("\n\n".join(TEXT.split(". ")), encoding="utf-8")
    docs = list(iter_documents(DataConfig(dataset=str(corpus))))
    assert len(docs) > 20 and all(doc.strip() for doc in docs)
    model = tmp_path / "model"
    make_model("llama").save_pretrained(model)
    tokenizer.save_pretrained(model)
    from lens.training.lens_run import train

    args = [f"model.name={model}", f"data.dataset={corpus}", "data.seq_len=16", "data.eval_percent=20", "lens.init=zero",
            "optim.num_steps=2", "trainer.accelerator=cpu", "trainer.progress_bar=false", f"output_dir={tmp_path}", "eval.sequences=2"]
    result = train(load_config(TrainConfig, None, args))
    assert result.evaluation.tokens > 0 and (tmp_path / "smollm2-135m" / "lens.safetensors").is_file()


@pytest.mark.parametrize(
    "content, message",
    [(b"", "is empty"), (b"  \n\n ", "is empty"), (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" * 20, "is not UTF-8 text")],
    ids=["empty", "blank", "binary"],
)
def test_empty_and_undecodable_files_are_named(tmp_path, content, message):
    path = tmp_path / "corpus.txt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        list(iter_documents(DataConfig(dataset=str(path))))


@pytest.mark.parametrize("name, content, message", [("e.txt", b"", "is empty"), ("b.json", b"\x00\x01", "is not text"),
                                                    ("c.csv", b"a,b", "takes .json/.jsonl/.md/.txt files"), ("./gone.txt", None, "no such file")])
def test_local_corpora_that_cannot_work_fail_before_the_model_loads(config_only_model, tmp_path, capsys, monkeypatch, name, content, message):
    monkeypatch.chdir(tmp_path)
    if content is not None:
        (tmp_path / name).write_bytes(content)
    err = run_cli(["train", f"model.name={config_only_model}", f"data.dataset={name}"], capsys)
    assert "bad config: data.dataset=" in err and message in err


def test_a_split_left_empty_says_which_setting_did_it(tmp_path, tokenizer):
    from lens.data.sequences import load_sequences

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": TEXT}) + "\n" for _ in range(5)))
    with pytest.raises(ValueError, match=r"data.eval_percent=0 puts none of its 5 documents in the held-out split"):
        load_sequences(DataConfig(dataset=str(corpus), seq_len=16, eval_percent=0), tokenizer, held_out=True, limit=None)
    with pytest.raises(ValueError, match=r"fewer than one sequence: the corpus is too small for data.seq_len"):
        load_sequences(DataConfig(dataset=str(corpus), seq_len=100_000, eval_percent=0), tokenizer, held_out=False, limit=None)


def test_a_refused_pickle_never_suggests_unsafe_loading(tmp_path, capsys):
    folder = tmp_path / "tl"
    folder.mkdir()
    torch.save({"0.weight": Path("x")}, folder / "params.pt")
    (folder / "config.json").write_text(json.dumps({"d_model": 32, "num_hidden_layers": 1}))
    err = run_cli(["convert", str(folder), str(tmp_path / "out")], capsys)
    assert "other than tensors" in err and "weights_only=False" not in err and "will likely succeed" not in err
    (folder / "config.json").write_text("{}")
    assert "lacks integer field(s) ['d_model', 'num_hidden_layers']" in run_cli(["convert", str(folder), str(tmp_path / "out")], capsys)


def test_small_api_mistakes_say_what_is_wrong(tokenizer):
    model = make_model("llama")
    with pytest.raises(TypeError, match=r"layer must be an integer .* got 6.0 of type float"):
        ActAdd(model, tokenizer, [("Love", "Hate")], layer=6.0)
    with pytest.raises(ValueError, match=r"order \[0, 'a', 1\] holds \['a'\]"):
        LayerProgram.permute(model, [0, "a", 1])
    with LayerProgram.repeat(model, 0, 2):
        inner = LayerProgram.skip(model, 0, 1)  # indexes the 4 slots of the outer program
    with pytest.raises(RuntimeError, match="built while another program was active, and that program has ended"):
        with inner:
            pass
