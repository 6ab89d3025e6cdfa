"""Reconstruction metrics on batches of images in [0, 1], shape (B, 3, H, W), one value per image.

The decoder output is clamped to [0, 1] first (that is what a user sees once it is saved); the reference
is taken as given. Conventions follow the published VAE model cards' evaluation: PSNR with a
data range of 1, SSIM with an 11x11 Gaussian window (sigma 1.5, K1 0.01, K2 0.03) averaged over the
valid region and the channels, exactly as scikit-image computes it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .oklab import oklab_difference


def _prepare(output01: torch.Tensor, reference01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if output01.shape != reference01.shape:
        raise ValueError(f"output {tuple(output01.shape)} and reference {tuple(reference01.shape)} differ in shape")
    if output01.ndim != 4:
        raise ValueError(f"expected (B, C, H, W) images, got shape {tuple(output01.shape)}")
    return output01.float().clamp(0, 1), reference01.float()


def psnr(output01: torch.Tensor, reference01: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB (inf for identical images)."""
    out, ref = _prepare(output01, reference01)
    mse = (out - ref).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse)


def _gaussian_window(sigma: float, radius: int, device, dtype) -> torch.Tensor:
    x = torch.arange(-radius, radius + 1, device=device, dtype=torch.float64)
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return (g / g.sum()).to(dtype)


def _band_matrix(taps: torch.Tensor, length: int) -> torch.Tensor:
    """(length - k + 1, length) matrix whose rows slide ``taps`` along a signal: 'valid' correlation."""
    k = taps.numel()
    rows = torch.arange(length - k + 1, device=taps.device)[:, None]
    band = torch.zeros(length - k + 1, length, dtype=taps.dtype, device=taps.device)
    band.scatter_(1, rows + torch.arange(k, device=taps.device)[None, :], taps.expand(length - k + 1, k).clone())
    return band


def _separable_filter(x: torch.Tensor, taps: torch.Tensor, padding_mode: str | None) -> torch.Tensor:
    """Separable filter over the last two axes; ``padding_mode=None`` keeps only the valid region.

    Written as two matrix products with banded matrices: on the CPU this is several times faster than a
    depthwise convolution, and exact."""
    radius = taps.numel() // 2
    if padding_mode is not None:
        lead = x.shape[:-2]
        x = F.pad(x.reshape(-1, 1, *x.shape[-2:]), (radius, radius, radius, radius), mode=padding_mode).reshape(
            *lead, *(s + 2 * radius for s in x.shape[-2:])
        )
    rows = _band_matrix(taps, x.shape[-2])
    cols = _band_matrix(taps, x.shape[-1])
    return rows @ x @ cols.T


def ssim(
    output01: torch.Tensor, reference01: torch.Tensor, sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03
) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004), Gaussian-weighted, population covariances."""
    out, ref = _prepare(output01, reference01)  # float32: agrees with scikit-image's float64 to ~1e-7
    radius = int(3.5 * sigma + 0.5)  # scikit-image's truncation: 11 taps for sigma 1.5
    if min(out.shape[-2:]) < 2 * radius + 1:
        raise ValueError(f"SSIM needs images of at least {2 * radius + 1} pixels per side, got {tuple(out.shape[-2:])}")
    taps = _gaussian_window(sigma, radius, out.device, out.dtype)
    mu_x, mu_y, xx, yy, xy = _separable_filter(
        torch.stack([out, ref, out * out, ref * ref, out * ref]), taps, padding_mode=None
    )
    var_x = xx - mu_x**2
    var_y = yy - mu_y**2
    cov = xy - mu_x * mu_y
    c1, c2 = k1**2, k2**2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(1)


def delta_e_map(output01: torch.Tensor, reference01: torch.Tensor) -> torch.Tensor:
    """Per-pixel Oklab colour difference ΔE (Euclidean distance in L, a, b), shape (B, H, W)."""
    return oklab_difference(*_prepare(output01, reference01)).pow(2).sum(1).sqrt()


def delta_e(output01: torch.Tensor, reference01: torch.Tensor) -> torch.Tensor:
    """Mean Oklab ΔE per image (1.0 is the distance from black to white; ~0.02 is a just-visible step)."""
    return delta_e_map(output01, reference01).flatten(1).mean(1)


_BINOMIAL_5 = (1 / 16, 4 / 16, 6 / 16, 4 / 16, 1 / 16)


def binomial_blur(images: torch.Tensor) -> torch.Tensor:
    """B x: the separable [1,4,6,4,1]/16 blur with reflect padding over the last two axes (same shape)."""
    taps = torch.tensor(_BINOMIAL_5, device=images.device, dtype=images.dtype)
    return _separable_filter(images, taps, padding_mode="reflect")


def high_frequency_energy(images: torch.Tensor) -> torch.Tensor:
    """E[(x - Bx)^2] per image, B = :func:`binomial_blur`."""
    return (images - binomial_blur(images)).pow(2).flatten(1).mean(1)


def detail_ratio(output01: torch.Tensor, reference01: torch.Tensor) -> torch.Tensor:
    """High-frequency energy of the output over that of the reference, per image.

    1.0 means as much fine detail as the reference; below 1 the decoder blurs, above 1 it invents detail
    or noise. NaN for a reference with no detail at all (a flat image)."""
    out, ref = _prepare(output01, reference01)
    reference_energy = high_frequency_energy(ref)
    ratio = high_frequency_energy(out) / reference_energy
    return torch.where(reference_energy > 1e-12, ratio, torch.full_like(ratio, math.nan))


def reconstruction_metrics(
    output01: torch.Tensor, reference01: torch.Tensor, lpips_models: dict | None = None
) -> dict[str, torch.Tensor]:
    """Every metric, per image: {'psnr', 'ssim', 'delta_e', 'detail_ratio', 'lpips_<net>'...}.

    ``lpips_models`` maps a name ('alex', 'vgg') to an :class:`~training.perceptual.Lpips` module, or to
    None when its backbone is unavailable (then that metric is left out)."""
    with torch.no_grad():
        values = {
            "psnr": psnr(output01, reference01),
            "ssim": ssim(output01, reference01),
            "delta_e": delta_e(output01, reference01),
            "detail_ratio": detail_ratio(output01, reference01),
        }
        for net, model in (lpips_models or {}).items():
            if model is not None:
                values[f"lpips_{net}"] = model(output01.float().clamp(0, 1), reference01.float()).cpu()
    return values


def mean_and_std(values: torch.Tensor) -> tuple[float, float]:
    """Mean and (population) standard deviation over the finite values, as the model cards report them."""
    finite = values[torch.isfinite(values)].double()
    if finite.numel() == 0:
        return math.nan, math.nan
    return float(finite.mean()), float(finite.std(unbiased=False)) if finite.numel() > 1 else 0.0


def delta_e_distribution(delta_e_pixels: torch.Tensor) -> dict[str, float]:
    """Mean, median and 95th percentile of a ΔE map (any shape), over all its pixels."""
    flat = delta_e_pixels.flatten().float()
    return {
        "mean_delta_e": float(flat.mean()),
        "median_delta_e": float(flat.median()),
        "p95_delta_e": float(flat.kthvalue(max(1, int(0.95 * flat.numel()))).values),
    }


def oklab_error_split(output01: torch.Tensor, reference01: torch.Tensor) -> dict[str, float]:
    """Where the colour error lives, over the whole batch: mean |ΔL|, |Δa|, |Δb| and each channel's
    share of the squared error ΔE² (the three shares sum to 1)."""
    diff = oklab_difference(*_prepare(output01, reference01))
    mean_abs = diff.abs().mean(dim=(0, 2, 3))
    energy = diff.pow(2).mean(dim=(0, 2, 3))
    share = energy / energy.sum() if float(energy.sum()) > 0 else torch.full_like(energy, 1 / 3)
    names = ("L", "a", "b")
    return {
        **{f"mean_abs_{n}": float(v) for n, v in zip(names, mean_abs)},
        **{f"share_{n}": float(v) for n, v in zip(names, share)},
    }
