"""Exponential moving average of a model's weights.

The decay is defined for a reference batch size and rescaled to the actual one so the averaging
horizon stays fixed in *images*, not steps: ``beta = beta_ref ** (batch / batch_ref)`` (0.999 at batch
192 is 0.99983 at batch 32). Early on, a warm-up ``min(beta, (1 + n) / (10 + n))`` (n = updates so far)
stops the random-ish starting point from dominating for thousands of steps.

The averages are float32 copies, updated in place, whatever dtype the model trains in.
"""

from __future__ import annotations

import torch
from torch import nn


def batch_scaled_decay(decay_ref: float, batch_size: int, batch_size_ref: int) -> float:
    if not 0.0 < decay_ref < 1.0:
        raise ValueError(f"EMA decay must be in (0, 1), got {decay_ref}")
    return decay_ref ** (batch_size / batch_size_ref)


class EMA:
    def __init__(self, model: nn.Module, decay: float, warmup: bool = True):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.updates = 0
        self.shadow = {name: p.detach().float().clone() for name, p in model.named_parameters() if p.requires_grad}
        self.buffers = {name: b.detach().clone() for name, b in model.named_buffers()}

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        weight = 1.0 - self.current_decay()
        for name, param in model.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(param.detach().float(), weight)
        for name, buffer in model.named_buffers():
            self.buffers[name].copy_(buffer)
        self.updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the averaged weights into ``model`` (cast to each parameter's dtype)."""
        for name, param in model.named_parameters():
            if name in self.shadow:
                param.copy_(self.shadow[name].to(param.dtype))
        for name, buffer in model.named_buffers():
            buffer.copy_(self.buffers[name])

    def state_dict(self) -> dict:
        return {
            "decay": self.decay,
            "warmup": self.warmup,
            "updates": self.updates,
            "shadow": {k: v.clone() for k, v in self.shadow.items()},
            "buffers": {k: v.clone() for k, v in self.buffers.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        if set(state["shadow"]) != set(self.shadow):
            missing = sorted(set(self.shadow) - set(state["shadow"]))[:3]
            extra = sorted(set(state["shadow"]) - set(self.shadow))[:3]
            raise ValueError(f"EMA state does not match the model (missing {missing}, unexpected {extra})")
        self.decay, self.warmup, self.updates = state["decay"], state["warmup"], state["updates"]
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)
        for k, v in state["buffers"].items():
            self.buffers[k].copy_(v)
