"""Packing and splitting: held-out documents never reach training, streaming matches in-memory."""

from itertools import islice

import pytest
import torch

from lens.config import DataConfig
from lens.data.sequences import is_held_out, load_sequences, pack_sequences
from lens.training.datamodule import LensDataModule


def test_packing_joins_documents_with_eos(tokenizer):
    docs = ["alpha beta gamma", "delta epsilon"]
    seqs = list(pack_sequences(docs, tokenizer, seq_len=4, held_out=False, eval_percent=0))
    flat = torch.cat(seqs).tolist()
    expected = []
    for doc in docs:
        expected += tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert all(len(s) == 4 for s in seqs)
    assert flat == expected[: len(flat)] and len(expected) - len(flat) < 4


def test_held_out_split_is_disjoint(tokenizer):
    docs = [f"document number {i} says something" for i in range(200)]
    train = list(pack_sequences(docs, tokenizer, 1000, held_out=False, eval_percent=20))
    held = [d for i, d in enumerate(docs) if is_held_out(i, 20)]
    assert 20 <= len(held) <= 60
    train_text = tokenizer.decode(torch.cat(train)) if train else ""
    assert not any(d in train_text for d in held)


def test_streaming_yields_the_same_batches_as_in_memory(tokenizer, corpus_file):
    cfg = DataConfig(dataset=str(corpus_file), seq_len=16, batch_size=2, eval_percent=20)
    in_memory = LensDataModule(cfg, tokenizer)
    streamed = LensDataModule(DataConfig(**{**cfg.__dict__, "streaming": True}), tokenizer)
    for dm in (in_memory, streamed):
        dm.setup("fit")
    all_train = load_sequences(cfg, tokenizer, held_out=False, limit=None)
    streamed_batches = torch.cat([b[0] for b in islice(streamed.train_dataloader(), 3)])
    assert torch.equal(streamed_batches, all_train[: len(streamed_batches)])
    assert torch.equal(in_memory.val_sequences, streamed.val_sequences)


def test_too_small_corpus_is_a_clear_error(tokenizer, tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("just a few words")
    with pytest.raises(ValueError, match="too small"):
        load_sequences(DataConfig(dataset=str(path), seq_len=512, eval_percent=0), tokenizer, held_out=False, limit=None)
