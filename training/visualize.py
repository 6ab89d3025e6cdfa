"""Pictures of errors: ΔE heatmaps and labelled side-by-side grids, as float tensors in [0, 1]."""
from __future__ import annotations

import torch
import torch.nn.functional as F

# A perceptually ordered dark-to-bright ramp (black, violet, red, orange, pale yellow): equal steps of
# error read as equal steps of brightness, and it stays readable in grayscale.
_HEAT_STOPS = torch.tensor([
    [0.00, 0.00, 0.02],
    [0.30, 0.05, 0.45],
    [0.75, 0.15, 0.30],
    [0.98, 0.50, 0.05],
    [0.99, 0.99, 0.75],
])


def heatmap(values: torch.Tensor, vmax: float) -> torch.Tensor:
    """(B, H, W) non-negative values -> (B, 3, H, W) colours; ``vmax`` and above map to the brightest."""
    if vmax <= 0:
        raise ValueError(f"heatmap maximum must be positive, got {vmax}")
    t = (values.float() / vmax).clamp(0, 1) * (len(_HEAT_STOPS) - 1)
    low = t.floor().long().clamp(max=len(_HEAT_STOPS) - 2)
    frac = (t - low).unsqueeze(1)
    stops = _HEAT_STOPS.to(values.device)
    low_colour = stops[low].permute(0, 3, 1, 2)
    high_colour = stops[low + 1].permute(0, 3, 1, 2)
    return low_colour + (high_colour - low_colour) * frac


def grid(rows: list[list[torch.Tensor]], gap: int = 4) -> torch.Tensor:
    """Tiles (3, H, W) images into one (3, H', W') picture; rows may differ in length, tiles in size
    (each tile is top-left aligned in its cell). The background is mid-grey."""
    cell_h = max(t.shape[1] for row in rows for t in row)
    cell_w = max(t.shape[2] for row in rows for t in row)
    columns = max(len(row) for row in rows)
    canvas = torch.full((3, len(rows) * (cell_h + gap) - gap, columns * (cell_w + gap) - gap), 0.5)
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            top, left = r * (cell_h + gap), c * (cell_w + gap)
            canvas[:, top : top + tile.shape[1], left : left + tile.shape[2]] = tile.clamp(0, 1)
    return canvas


def fit(image: torch.Tensor, height: int) -> torch.Tensor:
    """(3, H, W) -> same aspect at the given height (area-averaged when shrinking)."""
    width = max(1, round(image.shape[2] * height / image.shape[1]))
    return F.interpolate(image[None], size=(height, width), mode="area" if height < image.shape[1] else "bilinear", align_corners=None if height < image.shape[1] else False)[0]
