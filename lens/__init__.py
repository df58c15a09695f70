"""lens: tuned lenses and learned translators for transformer language models.

Everything but ``lens.training`` (and the CLI over it) works without Lightning, e.g. in a notebook::

    from lens import load_model, load_lens, capture_residuals, Unembed

The names below are imported on first use, so ``import lens.config`` (and ``lens --help``) stays
quick: torch and transformers load only when a name that needs them is asked for.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "lens.artifacts.registry": ("load_lens", "load_pretrained", "load_span_translator", "resolve_lens", "save_lens"),
    "lens.core.model": ("load_model",),
    "lens.core.residuals": ("capture_residuals", "record_residuals"),
    "lens.core.translators": ("Lens", "LogitLens", "SpanTranslator", "TunedLens", "Unembed", "logit_lens_for"),
}
_HOME = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'lens' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOME[name]), name)
