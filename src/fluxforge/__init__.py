"""fluxforge: an exact, fast engine for the FLUX.2 image models."""

from fluxforge.config import VARIANTS, Variant, get_variant
from fluxforge.errors import CheckpointError, GenerationCancelled
from fluxforge.pipeline import GenerationRequest, GenerationResult, Pipeline
from fluxforge.weights import Components, load

__all__ = [
    "VARIANTS",
    "CheckpointError",
    "Components",
    "GenerationCancelled",
    "GenerationRequest",
    "GenerationResult",
    "Pipeline",
    "Variant",
    "get_variant",
    "load",
]
__version__ = "0.1.0"
