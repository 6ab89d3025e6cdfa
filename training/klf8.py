"""The kl-f8 autoencoder (SD 1.x/2.x, SDXL, SD3, FLUX.1 VAEs) as plain torch modules.

Module and parameter names are the LDM layout (``encoder.down.0.block.1.conv2.weight``,
``decoder.mid.attn_1.q.weight``, ``post_quant_conv.weight``) that ComfyUI and the original
checkpoints use, so an LDM-layout state dict loads strictly; ``training.layouts`` maps the diffusers
layout onto it. The same config family covers 4-channel (SD/SDXL, with quant convs) and 16-channel
(SD3/FLUX.1, without) VAEs, and the 4x upscaler's f4 VAE (three levels).

Images are in [0, 1]; latents are raw (unscaled) latents, the way ComfyUI's LATENT holds them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class KlConfig:
    z_channels: int = 4
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    quant_convs: bool = True

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


def config_from_state_dict(ldm_sd: dict[str, torch.Tensor]) -> KlConfig:
    """Architecture of an LDM-layout kl state dict, read from its keys and shapes (either half is enough)."""
    part = "decoder" if "decoder.conv_in.weight" in ldm_sd else "encoder"
    levels = 1 + max(
        int(k.split(".")[2]) for k in ldm_sd if k.startswith(f"{part}.{'up' if part == 'decoder' else 'down'}.")
    )
    if part == "decoder":
        ch = ldm_sd["decoder.conv_out.weight"].shape[1]
        z_channels = ldm_sd["decoder.conv_in.weight"].shape[1]
        mult = [ldm_sd[f"decoder.up.{i}.block.0.conv2.weight"].shape[0] // ch for i in range(levels)]
        blocks = len({k.split(".")[4] for k in ldm_sd if k.startswith("decoder.up.0.block.")}) - 1
    else:
        ch = ldm_sd["encoder.conv_in.weight"].shape[0]
        z_channels = ldm_sd["encoder.conv_out.weight"].shape[0] // 2
        mult = [ldm_sd[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] // ch for i in range(levels)]
        blocks = len({k.split(".")[4] for k in ldm_sd if k.startswith("encoder.down.0.block.")})
    quant = "post_quant_conv.weight" in ldm_sd or "quant_conv.weight" in ldm_sd
    return KlConfig(int(z_channels), int(ch), tuple(int(m) for m in mult), int(blocks), quant)


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.norm1 = group_norm(n_in)
        self.conv1 = nn.Conv2d(n_in, n_out, 3, padding=1)
        self.norm2 = group_norm(n_out)
        self.conv2 = nn.Conv2d(n_out, n_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(n_in, n_out, 1) if n_in != n_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (x if self.nin_shortcut is None else self.nin_shortcut(x))


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, projections as 1x1 convs (LDM layout)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (t.reshape(b, 1, c, h * w).transpose(2, 3) for t in (self.q(y), self.k(y), self.v(y)))
        y = F.scaled_dot_product_attention(q, k, v).transpose(2, 3).reshape(b, c, h, w)
        return x + self.proj_out(y)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad: the original checkpoints were trained so


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """Image in [-1, 1] -> mean and log-variance of the latent (2*z channels)."""

    def __init__(self, cfg: KlConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(3, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        n_in = cfg.ch
        for level, width in enumerate(widths):
            stage = nn.Module()
            stage.block = nn.ModuleList(
                [ResnetBlock(n_in if i == 0 else width, width) for i in range(cfg.num_res_blocks)]
            )
            if level != len(widths) - 1:
                stage.downsample = Downsample(width)
            self.down.append(stage)
            n_in = width
        self.mid = MidBlock(n_in)
        self.norm_out = group_norm(n_in)
        self.conv_out = nn.Conv2d(n_in, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for stage in self.down:
            for block in stage.block:
                x = block(x)
            if hasattr(stage, "downsample"):
                x = stage.downsample(x)
        x = self.mid(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class Decoder(nn.Module):
    """Latent (z channels) -> image in [-1, 1] (not clamped). ``up[0]`` is the full-resolution level."""

    def __init__(self, cfg: KlConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.z_channels, widths[-1], 3, padding=1)
        self.mid = MidBlock(widths[-1])
        self.up = nn.ModuleList([nn.Module() for _ in widths])
        n_in = widths[-1]
        for level in reversed(range(len(widths))):
            width = widths[level]
            stage = self.up[level]
            stage.block = nn.ModuleList(
                [ResnetBlock(n_in if i == 0 else width, width) for i in range(cfg.num_res_blocks + 1)]
            )
            if level != 0:
                stage.upsample = Upsample(width)
            n_in = width
        self.norm_out = group_norm(n_in)
        self.conv_out = nn.Conv2d(n_in, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid(self.conv_in(z))
        for stage in reversed(self.up):
            for block in stage.block:
                x = block(x)
            if hasattr(stage, "upsample"):
                x = stage.upsample(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class KlAutoencoder(nn.Module):
    """Encoder + decoder; ``encode``/``decode`` speak raw latents and images in [0, 1]."""

    def __init__(self, cfg: KlConfig = KlConfig(), with_encoder: bool = True):
        super().__init__()
        self.config = cfg
        self.latent_channels = cfg.z_channels
        self.encoder = Encoder(cfg) if with_encoder else None
        self.decoder = Decoder(cfg)
        if cfg.quant_convs:
            self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.z_channels, 1) if with_encoder else None
            self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)

    @classmethod
    def from_state_dict(cls, ldm_sd: dict[str, torch.Tensor]) -> KlAutoencoder:
        """Strict load of LDM-layout tensors; without encoder tensors the model is decoder-only."""
        model = cls(config_from_state_dict(ldm_sd), with_encoder="encoder.conv_in.weight" in ldm_sd)
        model.load_state_dict({k: v.float() for k, v in ldm_sd.items()})
        return model

    def encode(self, images01: torch.Tensor) -> torch.Tensor:
        """The posterior's mean (what ComfyUI's VAEEncode returns), not a sample."""
        moments = self.encoder(images01 * 2 - 1)
        if self.config.quant_convs:
            moments = self.quant_conv(moments)
        return moments[:, : self.config.z_channels]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self.config.quant_convs:
            latents = self.post_quant_conv(latents)
        return (self.decoder(latents) + 1) / 2
