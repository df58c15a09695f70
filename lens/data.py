"""Documents in, fixed-length token sequences out, with a held-out split chosen per document.

Documents are joined with the tokenizer's EOS and packed into ``seq_len`` chunks (the last
partial chunk is dropped), as tuned-lens does. A document goes to the held-out split when a hash
of its index says so, which needs no shuffle buffer and works the same when streaming.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Iterable, Iterator

import torch
from transformers import PreTrainedTokenizerBase

from lens.config import DataConfig
from lens.corpus import NAME as DEFAULT_CORPUS
from lens.corpus import prepare_default_corpus

TEXT_SUFFIXES = {".txt", ".md"}
JSON_SUFFIXES = {".json", ".jsonl"}

log = logging.getLogger(__name__)


def read_text(file: Path) -> str:
    """A local file as UTF-8; bytes that are not UTF-8 become U+FFFD, with a warning naming the file."""
    raw = file.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        log.warning("%s is not valid UTF-8 (first bad byte at offset %d); undecodable bytes replaced by U+FFFD", file, err.start)
        return raw.decode("utf-8", errors="replace")


def _local_documents(path: Path, text_column: str) -> Iterator[str]:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if file.suffix in TEXT_SUFFIXES:
            yield read_text(file)
        elif file.suffix in JSON_SUFFIXES:
            yield from _json_documents(file, text_column)


def _json_rows(file: Path) -> list:
    text = read_text(file)
    if file.suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{file} is not valid JSON: {err}") from err
        return rows if isinstance(rows, list) else [rows]
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{file} line {number} is not valid JSON: {err}") from err
    return rows


def _json_documents(file: Path, text_column: str) -> Iterator[str]:
    """The ``text_column`` of every row; a null there counts as an empty document."""
    for i, row in enumerate(_json_rows(file)):
        if not isinstance(row, dict):
            raise ValueError(f"{file} row {i} is a {type(row).__name__}, not an object with a {text_column!r} field")
        if text_column not in row:
            raise KeyError(f"{file} row {i} has no column {text_column!r} (columns: {sorted(row)}); set data.text_column")
        text = row[text_column]
        if text is not None and not isinstance(text, str):
            raise ValueError(f"{file} row {i}: column {text_column!r} holds a {type(text).__name__}, not text")
        yield text or ""


def iter_documents(cfg: DataConfig) -> Iterable[str]:
    """Raw documents of the configured corpus, in a fixed order."""
    if cfg.dataset == DEFAULT_CORPUS:
        return _json_documents(prepare_default_corpus(), "text")
    path = Path(cfg.dataset)
    if path.exists():
        return _local_documents(path, cfg.text_column)
    import datasets  # imported lazily: slow, and only hub datasets need it

    ds = datasets.load_dataset(cfg.dataset, cfg.subset, split=cfg.split, streaming=cfg.streaming)
    columns = ds.column_names or []
    if columns and cfg.text_column not in columns:
        raise KeyError(f"dataset {cfg.dataset} has no column {cfg.text_column!r} (columns: {columns}); set data.text_column")
    return (row[cfg.text_column] for row in ds)


def is_held_out(doc_index: int, eval_percent: float) -> bool:
    digest = hashlib.blake2b(str(doc_index).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % 10_000 < eval_percent * 100


def pack_sequences(
    documents: Iterable[str],
    tokenizer: PreTrainedTokenizerBase,
    seq_len: int,
    held_out: bool,
    eval_percent: float,
) -> Iterator[torch.Tensor]:
    """Yield ``[seq_len]`` token sequences from the train (or held-out) documents.

    Empty documents (blank lines of wikitext, null rows) are skipped; how many is logged once the
    pass ends, so a corpus that is mostly empty does not go unnoticed.
    """
    eos = tokenizer.eos_token_id
    buffer: list[int] = []
    used = skipped = 0
    try:
        for index, text in enumerate(documents):
            if is_held_out(index, eval_percent) != held_out:
                continue
            if not text or not text.strip():
                skipped += 1
                continue
            used += 1
            buffer.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
            buffer.append(eos)
            while len(buffer) >= seq_len:
                yield torch.tensor(buffer[:seq_len])
                buffer = buffer[seq_len:]
    finally:
        if skipped:
            split = "held-out" if held_out else "training"
            log.warning("skipped %d empty %s documents (%d used so far)", skipped, split, used)


def token_sequences(
    cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, held_out: bool, limit: int | None
) -> Iterator[torch.Tensor]:
    sequences = pack_sequences(iter_documents(cfg), tokenizer, cfg.seq_len, held_out, cfg.eval_percent)
    for count, seq in enumerate(sequences):
        if limit is not None and count >= limit:
            return
        yield seq


def load_sequences(
    cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, held_out: bool, limit: int | None
) -> torch.Tensor:
    """All sequences of one split as ``[n, seq_len]``; an error if there are none."""
    seqs = list(token_sequences(cfg, tokenizer, held_out, limit))
    if not seqs:
        split = "held-out" if held_out else "training"
        raise ValueError(
            f"no {split} sequences of {cfg.seq_len} tokens from {cfg.dataset!r}: the corpus is too small "
            "for data.seq_len, or data.eval_percent leaves that split empty"
        )
    return torch.stack(seqs)
