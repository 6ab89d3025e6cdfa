"""sRGB <-> Oklab, differentiable, for losses and metrics.

Oklab is Björn Ottosson's perceptual colour space ("A perceptual color space for image processing",
2020). Two deliberate departures from the textbook formulas, both needed for training:

* The sRGB transfer curve is extended *linearly* outside [0, 1]. A decoder overshoots; a clamp would give
  those pixels zero gradient, the linear extension keeps pulling them back.
* The cube root gets a linear toe below ``CUBE_ROOT_TOE`` (in linear LMS). The true cube root has an
  infinite slope at 0, so the darkest pixels would dominate every gradient. The toe starts at LMS = 1e-3,
  which only touches 8-bit sRGB codes 0-3 (sRGB 4/255 is already above it), and caps the slope of L with
  respect to an sRGB value at black at ~9x its slope at mid-grey instead of infinity. Above the toe the
  values are exact Oklab.

All conversions run in float32 even under autocast: bf16 has 8 bits of mantissa, not enough for colour.
Tensors are channel-first: ``(..., 3, H, W)`` or any shape whose ``dim`` axis has the 3 channels.
"""

from __future__ import annotations

import torch

# Ottosson's matrices, written as column-vector maps: lms = M @ rgb.
LINEAR_SRGB_TO_LMS = (
    (0.4122214708, 0.5363325363, 0.0514459929),
    (0.2119034982, 0.6806995451, 0.1073969566),
    (0.0883024619, 0.2817188376, 0.6299787005),
)
LMS_CUBE_ROOT_TO_OKLAB = (
    (0.2104542553, 0.7936177850, -0.0040720468),
    (1.9779984951, -2.4285922050, 0.4505937099),
    (0.0259040371, 0.7827717662, -0.8086757660),
)

_OKLAB_TO_LMS_CUBE_ROOT = torch.linalg.inv(torch.tensor(LMS_CUBE_ROOT_TO_OKLAB, dtype=torch.float64)).tolist()
_LMS_TO_LINEAR_SRGB = torch.linalg.inv(torch.tensor(LINEAR_SRGB_TO_LMS, dtype=torch.float64)).tolist()

CUBE_ROOT_TOE = 1e-3

# sRGB transfer-curve constants (IEC 61966-2-1).
_SRGB_KNEE = 0.04045
_LINEAR_KNEE = 0.0031308
_SLOPE_AT_WHITE = 2.4 / 1.055  # d(linear)/d(srgb) at srgb = 1


def _fp32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float32 else x.float()


def _apply_matrix(matrix, x: torch.Tensor, dim: int) -> torch.Tensor:
    m = torch.tensor(matrix, dtype=x.dtype, device=x.device)
    x = x.movedim(dim, -1)
    return (x @ m.T).movedim(-1, dim)


def linear_from_srgb(srgb: torch.Tensor) -> torch.Tensor:
    """sRGB-encoded values -> linear light. Linear (finite slope) below 0 and above 1."""
    x = _fp32(srgb)
    low = x / 12.92
    mid = ((x.clamp(_SRGB_KNEE, 1.0) + 0.055) / 1.055) ** 2.4
    high = 1.0 + (x - 1.0) * _SLOPE_AT_WHITE
    return torch.where(x <= _SRGB_KNEE, low, torch.where(x <= 1.0, mid, high))


def srgb_from_linear(linear: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`linear_from_srgb`, including its linear extensions."""
    y = _fp32(linear)
    low = y * 12.92
    mid = 1.055 * y.clamp(_LINEAR_KNEE, 1.0) ** (1 / 2.4) - 0.055
    high = 1.0 + (y - 1.0) / _SLOPE_AT_WHITE
    return torch.where(y <= _LINEAR_KNEE, low, torch.where(y <= 1.0, mid, high))


def cube_root_with_toe(x: torch.Tensor, toe: float = CUBE_ROOT_TOE) -> torch.Tensor:
    """Signed cube root, replaced by the chord ``x * toe**(-2/3)`` for ``|x| < toe`` (finite slope at 0)."""
    magnitude = x.abs()
    root = magnitude.clamp_min(toe) ** (1 / 3)
    linear = magnitude * toe ** (-2 / 3)
    return torch.sign(x) * torch.where(magnitude < toe, linear, root)


def cube_with_toe(y: torch.Tensor, toe: float = CUBE_ROOT_TOE) -> torch.Tensor:
    """Inverse of :func:`cube_root_with_toe`."""
    magnitude = y.abs()
    knee = toe ** (1 / 3)
    cube = magnitude**3
    linear = magnitude * toe ** (2 / 3)
    return torch.sign(y) * torch.where(magnitude < knee, linear, cube)


def oklab_from_linear(linear: torch.Tensor, dim: int = -3) -> torch.Tensor:
    lms = _apply_matrix(LINEAR_SRGB_TO_LMS, _fp32(linear), dim)
    return _apply_matrix(LMS_CUBE_ROOT_TO_OKLAB, cube_root_with_toe(lms), dim)


def linear_from_oklab(lab: torch.Tensor, dim: int = -3) -> torch.Tensor:
    lms_root = _apply_matrix(_OKLAB_TO_LMS_CUBE_ROOT, _fp32(lab), dim)
    return _apply_matrix(_LMS_TO_LINEAR_SRGB, cube_with_toe(lms_root), dim)


def oklab_from_srgb(srgb: torch.Tensor, dim: int = -3) -> torch.Tensor:
    """sRGB-encoded image (nominally [0, 1], any values accepted) -> Oklab (L, a, b) along ``dim``."""
    with torch.autocast(device_type=srgb.device.type, enabled=False):
        return oklab_from_linear(linear_from_srgb(srgb), dim)


def srgb_from_oklab(lab: torch.Tensor, dim: int = -3) -> torch.Tensor:
    with torch.autocast(device_type=lab.device.type, enabled=False):
        return srgb_from_linear(linear_from_oklab(lab, dim))


def oklab_difference(output01: torch.Tensor, reference01: torch.Tensor) -> torch.Tensor:
    """Per-pixel (ΔL, Δa, Δb), shape (B, 3, H, W), computed in float32."""
    if output01.shape != reference01.shape:
        raise ValueError(f"output {tuple(output01.shape)} and reference {tuple(reference01.shape)} differ in shape")
    return oklab_from_srgb(output01) - oklab_from_srgb(reference01)
