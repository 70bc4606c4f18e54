"""Model offload for models that do not fit on one device: every network waits on the CPU and moves to the
accelerator for the stage that runs it (text encoding, image encoding, denoising, decoding), then back.

Peak accelerator memory is then the largest network plus its activations instead of all of them, at the
cost of one host-to-device copy per network per request (diffusers' `enable_model_cpu_offload`).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

log = logging.getLogger(__name__)


def accelerator() -> torch.device | None:
    """The accelerator torch sees here (CUDA, then Apple's MPS, then Intel's XPU), or None."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return torch.device("xpu")
    return None


@functools.cache
def say_no_accelerator() -> None:
    """Once per process: offloading was asked for where there is nowhere to offload from."""
    log.warning(
        "offload: there is no accelerator on this machine, so every network stays where it is on the CPU and "
        "offloading changes nothing"
    )


class Offload:
    """Networks kept on `storage` between uses and moved to `device` while a stage runs them."""

    def __init__(self, device: torch.device | str, storage: torch.device | str = "cpu") -> None:
        self.device, self.storage = torch.device(device), torch.device(storage)

    @contextmanager
    def using(self, module: nn.Module | None) -> Iterator[None]:
        if module is None:
            yield
            return
        module.to(self.device)
        try:
            yield
        finally:
            module.to(self.storage)

    def __repr__(self) -> str:
        return f"Offload(device={str(self.device)!r}, storage={str(self.storage)!r})"
