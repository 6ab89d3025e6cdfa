"""Checkpoints: ``checkpoints/step_<8-digit step>.pt`` in a job folder, the trainer's whole state, written atomically
(the last ``keep_last`` kept) and read back with ``weights_only=True``; one that does not load is skipped."""

from __future__ import annotations

import os
import re

import torch

from .. import finetune
from ..files import atomic_write
from .folder import JobError

CHECKPOINT = re.compile(r"^step_(\d{8})\.pt$")


def checkpoint_paths(folder: str) -> list[str]:
    """Complete checkpoint files, newest first (temporary files are never listed)."""
    directory = os.path.join(folder, "checkpoints")
    try:
        names = [n for n in os.listdir(directory) if CHECKPOINT.match(n)]
    except OSError:
        return []
    return [os.path.join(directory, n) for n in sorted(names, reverse=True)]


def checkpoint_path(folder: str, step: int) -> str:
    return os.path.join(folder, "checkpoints", f"step_{step:08d}.pt")


def checkpoint_step(path: str) -> int:
    return int(CHECKPOINT.match(os.path.basename(path)).group(1))


def checkpoint_at(folder: str, step: int) -> dict:
    """The checkpoint of ``step``; a JobError names the steps kept when there is none (or it does not load)."""
    path = checkpoint_path(folder, step)
    if not os.path.isfile(path):
        kept = [checkpoint_step(p) for p in checkpoint_paths(folder)]
        raise JobError(
            f"{os.path.basename(folder)} has no checkpoint of step {step}; it keeps steps {kept} (0 = the newest)"
        )
    return load_checkpoint(path)


def load_checkpoint(path: str) -> dict:
    """A checkpoint's state, checked: it loads with weights_only, has the trainer's format, and its step is
    the one in its name. Raises JobError otherwise."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torn/truncated zip, unpickling errors: all mean "not usable"
        raise JobError(f"{os.path.basename(path)}: unreadable ({type(exc).__name__}: {str(exc)[:120]})") from exc
    expected = checkpoint_step(path)
    if not isinstance(state, dict) or state.get("format") != finetune.STATE_FORMAT or state.get("step") != expected:
        raise JobError(f"{os.path.basename(path)}: not a training state for step {expected}")
    return state


def latest_checkpoint(folder: str, log=None) -> dict | None:
    """The newest checkpoint that loads; broken ones are reported through ``log`` and skipped."""
    for path in checkpoint_paths(folder):
        try:
            return load_checkpoint(path)
        except JobError as exc:
            if log:
                log(f"skipped a broken checkpoint: {exc}")
    return None


def save_checkpoint(folder: str, state: dict, keep_last: int, fault=lambda phase, step=None: None) -> str:
    """temp + fsync + rename, then the oldest beyond ``keep_last`` removed. Non-finite weights are refused."""
    bad = [k for k, v in state["decoder"].items() if not torch.isfinite(v).all()]
    if bad:
        raise JobError(f"refusing to checkpoint non-finite weights ({bad[:3]})")
    path = checkpoint_path(folder, state["step"])
    atomic_write(
        path,
        lambda temporary: torch.save(state, temporary),
        before_rename=lambda: fault("after-temp-write", state["step"]),
    )
    fault("after-rename", state["step"])
    for old in checkpoint_paths(folder)[keep_last:]:
        os.remove(old)
    return path
