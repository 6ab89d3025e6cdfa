"""What every VAE Lab node shares."""

from __future__ import annotations

import functools
import os

CATEGORY = "VAE Lab"
VERSION = "0.1.0"  # keep equal to pyproject.toml (tests check)


#: Which VAE Lab loader reads each family (for refusals that point to the right node).
LOADER_OF_FAMILY = {"kl": "Load VAE Decoder", "tiny": "Load Tiny Autoencoder", "stage_a": "Load Stable Cascade Stage A"}


def summary_ui(text: str, values: dict) -> dict:
    """UI payload: ``text`` is shown on the node by ``web/vae_lab.js``; ``vae_lab`` carries the same
    numbers machine-readably (in /history, for scripts and tests)."""
    return {"text": [text], "vae_lab": [values]}


def file_stamps(paths) -> list:
    """(path, size, mtime) of each file: a cache key that changes when a file is replaced."""
    stamps = []
    for path in paths:
        try:
            stat = os.stat(path)
            stamps.append((path, stat.st_size, stat.st_mtime_ns))
        except (OSError, TypeError):
            stamps.append((path, None, None))
    return stamps


@functools.lru_cache(maxsize=1024)
def _header_keys(path: str, size: int, mtime_ns: int) -> tuple[str, ...]:
    from ..training.files import safetensors_keys

    return tuple(safetensors_keys(path))


def header_keys(path: str) -> tuple[str, ...]:
    """A safetensors file's tensor names, read once per version of the file (combo lists are rebuilt on
    every /object_info, every run and every cache check); () when unreadable."""
    try:
        stat = os.stat(path)
    except OSError:
        return ()
    return _header_keys(path, stat.st_size, stat.st_mtime_ns)
