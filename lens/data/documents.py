"""Documents of a corpus, in a fixed order: the embedded default, local files or folders, or a ``datasets`` name.

In a folder, each ``.txt``/``.md`` file is one document. A single ``.txt``/``.md`` file given on its
own is split into paragraphs (blank-line separated; 2,000-character blocks when it has fewer than
``MIN_PARAGRAPHS``), so that the held-out split, chosen per document, gets some of it. ``.json``
holds a list of rows (or one row), ``.jsonl`` one row per line, each row's ``text_column`` a document.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterable, Iterator

from lens.config import CORPUS_SUFFIXES, DEFAULT_CORPUS, DataConfig, LensError
from lens.data.corpus import prepare_default_corpus


class CorpusError(LensError, ValueError):
    """A corpus that cannot give what the run needs: unreadable rows, a missing column, too little text."""

TEXT_SUFFIXES = frozenset({".txt", ".md"})
JSON_SUFFIXES = CORPUS_SUFFIXES - TEXT_SUFFIXES
MIN_PARAGRAPHS = 20
"""A single text file with fewer paragraphs than this is cut into fixed-size blocks instead."""
BLOCK_CHARS = 2000
UNDECODABLE_SHARE = 0.3
"""Above this share of undecodable bytes (or with any NUL byte) a file is refused as not being text;
below it, stray bytes (a Latin-1 accent) are replaced and warned about."""

log = logging.getLogger(__name__)


def read_text(file: Path) -> str:
    """A local file as UTF-8; a few bytes that are not UTF-8 become U+FFFD, with a warning naming the
    file; a file that is mostly not UTF-8 (a binary, another encoding) is refused."""
    raw = file.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        text = raw.decode("utf-8", errors="replace")
        bad = text.count("\ufffd")
        if bad > UNDECODABLE_SHARE * max(len(raw), 1) or b"\x00" in raw:
            raise CorpusError(
                f"{file} is not UTF-8 text ({bad} undecodable sequences in {len(raw)} bytes, the first at offset "
                f"{err.start}): convert it to UTF-8 or leave it out of data.dataset"
            ) from err
        log.warning("%s is not valid UTF-8 (first bad byte at offset %d); undecodable bytes replaced by U+FFFD", file, err.start)
        return text


def split_text(text: str) -> list[str]:
    """One long text as documents: its paragraphs, or fixed-size blocks (cut at whitespace) when it has few."""
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    if len(paragraphs) >= MIN_PARAGRAPHS:
        return paragraphs
    blocks, words, size = [], [], 0
    for word in text.split():
        words.append(word)
        size += len(word) + 1
        if size >= BLOCK_CHARS:
            blocks.append(" ".join(words))
            words, size = [], 0
    return blocks + ([" ".join(words)] if words else [])


def _local_documents(path: Path, text_column: str) -> Iterator[str]:
    if path.is_file():
        if path.suffix in TEXT_SUFFIXES:
            text = read_text(path)
            if not text.strip():
                raise CorpusError(f"{path} is empty: there is no text to train or evaluate on")
            yield from split_text(text)
            return
        files = [path]
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in CORPUS_SUFFIXES)
        if not files:
            raise CorpusError(f"{path} holds no {'/'.join(sorted(CORPUS_SUFFIXES))} files")
    for file in files:
        if file.suffix in TEXT_SUFFIXES:
            yield read_text(file)
        elif file.suffix in JSON_SUFFIXES:
            yield from _json_documents(file, text_column)
        else:
            raise CorpusError(f"{file}: data.dataset takes {'/'.join(sorted(CORPUS_SUFFIXES))} files, got {file.suffix or 'no suffix'}")


def _json_rows(file: Path) -> list:
    text = read_text(file)
    if file.suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise CorpusError(f"{file} is not valid JSON: {err}") from err
        return rows if isinstance(rows, list) else [rows]
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise CorpusError(f"{file} line {number} is not valid JSON: {err}") from err
    return rows


def _json_documents(file: Path, text_column: str) -> Iterator[str]:
    """The ``text_column`` of every row; a null there counts as an empty document."""
    for i, row in enumerate(_json_rows(file)):
        if not isinstance(row, dict):
            raise CorpusError(f"{file} row {i} is a {type(row).__name__}, not an object with a {text_column!r} field")
        if text_column not in row:
            raise CorpusError(f"{file} row {i} has no column {text_column!r} (columns: {sorted(row)}); set data.text_column")
        text = row[text_column]
        if text is not None and not isinstance(text, str):
            raise CorpusError(f"{file} row {i}: column {text_column!r} holds a {type(text).__name__}, not text")
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
        raise CorpusError(f"dataset {cfg.dataset} has no column {cfg.text_column!r} (columns: {columns}); set data.text_column")
    return (row[cfg.text_column] for row in ds)
