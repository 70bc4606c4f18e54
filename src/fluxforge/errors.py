"""The project's own exception: what is wrong with a set of checkpoint files."""

from __future__ import annotations

from collections.abc import Sequence


class CheckpointError(Exception):
    """Checkpoint files that cannot be loaded: missing, unreadable, of the wrong model, or with keys that
    do not fit. One error lists every problem found, names the file and the variant it looked like."""

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        variant: str | None = None,
        missing: Sequence[str] = (),
        unexpected: Sequence[str] = (),
        mismatched: Sequence[str] = (),
    ) -> None:
        self.path = path
        self.variant = variant
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)
        lines = [message]
        if path:
            lines.append(f"  file: {path}")
        if variant:
            lines.append(f"  looks like: {variant}")
        for title, keys in (
            ("missing keys", self.missing),
            ("unexpected keys", self.unexpected),
            ("wrong shapes", self.mismatched),
        ):
            if keys:
                lines.append(f"  {title} ({len(keys)}):")
                lines.extend(f"    {k}" for k in keys[:_SHOWN])
                if len(keys) > _SHOWN:
                    lines.append(f"    ... and {len(keys) - _SHOWN} more")
        super().__init__("\n".join(lines))


_SHOWN = 40


class GenerationCancelled(Exception):
    """A generation stopped at a step boundary because its `cancel` event was set."""


class InputTooLarge(ValueError):
    """A request or one of its images is over a size limit (HTTP 413); checked before an image is decoded."""
