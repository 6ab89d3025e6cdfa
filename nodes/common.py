"""What every VAE Lab node shares."""
from __future__ import annotations

CATEGORY = "VAE Lab"


def summary_ui(text: str, values: dict) -> dict:
    """UI payload: ``text`` is shown on the node by ``web/vae_lab.js``; ``vae_lab`` carries the same
    numbers machine-readably (in /history, for scripts and tests)."""
    return {"text": [text], "vae_lab": [values]}
