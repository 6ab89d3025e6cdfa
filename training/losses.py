"""Reconstruction losses in Oklab.

``oklab_loss`` mixes MAE and MSE of the per-channel Oklab differences:

    loss = sum_c w_c * mean[(1 - mix) * |d_c| + mix * d_c**2 / mse_scale] / sum_c w_c

Two choices make the mix and the weights mean something (docs/architecture.md, "Oklab loss weights", has the
measurements):

* ``mse_scale`` (default 0.01, about the typical per-channel error of a good decoder): raw MSE of errors
  that small is far smaller than MAE, so a raw "MAE + MSE" mix is L1 in disguise. Dividing the squared
  error by ``mse_scale`` puts both terms in the same units: at an error of ``mse_scale`` they are equal,
  below it MAE pulls harder (robust to outliers), above it MSE does (punishes large misses).
* ``channel_weights`` (default L 1, a 2, b 2): over the sRGB gamut L spans 1.0 but a and b only about half
  that each, and a decoder's L errors run larger than its a/b errors. Weighting a and b by 2 equalises the
  ranges. Oklab distances are perceptual as they stand, so more than 2 would overweight colour; less lets
  lightness (which LPIPS and the discriminator also police) swamp the colour shifts this loss is there to catch.

The weights are normalised, so changing them changes the balance, not the loss scale.

Below them, the finetuning objective ``DecoderFinetune.train_step`` uses: the pixel loss of a recipe (Oklab or RGB,
MAE<->MSE on a schedule, seen through an optional fine-band blur) and the optional detail-energy term.
"""

from __future__ import annotations

import math

import torch

from . import metrics
from .oklab import oklab_difference
from .recipes import Recipe

DEFAULT_CHANNEL_WEIGHTS = (1.0, 2.0, 2.0)
DEFAULT_MSE_SCALE = 0.01


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


# ----------------------------------------------------------------------------------------------
# the finetuning objective (DecoderFinetune.train_step): pixel, detail


def mse_mix_at(recipe: Recipe, step: int) -> float:
    """Share of MSE in the MAE<->MSE mix: cosine from start to end over ``mse_mix_steps``."""
    t = min(1.0, step / max(1, recipe.mse_mix_steps))
    return recipe.mse_mix_end + (recipe.mse_mix_start - recipe.mse_mix_end) * 0.5 * (1 + math.cos(math.pi * t))


def pixel_loss(out01: torch.Tensor, target01: torch.Tensor, recipe: Recipe, step: int) -> torch.Tensor:
    """The reconstruction loss of ``recipe`` at ``step``.

    With ``recipe.pixel_blur`` = c > 0 the loss compares T·out = (1 - c)·out + c·B·out with the target, B the
    detail ratio's [1,4,6,4,1]/16 blur. A pixel loss alone is minimised by the blurred average of what the
    decoder cannot place exactly (held-out detail ratio 0.66 on TAEF2); seen through T, its minimiser is
    T⁻¹ of that average: the same estimate with the finest band raised by up to 1/(1 - c), which restores the
    detail energy at the smallest PSNR cost (a scaled average, not invented texture). docs/recipes.md has the
    measurements behind the default c = 0.3."""
    if recipe.pixel_blur > 0:
        out01 = torch.lerp(out01, metrics.binomial_blur(out01), recipe.pixel_blur)
    mix = mse_mix_at(recipe, step)
    if recipe.pixel_space == "oklab":
        return oklab_loss(
            out01, target01, mse_mix=mix, channel_weights=recipe.oklab_weights, mse_scale=recipe.mse_scale
        )
    diff = (out01 - target01) * 2  # LDM's losses are on [-1, 1] images
    return (1 - mix) * diff.abs().mean() + mix * diff.pow(2).mean()


def detail_loss(out01: torch.Tensor, reference_energy: torch.Tensor) -> torch.Tensor:
    """Squared log-ratio of each image's high-frequency energy (``metrics.high_frequency_energy``, what the
    detail ratio measures) to a reference energy per image.

    Pixel losses reach their optimum by blurring what the decoder cannot place exactly; this term makes
    blurring cost as much as inventing detail, so PSNR has to come from getting things right. The default
    reference is the decoder's own output before training, not the target: on Lanczos-downscaled training
    crops a good pretrained decoder sits at ~0.95 of the target's energy, and pushing it to 1.0 there
    over-sharpens everything else (held-out detail ratio 1.04 -> 1.13 in bench/efficacy.py)."""
    energy_out = metrics.high_frequency_energy(out01)
    return torch.log((energy_out + 1e-6) / (reference_energy.to(energy_out) + 1e-6)).pow(2).mean()


def quantize_straight_through(images01: torch.Tensor) -> torch.Tensor:
    """8-bit values forward, identity gradient backward."""
    return images01 + ((images01 * 255).round() / 255 - images01).detach()
