"""lens: tuned lenses and learned translators for transformer language models.

The core (this package minus ``lens.training``) works without Lightning, e.g. in a notebook::

    from lens import load_model, load_lens, capture_residuals
"""

from lens.io import load_lens, logit_lens_for, save_lens
from lens.model import load_model
from lens.residuals import capture_residuals, record_residuals
from lens.translators import Lens, LogitLens, TunedLens, Unembed

__all__ = [
    "Lens",
    "LogitLens",
    "TunedLens",
    "Unembed",
    "capture_residuals",
    "load_lens",
    "load_model",
    "logit_lens_for",
    "record_residuals",
    "save_lens",
]
