"""Reading weight files safely: safetensors, or torch pickles through ``weights_only=True`` only."""
from __future__ import annotations

import os
import pickle

import torch

PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")


class WeightFileError(ValueError):
    """A weight file that cannot be used; the message names the file and what to do."""


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file, or of a torch pickle loaded with ``weights_only=True``.

    A pickle that needs arbitrary code to load is refused, never executed.
    """
    return read_weight_file(path)[0]


def read_weight_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata): safetensors' ``__metadata__`` strings, or {} for torch pickles."""
    path = os.fspath(path)
    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise WeightFileError(f"{path}: no such file")
    if os.path.getsize(path) == 0:
        raise WeightFileError(f"{name}: the file is empty (an interrupted download?). Download it again.")
    if path.lower().endswith(".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118 (safe_open is not iterable)
        except Exception as exc:  # safetensors raises its own error types for truncated/corrupt headers
            raise WeightFileError(f"{name}: not a readable safetensors file ({exc}). Download it again.") from exc
    if not path.lower().endswith(PICKLE_SUFFIXES):
        raise WeightFileError(f"{name}: unknown weight file type; use .safetensors, .pt, .pth, .ckpt or .bin")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise WeightFileError(
            f"{name}: refused: this pickle needs arbitrary code to load ({str(exc).splitlines()[0]}). "
            "Use a .safetensors version of the file, or convert it yourself only if you trust its source."
        ) from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise WeightFileError(f"{name}: not a readable torch file ({exc}). It may be truncated: download it again.") from exc
    if isinstance(payload, dict) and isinstance(payload.get("state_dict"), dict):
        payload = payload["state_dict"]
    if not isinstance(payload, dict) or not all(isinstance(v, torch.Tensor) for v in payload.values()):
        raise WeightFileError(f"{name}: holds no state dict of tensors")
    return payload, {}


def safetensors_keys(path: str | os.PathLike) -> list[str]:
    """Tensor names from a safetensors header, without reading the tensors ([] if unreadable)."""
    import json
    import struct

    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > 100_000_000:
                return []
            header = json.loads(f.read(size))
    except (OSError, ValueError, struct.error):
        return []
    return [k for k in header if k != "__metadata__"]
