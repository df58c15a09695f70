"""Awkward corpora: each is a clear error or is handled, and skipped documents are counted in the log."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from lens.config import DataConfig
from lens.data.documents import iter_documents
from lens.data.sequences import load_sequences
from lens.data.batches import ResumableBatches


def jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_empty_documents_are_skipped_and_counted(tokenizer, tmp_path, caplog):
    text = "A lens reads the residual stream of a model. " * 5
    rows = [{"text": text}, {"text": ""}, {"text": "  \n "}, {"text": None}, {"text": text}]
    cfg = DataConfig(dataset=jsonl(tmp_path / "c.jsonl", rows), seq_len=16, eval_percent=0)
    with caplog.at_level(logging.WARNING, logger="lens.data"):
        seqs = load_sequences(cfg, tokenizer, held_out=False, limit=None)
    assert seqs.shape[1] == 16 and len(seqs) > 2
    assert any("skipped 3 empty training documents" in r.getMessage() for r in caplog.records)


def test_corpus_shorter_than_one_sequence_is_a_clear_error(tokenizer, tmp_path):
    cfg = DataConfig(dataset=jsonl(tmp_path / "c.jsonl", [{"text": "too short"}]), seq_len=64, eval_percent=0)
    with pytest.raises(ValueError, match="corpus is too small for data.seq_len"):
        load_sequences(cfg, tokenizer, held_out=False, limit=None)


def test_too_few_sequences_for_one_global_batch_is_a_clear_error():
    batches = ResumableBatches(torch.zeros(3, 8, dtype=torch.long), batch_size=2, seed=0, world_size=2)
    with pytest.raises(ValueError, match="3 training sequences cannot fill one global batch of 4"):
        next(iter(batches))


def test_non_utf8_bytes_are_replaced_with_a_warning(tmp_path, caplog):
    (tmp_path / "a.txt").write_bytes(b"caf\xe9 au lait \xff ok")
    (tmp_path / "b.jsonl").write_bytes(b'{"text": "na\xefve"}\n')
    with caplog.at_level(logging.WARNING, logger="lens.data"):
        docs = list(iter_documents(DataConfig(dataset=str(tmp_path))))
    assert docs == ["caf\ufffd au lait \ufffd ok", "na\ufffdve"]
    warned = [r.getMessage() for r in caplog.records if "not valid UTF-8" in r.getMessage()]
    assert len(warned) == 2 and "a.txt" in warned[0] and "offset 3" in warned[0]


def test_missing_text_column_names_the_columns(tmp_path):
    cfg = DataConfig(dataset=jsonl(tmp_path / "c.jsonl", [{"body": "x", "id": 1}]), text_column="text")
    with pytest.raises(ValueError, match=r"no column 'text' \(columns: \['body', 'id'\]\)"):
        list(iter_documents(cfg))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"text": "fine"}\n{"text": \n', r"c.jsonl line 2 is not valid JSON"),
        ('{"text": 12}\n', r"row 0: column 'text' holds a int, not text"),
        ('["a list"]\n', r"row 0 is a list, not an object"),
    ],
)
def test_malformed_json_rows_are_clear_errors(tmp_path, content, message):
    (tmp_path / "c.jsonl").write_text(content)
    with pytest.raises(ValueError, match=message):
        list(iter_documents(DataConfig(dataset=str(tmp_path / "c.jsonl"))))
