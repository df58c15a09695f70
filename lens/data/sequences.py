"""Documents in, fixed-length token sequences out, with a held-out split chosen per document.

Documents are joined with the tokenizer's EOS and packed into ``seq_len`` chunks (the last
partial chunk is dropped), as tuned-lens does. A document goes to the held-out split when a hash
of its index says so, which needs no shuffle buffer and works the same when streaming.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from itertools import islice
from typing import Iterable, Iterator

import torch
from transformers import PreTrainedTokenizerBase

from lens.config import DataConfig
from lens.data.documents import CorpusError, iter_documents

log = logging.getLogger(__name__)


def is_held_out(doc_index: int, eval_percent: float) -> bool:
    digest = hashlib.blake2b(str(doc_index).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % 10_000 < eval_percent * 100


@dataclass
class PackCount:
    """What one packing pass saw of its split, for the error when it yields nothing."""

    documents: int = 0
    """Documents of the corpus, either split."""
    used: int = 0
    """Non-empty documents of this split."""
    empty: int = 0
    tokens: int = 0


def pack_sequences(
    documents: Iterable[str],
    tokenizer: PreTrainedTokenizerBase,
    seq_len: int,
    held_out: bool,
    eval_percent: float,
    count: PackCount | None = None,
) -> Iterator[torch.Tensor]:
    """Yield ``[seq_len]`` token sequences from the train (or held-out) documents.

    Empty documents (blank lines of wikitext, null rows) are skipped; how many is logged once the
    pass ends, so a corpus that is mostly empty does not go unnoticed.
    """
    eos = tokenizer.eos_token_id
    buffer: list[int] = []
    count = count if count is not None else PackCount()
    try:
        for index, text in enumerate(documents):
            count.documents += 1
            if is_held_out(index, eval_percent) != held_out:
                continue
            if not text or not text.strip():
                count.empty += 1
                continue
            count.used += 1
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            count.tokens += len(ids) + 1
            buffer.extend(ids)
            buffer.append(eos)
            while len(buffer) >= seq_len:
                yield torch.tensor(buffer[:seq_len])
                buffer = buffer[seq_len:]
    finally:
        if count.empty:
            split = "held-out" if held_out else "training"
            log.warning("skipped %d empty %s documents (%d used so far)", count.empty, split, count.used)


def token_sequences(
    cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, held_out: bool, limit: int | None, count: PackCount | None = None
) -> Iterator[torch.Tensor]:
    """The split's sequences ``[seq_len]``, the first ``limit`` (None: all), streamed."""
    yield from islice(pack_sequences(iter_documents(cfg), tokenizer, cfg.seq_len, held_out, cfg.eval_percent, count), limit)


def load_sequences(
    cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, held_out: bool, limit: int | None
) -> torch.Tensor:
    """All sequences of one split as ``[n, seq_len]``; an error saying why if there are none."""
    count = PackCount()
    seqs = list(token_sequences(cfg, tokenizer, held_out, limit, count))
    if seqs:
        return torch.stack(seqs)
    split = "held-out" if held_out else "training"
    if count.documents == 0:
        why = "the corpus holds no documents"
    elif count.used == 0:
        share = f"data.eval_percent={cfg.eval_percent:g} puts {'none' if held_out else 'all'} of its {count.documents} documents"
        why = f"{share} in the held-out split" + (" (or they are empty)" if count.empty else "") + ": change data.eval_percent"
    else:
        why = (
            f"its {count.used} {split} documents hold {count.tokens} tokens, fewer than one sequence: the corpus is too "
            "small for data.seq_len; lower data.seq_len or add text"
        )
    raise CorpusError(f"no {split} sequences of {cfg.seq_len} tokens from {cfg.dataset!r}: {why}")
