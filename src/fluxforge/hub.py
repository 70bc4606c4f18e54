"""Model names as users type them: a Hugging Face hub repository id stands for its local snapshot.

`resolve("black-forest-labs/FLUX.2-klein-4B")` returns the folder of that repository's snapshot: downloaded
(the diffusers layout only: model_index.json and the component folders, not the BFL single files beside
them) when the hub can be reached, else the copy in the local cache (`HF_HUB_CACHE`, `HF_HOME`;
`HF_HUB_OFFLINE=1` never tries the network). A local path of the same name always wins.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from fluxforge.errors import CheckpointError

log = logging.getLogger(__name__)

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")
_DIFFUSERS_FILES = ["model_index.json", "*/*"]  # the diffusers folders, not the BFL files at the top


def resolve(path: str | Path) -> Path:
    """`path` itself when it exists or is no repository id; otherwise the repository's local snapshot."""
    local = Path(path)
    if (
        local.exists()
        or not isinstance(path, str)
        or not _REPO_ID.fullmatch(path)
        or path.endswith(".safetensors")
    ):
        return local
    try:
        import huggingface_hub
        from huggingface_hub import errors
    except ImportError:
        raise CheckpointError(
            f"{path!r} is neither a local path nor loadable: hub ids need huggingface_hub (pip install "
            "huggingface_hub)"
        ) from None
    try:
        folder = huggingface_hub.snapshot_download(path, allow_patterns=_DIFFUSERS_FILES)
    except (errors.RepositoryNotFoundError, errors.GatedRepoError) as exc:
        raise CheckpointError(
            f"{path!r} is no local path, and the hub refuses it ({type(exc).__name__}: the repository does "
            "not exist, or it is gated: accept its licence on the hub and log in with `hf auth login`)"
        ) from None
    except (errors.LocalEntryNotFoundError, errors.HfHubHTTPError, OSError, ValueError) as exc:
        # snapshot_download falls back to the cache when the hub cannot be reached: neither had it
        from huggingface_hub import constants

        raise CheckpointError(
            f"{path!r} is no local path, and it cannot be had: the hub could not be reached (or "
            f"HF_HUB_OFFLINE is set) and the local cache {constants.HF_HUB_CACHE} holds no snapshot of it "
            f"({exc}). Download it where there is a network (`hf download {path}`), or pass the folder itself"
        ) from None
    log.info("%s: using the hub snapshot in %s", path, folder)
    return Path(folder)
