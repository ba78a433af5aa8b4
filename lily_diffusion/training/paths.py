"""Early checks of the folders a run writes into, so a bad path fails before any expensive work."""

from __future__ import annotations

import tempfile
from pathlib import Path

from .data import os_reason
from .errors import TrainingError


def nearest_existing(path: Path) -> Path:
    """`path` itself if it exists, else its closest existing ancestor."""
    existing = path
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    return existing


def check_writable_folder(folder: str | Path, flag: str) -> None:
    """TrainingError unless `folder` is a folder this process can write into, or one it can create.

    Writes nothing that stays: the probe is an unnamed temporary file in the folder or its closest existing
    ancestor (root passes permission bits, a read-only file system does not)."""
    path = Path(folder)
    try:
        existing = nearest_existing(path)
        if not existing.is_dir():
            where = "is a file" if existing == path else f"is under a file ({existing})"
            raise TrainingError(f"{flag} {path} {where}, not a folder")
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise TrainingError(f"{flag} {path} is not writable ({os_reason(err)})") from err
