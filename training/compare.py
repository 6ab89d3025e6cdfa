"""Comparing decoders: numbers and pictures of several reconstructions of the same images, reference-free
statistics of several decodes of one latent, weighted merges, and post-hoc EMA.

Everything works on images in [0, 1] shaped (B, 3, H, W) and on plain state dicts; the nodes only feed it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import metrics, report, visualize
from .oklab import oklab_from_srgb


def crop_to_multiple(images: torch.Tensor, ratio: int) -> torch.Tensor:
    """Centre-crop H and W down to multiples of ``ratio``, exactly as ComfyUI's VAE crops what it encodes
    (offset = remainder // 2), so the reference is cropped the same way as what the VAE saw."""
    for dim in (2, 3):
        size = images.shape[dim]
        keep = (size // ratio) * ratio
        if keep == 0:
            raise ValueError(
                f"images are {images.shape[2]}x{images.shape[3]} px, smaller than the VAE's {ratio}x ratio"
            )
        if keep != size:
            images = images.narrow(dim, (size % ratio) // 2, keep)
    return images


# ----------------------------------------------------------------------------------------------
# reconstructions of reference images


@dataclass
class Comparison:
    """Per-image metrics of every decoder against the same reference images."""

    labels: list[str]
    reference: torch.Tensor  # (B, 3, H, W)
    outputs: dict[str, torch.Tensor]  # label -> (B, 3, H, W), clamped to [0, 1]
    per_image: dict[str, dict[str, torch.Tensor]]  # label -> metric -> (B,)
    notes: dict[str, str] = field(default_factory=dict)  # metric -> why it is missing

    def summary(self) -> dict[str, dict[str, dict[str, float]]]:
        """label -> metric -> {'mean', 'std'} (model-card style)."""
        return {label: report.summarize(values) for label, values in self.per_image.items()}

    def table(self) -> str:
        return report.markdown_table(self.per_image, self.notes)

    def as_json(self) -> dict:
        return {
            "images": int(self.reference.shape[0]),
            "size": list(self.reference.shape[2:]),
            "decoders": {
                label: {
                    "summary": self.summary()[label],
                    "per_image": {m: [float(v) for v in vals] for m, vals in self.per_image[label].items()},
                }
                for label in self.labels
            },
            "unavailable": dict(self.notes),
        }

    def ranking(self, metric: str = "psnr") -> list[str]:
        """Labels best first by the mean of ``metric`` (higher is better for PSNR/SSIM, lower for the others)."""
        higher_better = metric in ("psnr", "ssim")
        means = {label: metrics.mean_and_std(self.per_image[label][metric])[0] for label in self.labels}
        return sorted(self.labels, key=lambda label: -means[label] if higher_better else means[label])


def compare_reconstructions(
    reference01: torch.Tensor, outputs: dict[str, torch.Tensor], lpips_models: dict | None = None, lpips_note: str = ""
) -> Comparison:
    per_image = {
        label: metrics.reconstruction_metrics(out, reference01, lpips_models) for label, out in outputs.items()
    }
    notes = {}
    for net in ("alex", "vgg"):
        if lpips_models is not None and lpips_models.get(net) is None and net in lpips_models:
            notes[f"lpips_{net}"] = lpips_note or "no weights"
    return Comparison(
        list(outputs), reference01.float(), {k: v.float().clamp(0, 1) for k, v in outputs.items()}, per_image, notes
    )


def labelled_grid(comparison: Comparison, max_side: int = 384) -> torch.Tensor:
    """(3, H, W): one row per image, columns reference + each decoder, labels on top, each tile at most
    ``max_side`` px on its long side (area-downscaled only for the picture; metrics use full size)."""
    rows = []
    for i in range(comparison.reference.shape[0]):
        tiles = [("reference", comparison.reference[i])]
        for label in comparison.labels:
            psnr = float(comparison.per_image[label]["psnr"][i])
            tiles.append((f"{label}  {psnr:.2f} dB", comparison.outputs[label][i]))
        rows.append([visualize.label(_fit(t, max_side), text) for text, t in tiles])
    return visualize.grid(rows)


def delta_e_heatmaps(comparison: Comparison, max_side: int = 384) -> tuple[torch.Tensor, float]:
    """(3, H, W) grid of Oklab ΔE heatmaps (rows images, columns decoders) on one shared scale, and that
    scale's maximum (the 99.5th percentile over all decoders, so one outlier does not wash out the rest)."""
    maps = {label: metrics.delta_e_map(comparison.outputs[label], comparison.reference) for label in comparison.labels}
    pooled = torch.cat([m.flatten() for m in maps.values()])
    vmax = max(float(torch.quantile(pooled[:: max(1, pooled.numel() // 1_000_000)], 0.995)), 1e-4)
    rows = []
    for i in range(comparison.reference.shape[0]):
        rows.append(
            [
                visualize.label(
                    _fit(visualize.heatmap(maps[label][i : i + 1], vmax)[0], max_side),
                    f"{label}  ΔE {float(maps[label][i].mean()):.4f}",
                )
                for label in comparison.labels
            ]
        )
    return visualize.grid(rows), vmax


def most_different_regions(comparison: Comparison, window: int = 64, zoom: int = 3) -> torch.Tensor:
    """(3, H, W): per image, the ``window``-px square where the decoders disagree most with each other
    (the spread of their outputs, so a region all decoders get equally wrong is not picked), shown
    reference + decoders, enlarged ``zoom``x with nearest-neighbour so single pixels stay visible."""
    stack = torch.stack([comparison.outputs[label] for label in comparison.labels])  # (D, B, 3, H, W)
    if len(comparison.labels) > 1:
        disagreement = stack.std(dim=0).mean(dim=1)  # (B, H, W)
    else:
        disagreement = metrics.delta_e_map(stack[0], comparison.reference)
    height, width = disagreement.shape[1:]
    window = max(8, min(window, height, width))
    rows = []
    for i in range(disagreement.shape[0]):
        pooled = F.avg_pool2d(disagreement[i][None, None], window, stride=max(1, window // 4))[0, 0]
        index = int(pooled.flatten().argmax())
        top = min((index // pooled.shape[1]) * max(1, window // 4), height - window)
        left = min((index % pooled.shape[1]) * max(1, window // 4), width - window)
        crops = [("reference", comparison.reference[i])] + [
            (label, comparison.outputs[label][i]) for label in comparison.labels
        ]
        rows.append(
            [
                visualize.label(_zoom(t[:, top : top + window, left : left + window], zoom), f"{text} @{left},{top}")
                for text, t in crops
            ]
        )
    return visualize.grid(rows)


def _fit(image: torch.Tensor, max_side: int) -> torch.Tensor:
    height, width = image.shape[1:]
    scale = max_side / max(height, width)
    if scale >= 1:
        return image
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    return F.interpolate(image[None].float(), size=size, mode="area")[0]


def _zoom(image: torch.Tensor, factor: int) -> torch.Tensor:
    return image.repeat_interleave(factor, dim=1).repeat_interleave(factor, dim=2)


# ----------------------------------------------------------------------------------------------
# several decodes of one latent: no reference


def decode_statistics(decoded01: torch.Tensor) -> dict[str, torch.Tensor]:
    """Reference-free numbers per image of an (unclamped) decode: detail energy (the high-frequency energy
    the detail ratio compares; higher = sharper or noisier), the fraction of values outside [0, 1] (clipped
    when saved), and colour statistics in Oklab (mean lightness L, mean chroma, L's spread = contrast)."""
    decoded = decoded01.float()
    clamped = decoded.clamp(0, 1)
    lab = oklab_from_srgb(clamped)
    chroma = lab[:, 1:].pow(2).sum(1).sqrt()
    return {
        "detail_energy": metrics.high_frequency_energy(clamped),
        "out_of_range": ((decoded < 0) | (decoded > 1)).float().flatten(1).mean(1),
        "mean_L": lab[:, 0].flatten(1).mean(1),
        "contrast_L": lab[:, 0].flatten(1).std(1),
        "mean_chroma": chroma.flatten(1).mean(1),
    }


def latent_grid(
    decoded: dict[str, torch.Tensor], stats: dict[str, dict[str, torch.Tensor]], max_side: int = 384
) -> torch.Tensor:
    """(3, H, W): rows = latents of the batch, columns = decoders, each labelled with its detail energy."""
    labels = list(decoded)
    rows = [
        [
            visualize.label(
                _fit(decoded[label][i].clamp(0, 1), max_side),
                f"{label}  detail {float(stats[label]['detail_energy'][i]) * 1e3:.2f}e-3",
            )
            for label in labels
        ]
        for i in range(decoded[labels[0]].shape[0])
    ]
    return visualize.grid(rows)


def latent_statistics(decoded: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """decode_statistics per decoder, plus each decoder's ΔE against the first one's decode."""
    labels = list(decoded)
    stats = {label: decode_statistics(d) for label, d in decoded.items()}
    first = decoded[labels[0]].clamp(0, 1)
    for label in labels[1:]:
        stats[label]["delta_e_vs_first"] = metrics.delta_e(decoded[label].clamp(0, 1), first)
    return stats


LATENT_COLUMNS = {
    "detail_energy": ("detail energy (×1e3)", lambda v: f"{v * 1e3:.3f}"),
    "out_of_range": ("out of [0,1]", lambda v: f"{v * 100:.2f} %"),
    "mean_L": ("mean L", lambda v: f"{v:.4f}"),
    "contrast_L": ("L contrast", lambda v: f"{v:.4f}"),
    "mean_chroma": ("mean chroma", lambda v: f"{v:.4f}"),
    "delta_e_vs_first": ("ΔE vs first", lambda v: f"{v:.4f}"),
}


def latent_table(stats: dict[str, dict[str, torch.Tensor]]) -> str:
    names = [n for n in LATENT_COLUMNS if any(n in s for s in stats.values())]
    lines = ["| decoder | " + " | ".join(LATENT_COLUMNS[n][0] for n in names) + " |", "|" + "---|" * (len(names) + 1)]
    for label, values in stats.items():
        cells = []
        for n in names:
            if n in values:
                mean, std = metrics.mean_and_std(values[n])
                fmt = LATENT_COLUMNS[n][1]
                cells.append(f"{fmt(mean)} ± {fmt(std)}" if values[n].numel() > 1 else fmt(mean))
            else:
                cells.append("—")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# merging


class MergeError(ValueError):
    """Weights that cannot be merged; the message names the VAE and the tensor."""


def normalised_weights(weights: list[float]) -> tuple[list[float], str | None]:
    """Weights scaled to sum to 1, and a warning when the merge extrapolates (a negative weight)."""
    total = sum(weights)
    if not math.isfinite(total) or abs(total) < 1e-12:
        raise MergeError(f"weights {weights} sum to {total}: they must sum to a non-zero number (they are normalised)")
    normalised = [w / total for w in weights]
    warning = None
    if any(w < 0 for w in normalised):
        warning = (
            f"extrapolating (weights after normalising: {', '.join(f'{w:+.3f}' for w in normalised)}): the result "
            "leaves the segment between the VAEs; check it by eye"
        )
    return normalised, warning


def merge_state_dicts(
    state_dicts: list[dict[str, torch.Tensor]], weights: list[float], names: list[str]
) -> dict[str, torch.Tensor]:
    """Σ wᵢ·θᵢ over float tensors (computed in fp32, stored in the first's dtype); integer buffers
    (BatchNorm counters) are taken from the first. Keys and shapes must match exactly."""
    if len(state_dicts) != len(weights):
        raise MergeError(f"{len(state_dicts)} VAEs but {len(weights)} weights")
    first = state_dicts[0]
    for sd, name in zip(state_dicts[1:], names[1:]):
        missing, extra = sorted(set(first) - set(sd)), sorted(set(sd) - set(first))
        if missing or extra:
            raise MergeError(
                f"{name} does not have {names[0]}'s tensors: missing {missing[:3]}, extra {extra[:3]} "
                f"({len(missing)} missing, {len(extra)} extra): merge only VAEs of one architecture"
            )
        wrong = [k for k in first if sd[k].shape != first[k].shape]
        if wrong:
            raise MergeError(
                f"{name}: {wrong[0]} is {tuple(sd[wrong[0]].shape)} but {tuple(first[wrong[0]].shape)} in "
                f"{names[0]} ({len(wrong)} tensors differ in shape): merge only VAEs of one architecture"
            )
    merged = {}
    for key, tensor in first.items():
        if not tensor.is_floating_point():
            merged[key] = tensor.clone()
            continue
        total = torch.zeros(tensor.shape, dtype=torch.float32)
        for sd, w in zip(state_dicts, weights):
            total += w * sd[key].float()
        merged[key] = total.to(tensor.dtype)
    return merged


# ----------------------------------------------------------------------------------------------
# one encoder, many decoders: which latent space each VAE speaks

#: Latent-space tags guessed from names (file names, labels, TAESD variants), most specific first.
SPACE_KEYWORDS = (
    ("taef2", "FLUX.2"),
    ("flux2", "FLUX.2"),
    ("flux.2", "FLUX.2"),
    ("taef1", "FLUX.1"),
    ("flux", "FLUX.1"),
    ("taesd3", "SD3"),
    ("sd3", "SD3"),
    ("taesdxl", "SDXL"),
    ("sdxl", "SDXL"),
    ("taesd", "SD 1.x/2.x"),
    ("sd15", "SD 1.x/2.x"),
    ("sd-vae", "SD 1.x/2.x"),
    ("sd_vae", "SD 1.x/2.x"),
    ("furception", "SD 1.x/2.x"),
    ("stage_a", "Stable Cascade stage A"),
)


@dataclass(frozen=True)
class LatentSpace:
    channels: int
    ratio: int
    tag: str | None = None  # e.g. "SDXL"; None when nothing says

    def describe(self) -> str:
        return f"{self.channels} channels, {self.ratio}x" + (f", {self.tag}" if self.tag else "")


def space_tag(*names: str | None) -> str | None:
    for name in names:
        lowered = (name or "").lower()
        if lowered.rsplit("/", 1)[-1] == "ae.safetensors":  # black-forest-labs' FLUX.1 VAE file name
            return "FLUX.1"
        for keyword, tag in SPACE_KEYWORDS:
            if keyword in lowered:
                return tag
    return None


def check_shared_encoder(encoder: tuple[str, LatentSpace], decoders: list[tuple[str, LatentSpace]]) -> list[str]:
    """Refuses decoders whose latents cannot be the encoder's (channels or ratio differ: a ValueError that names
    them); returns warnings for same-shaped spaces with different tags (SD and SDXL share shapes but not meaning)."""
    name, space = encoder
    wrong = [
        f"{label} ({s.describe()})" for label, s in decoders if (s.channels, s.ratio) != (space.channels, space.ratio)
    ]
    if wrong:
        raise ValueError(
            f"shared encoder {name} ({space.describe()}) cannot feed {', '.join(wrong)}: different latent "
            "spaces. Compare them in 'autoencoders' mode, or pick an encoder of their space"
        )
    return [
        f"{label} looks like {s.tag} but the shared encoder {name} looks like {space.tag}: same latent shapes, "
        "different spaces? The numbers are only meaningful for decoders of the encoder's own space"
        for label, s in decoders
        if s.tag and space.tag and s.tag != space.tag
    ]
