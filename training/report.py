"""Metric tables in the model cards' style (mean ± std per decoder), as Markdown text."""

from __future__ import annotations

import torch

from .metrics import mean_and_std

COLUMNS = {
    "psnr": ("PSNR ↑", "{:.2f}"),
    "ssim": ("SSIM ↑", "{:.4f}"),
    "delta_e": ("Oklab ΔE ↓", "{:.4f}"),
    "detail_ratio": ("detail ratio (1 = sharp as reference)", "{:.3f}"),
    "lpips_alex": ("LPIPS-Alex ↓", "{:.4f}"),
    "lpips_vgg": ("LPIPS-VGG ↓", "{:.4f}"),
}


def summarize(per_image: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """{metric: {'mean', 'std'}} over the finite per-image values."""
    out = {}
    for name, values in per_image.items():
        mean, std = mean_and_std(values)
        out[name] = {"mean": mean, "std": std}
    return out


def markdown_table(rows: dict[str, dict[str, torch.Tensor]], notes: dict[str, str] | None = None) -> str:
    """One row per decoder label; ``notes`` fills columns that are unavailable (e.g. LPIPS without weights)."""
    names = [n for n in COLUMNS if any(n in r for r in rows.values()) or (notes and n in notes)]
    header = "| decoder | " + " | ".join(COLUMNS[n][0] for n in names) + " |"
    lines = [header, "|" + "---|" * (len(names) + 1)]
    for label, per_image in rows.items():
        cells = []
        for n in names:
            if n in per_image:
                mean, std = mean_and_std(per_image[n])
                fmt = COLUMNS[n][1]
                cells.append(f"{fmt.format(mean)} ± {fmt.format(std)}")
            else:
                cells.append((notes or {}).get(n, "n/a"))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
