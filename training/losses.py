"""Reconstruction losses in Oklab.

``oklab_loss`` mixes MAE and MSE of the per-channel Oklab differences:

    loss = sum_c w_c * mean[(1 - mix) * |d_c| + mix * d_c**2 / mse_scale] / sum_c w_c

Two choices make the mix and the weights mean something (``TRAINING.md`` measured both failing):

* ``mse_scale`` (default 0.01, about the typical per-channel error of a good decoder): raw MSE of errors
  that small is 50-100x smaller than MAE, so a raw "MAE + MSE" mix is L1 in disguise. Dividing the squared
  error by ``mse_scale`` puts both terms in the same units: at an error of ``mse_scale`` they are equal,
  below it MAE pulls harder (robust to outliers), above it MSE does (punishes large misses).
* ``channel_weights`` (default L 1, a 2, b 2): over the sRGB gamut L spans 1.0 but a and b span only
  ~0.51 each, and a decoder's L errors run ~3x its a/b errors (TAEF2 on the bundled photos: |dL| 0.015,
  |da| 0.0055, |db| 0.0050). Weighting a and b by 2 equalises the ranges; measured on TAEF2's
  reconstructions of the bundled photos, chroma then carries 37 % of the default loss (mix 0.5) instead
  of 23 %, and 57 % instead of 40 % of pure MAE. Oklab distances are perceptual as they stand, so more
  than 2 would overweight colour; less lets lightness (which LPIPS and the discriminator also police)
  swamp the colour shifts this loss is there to catch.

The weights are normalised, so changing them changes the balance, not the loss scale.
"""
from __future__ import annotations

import torch

from .oklab import oklab_from_srgb

DEFAULT_CHANNEL_WEIGHTS = (1.0, 2.0, 2.0)
DEFAULT_MSE_SCALE = 0.01


def oklab_difference(output01: torch.Tensor, reference01: torch.Tensor) -> torch.Tensor:
    """Per-pixel (ΔL, Δa, Δb), shape (B, 3, H, W), computed in float32."""
    if output01.shape != reference01.shape:
        raise ValueError(f"output {tuple(output01.shape)} and reference {tuple(reference01.shape)} differ in shape")
    return oklab_from_srgb(output01) - oklab_from_srgb(reference01)


def oklab_loss(
    output01: torch.Tensor,
    reference01: torch.Tensor,
    mse_mix: float = 0.5,
    channel_weights: tuple[float, float, float] = DEFAULT_CHANNEL_WEIGHTS,
    mse_scale: float = DEFAULT_MSE_SCALE,
    reduce: bool = True,
) -> torch.Tensor:
    """MAE/MSE mix in Oklab (see module docstring). ``mse_mix`` 0 is pure MAE, 1 pure (scaled) MSE.

    Returns a scalar, or one value per image with ``reduce=False``."""
    if not 0.0 <= mse_mix <= 1.0:
        raise ValueError(f"mse_mix must be in [0, 1], got {mse_mix}")
    if mse_scale <= 0:
        raise ValueError(f"mse_scale must be positive, got {mse_scale}")
    weights = torch.as_tensor(channel_weights, dtype=torch.float32, device=output01.device)
    if weights.shape != (3,) or bool((weights < 0).any()) or float(weights.sum()) <= 0:
        raise ValueError(f"channel_weights must be three non-negative numbers, not all zero; got {channel_weights}")
    diff = oklab_difference(output01, reference01)
    per_pixel = (1 - mse_mix) * diff.abs() + mse_mix * diff.pow(2) / mse_scale
    per_channel = per_pixel.flatten(2).mean(2)  # (B, 3)
    per_image = (per_channel * weights).sum(1) / weights.sum()
    return per_image.mean() if reduce else per_image
