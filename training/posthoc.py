"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", EDM2):
the trainer keeps snapshots of two power-function EMAs (``PowerEmaSnapshots``); after training, the decoder for any
EMA length is rebuilt from them by least squares (``posthoc_ema``), and ``posthoc_table`` measures several lengths."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from . import metrics

POWER_EMA_SIGMA_RELS = (0.05, 0.10)


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """EDM2 eq. (3): the power-function exponent whose EMA has relative width ``sigma_rel``."""
    t = sigma_rel**-2
    return float(np.roots([1, 7, 16 - t, 12 - t]).real.max())


class PowerEmaSnapshots:
    """Two power-function EMAs (beta_t = (1 - 1/t)^(gamma + 1)) and count-bounded fp16 snapshots of
    both, from which any EMA length can be reconstructed after training (least squares over the
    snapshots' profiles; see the comparison nodes). When a list is full, every other snapshot is
    dropped and the interval doubles, so snapshots stay evenly spread over the whole run."""

    def __init__(self, params: dict[str, nn.Parameter], max_snapshots: int = 16, interval: int = 8):
        self.params = params
        self.gammas = [sigma_rel_to_gamma(s) for s in POWER_EMA_SIGMA_RELS]
        self.averages = [{k: p.detach().float().clone() for k, p in params.items()} for _ in self.gammas]
        self.max_snapshots, self.interval = max_snapshots, interval
        self.snapshots: list[dict] = []  # {"step", "gamma", "tensors"}

    @torch.no_grad()
    def update(self, t: int) -> None:
        for gamma, average in zip(self.gammas, self.averages):
            beta = (1 - 1 / t) ** (gamma + 1) if t > 1 else 0.0
            for k, p in self.params.items():
                average[k].lerp_(p.detach().float(), 1 - beta)
        if t % self.interval == 0:
            for gamma, average in zip(self.gammas, self.averages):
                self.snapshots.append(
                    {"step": t, "gamma": gamma, "tensors": {k: v.half().clone() for k, v in average.items()}}
                )
            if len(self.snapshots) > 2 * self.max_snapshots:
                kept = sorted({s["step"] for s in self.snapshots})[1::2]
                self.snapshots = [s for s in self.snapshots if s["step"] in kept]
                self.interval *= 2

    def state_dict(self) -> dict:
        return {
            "gammas": list(self.gammas),
            "interval": self.interval,
            "max_snapshots": self.max_snapshots,
            "averages": [{k: v.clone() for k, v in a.items()} for a in self.averages],
            "snapshots": [{**s, "tensors": dict(s["tensors"])} for s in self.snapshots],
        }

    def load_state_dict(self, state: dict) -> None:
        self.gammas, self.interval = list(state["gammas"]), state["interval"]
        self.max_snapshots = state["max_snapshots"]
        for average, saved in zip(self.averages, state["averages"]):
            for k, v in saved.items():
                average[k].copy_(v)
        self.snapshots = [{**s, "tensors": dict(s["tensors"])} for s in state["snapshots"]]


# ----------------------------------------------------------------------------------------------
# post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", §3)
#
# A power-function EMA with exponent gamma, read at step t, weighs the weights of step tau by
# p(tau) = (gamma + 1) tau^gamma / t^(gamma + 1) on [0, t]. Any such profile is approximated by a linear
# combination of the saved snapshots' profiles, with coefficients from least squares in L2 over tau;
# the inner products have a closed form, and the same coefficients combine the snapshots' tensors.


def _profile_inner(t_a: float, g_a: float, t_b: float, g_b: float) -> float:
    """∫ p_a p_b dτ for two power-function profiles (see above)."""
    low = min(t_a, t_b)
    return ((g_a + 1) * (g_b + 1) * low ** (g_a + g_b + 1)) / ((g_a + g_b + 1) * t_a ** (g_a + 1) * t_b ** (g_b + 1))


def posthoc_coefficients(snapshots: list[tuple[int, float]], target_step: int, target_gamma: float) -> np.ndarray:
    """Least-squares coefficients of the snapshots [(step, gamma)] that best match the profile
    (target_step, target_gamma)."""
    if not snapshots:
        raise ValueError("no post-hoc EMA snapshots: train with posthoc_ema on")
    n = len(snapshots)
    gram = np.empty((n, n))
    rhs = np.empty(n)
    for i, (t_i, g_i) in enumerate(snapshots):
        rhs[i] = _profile_inner(t_i, g_i, target_step, target_gamma)
        for j, (t_j, g_j) in enumerate(snapshots):
            gram[i, j] = _profile_inner(t_i, g_i, t_j, g_j)
    coefficients, *_ = np.linalg.lstsq(gram, rhs, rcond=None)
    return coefficients


def posthoc_ema(snapshots: list[dict], sigma_rel: float, target_step: int | None = None) -> dict[str, torch.Tensor]:
    """Decoder tensors of an EMA of relative length ``sigma_rel`` read at ``target_step`` (default: the last
    snapshot), reconstructed from the snapshots the trainer kept ({'step', 'gamma', 'tensors'})."""
    if not 0.01 <= sigma_rel <= 0.3:
        raise ValueError(f"sigma_rel {sigma_rel}: choose an EMA length between 0.01 and 0.3 (EDM2 uses 0.05-0.15)")
    if not snapshots:
        raise ValueError("no post-hoc EMA snapshots: train with posthoc_ema on")
    target_step = target_step or max(s["step"] for s in snapshots)
    coefficients = posthoc_coefficients(
        [(s["step"], s["gamma"]) for s in snapshots], target_step, sigma_rel_to_gamma(sigma_rel)
    )
    result = {}
    for key in snapshots[0]["tensors"]:
        total = torch.zeros(snapshots[0]["tensors"][key].shape, dtype=torch.float64)
        for c, snapshot in zip(coefficients, snapshots):
            total += float(c) * snapshot["tensors"][key].double()
        result[key] = total.float()
    return result


def posthoc_table(
    model: torch.nn.Module,
    snapshots: list[dict],
    lengths: list[float],
    latents: torch.Tensor,
    reference01: torch.Tensor,
    chosen: float | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """Per-image metrics of the decoder rebuilt at each EMA length (``model`` holds the decoder; its weights are
    replaced in turn), for a table that makes the choice of length visible."""
    rows = {}
    with torch.no_grad():
        for length in sorted(set(lengths)):
            model.load_state_dict(posthoc_ema(snapshots, length), strict=False)
            label = f"σ_rel {length:g}" + (" (chosen)" if chosen is not None and abs(length - chosen) < 1e-9 else "")
            rows[label] = metrics.reconstruction_metrics(model.decode(latents.float()), reference01)
    return rows
