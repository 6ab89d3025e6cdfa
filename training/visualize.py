"""Pictures of errors: ΔE heatmaps and labelled side-by-side grids, as float tensors in [0, 1]."""
from __future__ import annotations

import torch

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
    """Tiles (3, H, W) images into one (3, H', W') picture on mid-grey. Each row is as tall as its
    tallest tile, each column as wide as the widest tile; tiles sit top-left in their cells."""
    row_heights = [max(t.shape[1] for t in row) for row in rows]
    columns = max(len(row) for row in rows)
    col_widths = [max(row[c].shape[2] for row in rows if c < len(row)) for c in range(columns)]
    canvas = torch.full((3, sum(row_heights) + gap * (len(rows) - 1), sum(col_widths) + gap * (columns - 1)), 0.5)
    top = 0
    for row, height in zip(rows, row_heights):
        left = 0
        for tile, width in zip(row, col_widths):
            canvas[:, top : top + tile.shape[1], left : left + tile.shape[2]] = tile.clamp(0, 1)
            left += width + gap
        top += height + gap
    return canvas


def label(image: torch.Tensor, text: str, height: int = 18) -> torch.Tensor:
    """(3, H, W) with a dark caption strip of ``text`` on top (Pillow's built-in font)."""
    import numpy as np
    from PIL import Image, ImageDraw

    strip = Image.new("RGB", (image.shape[2], height), (24, 24, 24))
    ImageDraw.Draw(strip).text((4, 3), text, fill=(235, 235, 235))
    caption = torch.from_numpy(np.asarray(strip, dtype=np.float32) / 255).permute(2, 0, 1)
    return torch.cat([caption, image.clamp(0, 1).cpu()], dim=1)


def save_png(image: torch.Tensor, path: str) -> None:
    """(3, H, W) in [0, 1] -> 8-bit PNG."""
    import numpy as np
    from PIL import Image

    array = (image.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255 + 0.5).astype(np.uint8)
    Image.fromarray(array).save(path)
