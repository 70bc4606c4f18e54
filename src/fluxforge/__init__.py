"""fluxforge: an exact, fast engine for the FLUX.2 image models."""

from fluxforge.config import VARIANTS, Variant, get_variant
from fluxforge.errors import CheckpointError

__all__ = ["VARIANTS", "CheckpointError", "Variant", "get_variant"]
__version__ = "0.1.0"
