"""Pictures of errors: ΔE heatmaps and labelled side-by-side grids, as float tensors in [0, 1]."""

from __future__ import annotations

import torch

# A perceptually ordered dark-to-bright ramp (black, violet, red, orange, pale yellow): equal steps of
# error read as equal steps of brightness, and it stays readable in grayscale.
_HEAT_STOPS = torch.tensor(
    [
        [0.00, 0.00, 0.02],
        [0.30, 0.05, 0.45],
        [0.75, 0.15, 0.30],
        [0.98, 0.50, 0.05],
        [0.99, 0.99, 0.75],
    ]
)


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


# Pillow's built-in font draws ASCII (and a few Latin-1 signs); everything else would be an empty box
_SPELLED = {
    "Δ": "d",
    "→": "->",
    "←": "<-",
    "²": "2",
    "×": "x",
    "≥": ">=",
    "≤": "<=",
    "–": "-",
    "—": "-",
    "μ": "u",
    "ß": "ss",
    "’": "'",
    "“": '"',
    "”": '"',
}


def drawable(text: str) -> str:
    """``text`` as the built-in font can draw it: symbols spelled out (ΔE -> dE), accents dropped (è -> e), anything
    else '?'."""
    import unicodedata

    text = unicodedata.normalize("NFKD", "".join(_SPELLED.get(c, c) for c in text))
    return "".join(c if ord(c) < 128 or c in "±·…" else "" if unicodedata.combining(c) else "?" for c in text)


def label(image: torch.Tensor, text: str, height: int = 18) -> torch.Tensor:
    """(3, H, W) with a dark caption strip of ``text`` on top (Pillow's built-in font)."""
    import numpy as np
    from PIL import Image, ImageDraw

    strip = Image.new("RGB", (image.shape[2], height), (24, 24, 24))
    ImageDraw.Draw(strip).text((4, 3), drawable(text), fill=(235, 235, 235))
    caption = torch.from_numpy(np.asarray(strip, dtype=np.float32) / 255).permute(2, 0, 1)
    return torch.cat([caption, image.clamp(0, 1).cpu()], dim=1)


def save_png(image: torch.Tensor, path: str) -> None:
    """(3, H, W) in [0, 1] -> 8-bit PNG."""
    import numpy as np
    from PIL import Image

    array = (image.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255 + 0.5).astype(np.uint8)
    Image.fromarray(array).save(path, format="PNG")


PLOT_COLOURS = [(240, 170, 60), (90, 170, 240), (150, 220, 120), (230, 100, 120)]


def line_plot(
    series: dict[str, list[tuple[float, float]]],
    title: str = "",
    width: int = 640,
    height: int = 320,
    log_y: bool = False,
) -> torch.Tensor:
    """A small line chart: ``series`` maps a name to (x, y) points; -> (3, H, W) in [0, 1]. Each series is
    scaled to its own y range (labelled in the legend), so a loss and a PSNR can share one picture."""
    import math

    import numpy as np
    from PIL import Image, ImageDraw

    canvas = Image.new("RGB", (width, height), (28, 28, 30))
    draw = ImageDraw.Draw(canvas)
    left, top, right, bottom = 8, 22, width - 8, height - 8 - 14 * max(1, len(series))
    draw.rectangle((left, top, right, bottom), outline=(80, 80, 84))
    draw.text((left, 5), title, fill=(230, 230, 230))
    all_x = [x for points in series.values() for x, _ in points]
    x_low, x_high = (min(all_x), max(all_x)) if all_x else (0.0, 1.0)
    for i, (name, points) in enumerate(series.items()):
        colour = PLOT_COLOURS[i % len(PLOT_COLOURS)]
        finite = [(x, math.log10(y) if log_y else y) for x, y in points if math.isfinite(y) and (y > 0 or not log_y)]
        legend = name
        if finite:
            ys = [y for _, y in finite]
            y_low, y_high = min(ys), max(ys)
            span_x, span_y = max(x_high - x_low, 1e-9), max(y_high - y_low, 1e-12)
            coords = [
                (left + (x - x_low) / span_x * (right - left), bottom - (y - y_low) / span_y * (bottom - top))
                for x, y in finite
            ]
            if len(coords) == 1:
                cx, cy = coords[0]
                draw.ellipse((cx - 2, cy - 2, cx + 2, cy + 2), fill=colour)
            else:
                draw.line(coords, fill=colour, width=2)
            shown = (lambda v: f"{10**v:.4g}") if log_y else (lambda v: f"{v:.4g}")
            legend = f"{name}: {shown(finite[0][1])} → {shown(finite[-1][1])}  (range {shown(y_low)}–{shown(y_high)})"
        draw.text((left, bottom + 4 + 14 * i), legend, fill=colour)
    return torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255).permute(2, 0, 1)
