"""Corpora in, token sequences out: the embedded default corpus (``corpus``), documents from local
files or ``datasets`` (``documents``), packing and the held-out split (``sequences``), and the
seeded, resumable training-batch stream (``batches``)."""
