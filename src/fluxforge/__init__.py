"""fluxforge: an exact, fast engine for the FLUX.2 image models.

The names below are imported on first use, so that `fluxforge --help` answers without loading torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fluxforge.config import VARIANTS, Variant, get_variant
    from fluxforge.errors import CheckpointError, GenerationCancelled
    from fluxforge.pipeline import GenerationRequest, GenerationResult, Pipeline
    from fluxforge.weights import Components, load

_HOMES = {
    "VARIANTS": "config",
    "Variant": "config",
    "get_variant": "config",
    "CheckpointError": "errors",
    "GenerationCancelled": "errors",
    "GenerationRequest": "pipeline",
    "GenerationResult": "pipeline",
    "Pipeline": "pipeline",
    "Components": "weights",
    "load": "weights",
}
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


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'fluxforge' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"fluxforge.{_HOMES[name]}"), name)
    globals()[name] = value
    return value
