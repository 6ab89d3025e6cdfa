"""Stable Cascade stage A (the f4 VQGAN of Würstchen v3) as a plain torch module.

Architecture and key layout follow the Stable Cascade release (``stage_a.safetensors``), which is
also ComfyUI's: ``in_block`` (PixelUnshuffle 2 + 1x1 conv), ``down_blocks`` (mixing residual blocks,
a strided conv, a 1x1 conv to 4 channels + BatchNorm), ``vquantizer.codebook`` (8192 x 4),
``up_blocks`` (1x1 conv, 12 bottleneck blocks at 384 ch, a transposed conv, one block at 192 ch) and
``out_block`` (1x1 conv + PixelShuffle 2).

Images are in [0, 1] in and out (the host feeds stage A unscaled pixels, and does not clamp its
output); latents are the encoder's continuous output, *not* snapped to the codebook -- what the host's
VAEEncode returns and what stage B generates. The decoder (``up_blocks`` + ``out_block``, 15.7 M
parameters at full size) never uses the codebook; the codebook travels with the encoder half.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class StageAConfig:
    c_hidden: int = 384
    levels: int = 2
    bottleneck_blocks: int = 12
    latent_channels: int = 4
    codebook_size: int = 8192

    @property
    def widths(self) -> list[int]:
        """Channels per level, full resolution first (192, 384 at full size)."""
        return [self.c_hidden // 2**i for i in reversed(range(self.levels))]


def config_from_state_dict(sd: dict[str, torch.Tensor]) -> StageAConfig:
    """The architecture canonical (decoder and/or encoder) tensors were made for."""
    if "up_blocks.0.0.weight" in sd:
        c_hidden, latent = sd["up_blocks.0.0.weight"].shape[:2]
        indices = {int(k.split(".")[1]) for k in sd if k.startswith("up_blocks.")}
        # up_blocks: [1x1 conv, bottleneck blocks..., transposed conv (4x4), block, ...]: the 4x4 kernels count the
        # levels and the first one ends the bottleneck (positions, not counts, so a missing block shows as missing)
        transposed = sorted(
            i
            for i in indices
            if getattr(sd.get(f"up_blocks.{i}.weight"), "ndim", 0) == 4 and sd[f"up_blocks.{i}.weight"].shape[-1] == 4
        )
        levels = len(transposed) + 1
        blocks = (transposed[0] - 1) if transposed else max(indices)
    else:
        first = sd["in_block.1.weight"].shape[0]
        latent, c_hidden = sd[_encoder_out_key(sd)].shape[:2]
        levels = max(1, (int(c_hidden) // int(first)).bit_length())
        blocks = StageAConfig.bottleneck_blocks
    codebook = (
        sd["vquantizer.codebook.weight"].shape[0] if "vquantizer.codebook.weight" in sd else StageAConfig.codebook_size
    )
    return StageAConfig(int(c_hidden), levels, blocks, int(latent), int(codebook))


def _encoder_out_key(sd) -> str:
    last = max(int(k.split(".")[1]) for k in sd if k.startswith("down_blocks."))
    return f"down_blocks.{last}.0.weight"


class MixingBlock(nn.Module):
    """Depthwise 3x3 (replicate padding) then channel MLP, each after an affine-free LayerNorm, both
    residual; six learned scalars (``gammas``) modulate the norms and gate the branches."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(channels, elementwise_affine=False, eps=1e-6)
        self.depthwise = nn.Sequential(nn.ReplicationPad2d(1), nn.Conv2d(channels, channels, 3, groups=channels))
        self.norm2 = nn.LayerNorm(channels, elementwise_affine=False, eps=1e-6)
        self.channelwise = nn.Sequential(nn.Linear(channels, hidden), nn.GELU(), nn.Linear(hidden, channels))
        self.gammas = nn.Parameter(torch.zeros(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gammas
        h = self.norm1(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) * (1 + g[0]) + g[1]
        x = x + self.depthwise(h) * g[2]
        h = self.norm2(x.permute(0, 2, 3, 1)) * (1 + g[3]) + g[4]
        return x + self.channelwise(h).permute(0, 3, 1, 2) * g[5]


class Codebook(nn.Module):
    def __init__(self, size: int, channels: int):
        super().__init__()
        self.codebook = nn.Embedding(size, channels)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """Each latent vector snapped to its nearest code."""
        flat = latents.movedim(1, -1).reshape(-1, latents.shape[1])
        index = torch.cdist(flat, self.codebook.weight).argmin(dim=1)
        return self.codebook.weight[index].reshape(*latents.shape[:1], *latents.shape[2:], -1).movedim(-1, 1)


class StageAAutoencoder(nn.Module):
    """Encoder (with its codebook) + decoder; ``encode``/``decode`` speak raw latents and images in [0, 1]."""

    def __init__(self, cfg: StageAConfig = StageAConfig(), with_encoder: bool = True):
        super().__init__()
        self.config = cfg
        self.latent_channels = cfg.latent_channels
        widths = cfg.widths
        if with_encoder:
            self.in_block = nn.Sequential(nn.PixelUnshuffle(2), nn.Conv2d(3 * 4, widths[0], 1))
            down: list[nn.Module] = []
            for level, width in enumerate(widths):
                if level > 0:
                    down.append(nn.Conv2d(widths[level - 1], width, 4, stride=2, padding=1))
                down.append(MixingBlock(width, width * 4))
            down.append(
                nn.Sequential(
                    nn.Conv2d(widths[-1], cfg.latent_channels, 1, bias=False), nn.BatchNorm2d(cfg.latent_channels)
                )
            )
            self.down_blocks = nn.Sequential(*down)
            self.vquantizer = Codebook(cfg.codebook_size, cfg.latent_channels)
        else:
            self.in_block = self.down_blocks = self.vquantizer = None
        up: list[nn.Module] = [nn.Sequential(nn.Conv2d(cfg.latent_channels, widths[-1], 1))]
        for level in reversed(range(cfg.levels)):
            repeats = cfg.bottleneck_blocks if level == cfg.levels - 1 else 1
            up += [MixingBlock(widths[level], widths[level] * 4) for _ in range(repeats)]
            if level > 0:
                up.append(nn.ConvTranspose2d(widths[level], widths[level - 1], 4, stride=2, padding=1))
        self.up_blocks = nn.Sequential(*up)
        self.out_block = nn.Sequential(nn.Conv2d(widths[0], 3 * 4, 1), nn.PixelShuffle(2))

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor]) -> StageAAutoencoder:
        """Strict load of canonical tensors; without encoder tensors the model is decoder-only."""
        model = cls(config_from_state_dict(sd), with_encoder="in_block.1.weight" in sd)
        model.load_state_dict({k: v if v.dtype == torch.long else v.float() for k, v in sd.items()})
        return model

    def encode(self, images01: torch.Tensor) -> torch.Tensor:
        """Continuous latents (BatchNorm output, not snapped to the codebook), as ComfyUI's VAEEncode."""
        return self.down_blocks(self.in_block(images01))

    def quantize(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vquantizer(latents)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.out_block(self.up_blocks(latents))
