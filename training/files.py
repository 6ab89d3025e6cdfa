"""Files: weight files read safely (safetensors, or torch pickles through ``weights_only=True`` only), and
``atomic_write``, the one crash-safe writer (temporary file, fsync, rename) every file that must survive a crash
uses."""

from __future__ import annotations

import json
import os
import pickle
import threading
import time
from collections.abc import Callable

import torch

PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")


class WeightFileError(ValueError):
    """A weight file that cannot be used; the message names the file and what to do."""


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file, or of a torch pickle loaded with ``weights_only=True``.

    A pickle that needs arbitrary code to load is refused, never executed.
    """
    return read_weight_file(path)[0]


def read_weight_file(path: str | os.PathLike, prefix: str = "") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata): safetensors' ``__metadata__`` strings, or {} for torch pickles.

    With ``prefix``, only tensors whose names start with it are read (a safetensors file reads just
    those bytes: the stage A inside a 4 GB stage-B checkpoint costs ~80 MB; a pickle is memory-mapped).
    """
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
                return (
                    {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)},  # noqa: SIM118 (not iterable)
                    dict(f.metadata() or {}),
                )
        except Exception as exc:  # safetensors raises its own error types for truncated/corrupt headers
            raise WeightFileError(f"{name}: not a readable safetensors file ({exc}). Download it again.") from exc
    if not path.lower().endswith(PICKLE_SUFFIXES):
        raise WeightFileError(f"{name}: unknown weight file type; use .safetensors, .pt, .pth, .ckpt or .bin")
    try:
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:  # the legacy (non-zip) format cannot be memory-mapped
            if "mmap" not in str(exc):
                raise
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise WeightFileError(
            f"{name}: refused: this pickle needs arbitrary code to load ({str(exc).splitlines()[0]}). "
            "Use a .safetensors version of the file, or convert it yourself only if you trust its source."
        ) from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise WeightFileError(
            f"{name}: not a readable torch file ({exc}). It may be truncated: download it again."
        ) from exc
    if isinstance(payload, dict) and isinstance(payload.get("state_dict"), dict):
        payload = payload["state_dict"]
    if not isinstance(payload, dict) or not all(isinstance(v, torch.Tensor) for v in payload.values()):
        raise WeightFileError(f"{name}: holds no state dict of tensors")
    return {k: v for k, v in payload.items() if k.startswith(prefix)}, {}


def wrapped_part(keys) -> str:
    """The prefix of the VAE inside a bigger checkpoint (``first_stage_model.`` of an SD checkpoint,
    ``vae.`` of a stage-B or FLUX checkpoint), so only that part is read; '' for a plain VAE file."""
    keys = list(keys)
    for prefix in ("first_stage_model.", "vae."):
        inside = sum(k.startswith(prefix) for k in keys)
        if 0 < inside < len(keys):
            return prefix
    return ""


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


def atomic_write(
    path: str | os.PathLike, write: Callable[[str], None], before_rename: Callable[[], None] | None = None
) -> str:
    """Writes ``path`` so that it is either the old file or the complete new one, never a torn write: ``write(tmp)``
    writes a temporary file in the same folder (named for this process and thread), which is fsynced, renamed over
    ``path`` (retried briefly on Windows while a reader holds it) and the folder fsynced. A failure removes the
    temporary file; a killed process leaves one behind, ``.<name>.<pid>.<thread>.tmp``, which no reader lists.
    ``before_rename`` runs between the fsync and the rename (fault injection). The one writer every file of VAE Lab
    that must survive a crash goes through."""
    path = os.fspath(path)
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    temporary = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        write(temporary)
        with open(temporary, "rb") as f:
            os.fsync(f.fileno())
        if before_rename is not None:
            before_rename()
        replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    fsync_folder(folder)
    return path


def replace(source: str, destination: str) -> None:
    """os.replace, retried briefly on Windows, where it fails while another process (the panel's route, Load Finetune
    Job) has the destination open."""
    for attempt in range(50):
        try:
            os.replace(source, destination)
            return
        except PermissionError:
            if os.name != "nt" or attempt == 49:
                raise
            time.sleep(0.02)


def fsync_folder(folder: str) -> None:
    """Makes a rename in ``folder`` durable (POSIX; a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_json(path: str, default=None):
    """A JSON file's value, or ``default`` when it is missing or not (yet) valid JSON."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


def write_json_atomic(path: str, value) -> None:
    def write(temporary: str) -> None:
        with open(temporary, "w") as f:
            json.dump(value, f, indent=1)

    atomic_write(path, write)


def save_safetensors_atomic(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> str:
    """A safetensors file written with ``atomic_write``. Non-finite tensors are refused."""
    from safetensors.torch import save_file

    path = os.fspath(path)
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise WeightFileError(f"{os.path.basename(path)}: not written: non-finite values in {bad[:3]}")
    contiguous = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return atomic_write(
        path,
        lambda temporary: save_file(contiguous, temporary, metadata={k: str(v) for k, v in (metadata or {}).items()}),
    )


def sha256_of_file(path: str | os.PathLike) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
