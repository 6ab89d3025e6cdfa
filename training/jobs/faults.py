"""Fault injection for the crash-safety tests: ``VAE_LAB_FAULT="<phase>@<step>"`` in the worker's environment.

- ``mid-step@N``: SIGKILL inside the decoder's forward pass of the step that starts at step N;
- ``after-temp-write@N`` / ``after-rename@N``: SIGKILL while checkpoint N is written (temporary file complete but not
  renamed / renamed);
- ``latent-cache``: SIGKILL while the first crops are encoded;
- ``nan@N``: three non-finite steps from step N (once), which the worker rolls back;
- ``oom@N``: a CUDA out-of-memory error at step N.

Nothing happens without the variable: ``around_step`` then only calls the step.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable

import torch

ROLLBACK_AFTER = 3  # consecutive non-finite steps before going back to the last checkpoint with half the LR


class Faults:
    def __init__(self, spec: str | None):
        self.phase, self.step = None, -1
        if spec:
            phase, _, step = spec.partition("@")
            self.phase, self.step = phase, int(step or 0)
        self._nan_from = self.step if self.phase == "nan" else None

    def __call__(self, phase: str, step: int | None = None) -> None:
        """SIGKILL this process when ``phase`` (at ``step``) is the one asked for."""
        if self.phase == phase and (step is None or step == self.step):
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    def around_step(self, trainer, step: Callable[[], dict]) -> dict:
        """Runs one training step of ``trainer`` (``step()``), with the fault asked for at this step, if any."""
        if self.phase is None:
            return step()
        at = trainer.step
        if self.phase == "oom" and at == self.step:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected by VAE_LAB_FAULT)")
        decoding = _decoding(trainer.model)
        handles = []
        if self.phase == "mid-step" and at == self.step:
            handles.append(decoding.register_forward_hook(lambda *_: self("mid-step", at)))
        poison = self._nan_from is not None and self._nan_from <= at < self._nan_from + ROLLBACK_AFTER
        if poison:
            handles.append(decoding.register_forward_hook(lambda _m, _i, out: out * float("nan")))
        try:
            logs = step()
        finally:
            for handle in handles:
                handle.remove()
        if poison and trainer.step >= self._nan_from + ROLLBACK_AFTER:
            self._nan_from = None  # injected once: the steps after the rollback run clean
        return logs


def _decoding(model: torch.nn.Module) -> torch.nn.Module:
    """The submodule every decode runs through (``decode`` bypasses ``forward``)."""
    return getattr(model, "decoder", None) or model.up_blocks
