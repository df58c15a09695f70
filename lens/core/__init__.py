"""The mechanism: where each architecture keeps its parts, model loading, residual capture,
translators (tuned lens, logit lens, span translators), per-token metrics and closed-form fits.
Pure torch + transformers: no Lightning, nothing written to disk."""
