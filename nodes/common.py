"""What every VAE Lab node shares."""
from __future__ import annotations

CATEGORY = "VAE Lab"
VERSION = "0.1.0"  # keep equal to pyproject.toml (tests check)


def summary_ui(text: str, values: dict) -> dict:
    """UI payload: ``text`` is shown on the node by ``web/vae_lab.js``; ``vae_lab`` carries the same
    numbers machine-readably (in /history, for scripts and tests)."""
    return {"text": [text], "vae_lab": [values]}


def file_stamps(paths) -> list:
    """(path, size, mtime) of each file: a cache key that changes when a file is replaced."""
    import os

    stamps = []
    for path in paths:
        try:
            stat = os.stat(path)
            stamps.append((path, stat.st_size, stat.st_mtime_ns))
        except (OSError, TypeError):
            stamps.append((path, None, None))
    return stamps
