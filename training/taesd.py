"""The Tiny AutoEncoder family (TAESD, TAESDXL, TAESD3, TAEF1, TAEF2) as plain torch modules.

Architecture and state-dict layout follow madebyollin/taesd (MIT): encoder and decoder are
``nn.Sequential`` stacks whose indices are the key prefixes of the published ``*_encoder.pth`` /
``*_decoder.pth`` files, so those files load strictly. TAEF2 adds a "mid-block GroupNorm" branch
(``<i>.pool.*``) to the low-resolution blocks, which ComfyUI 0.3.64's TAESD class lacks.

Images are in [0, 1]; latents are the raw latents of the big VAE's latent space (scaled/shifted for
taesd..taef1 the way the host expects, unscaled for TAEF2).
"""
from __future__ import annotations

import torch
from torch import nn

WIDTH = 64


def conv3x3(n_in: int, n_out: int, **kwargs) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)


class SoftClamp(nn.Module):
    """Squashes latents smoothly into (-3, 3) before decoding."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class Block(nn.Module):
    """Residual block: three 3x3 convs beside an identity (or 1x1) skip, optionally preceded by a
    mid-block GroupNorm branch that adds ``pool(x)`` to its input (TAEF2)."""

    def __init__(self, n_in: int, n_out: int, midblock_groupnorm: bool = False):
        super().__init__()
        self.conv = nn.Sequential(conv3x3(n_in, n_out), nn.ReLU(), conv3x3(n_out, n_out), nn.ReLU(), conv3x3(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.fuse = nn.ReLU()
        self.pool = None
        if midblock_groupnorm:
            wide = 4 * n_in
            self.pool = nn.Sequential(
                nn.Conv2d(n_in, wide, 1, bias=False), nn.GroupNorm(4, wide), nn.ReLU(), nn.Conv2d(wide, n_in, 1, bias=False)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is not None:
            x = x + self.pool(x)
        return self.fuse(self.conv(x) + self.skip(x))


def _blocks(count: int, midblock_groupnorm: bool = False) -> list[nn.Module]:
    return [Block(WIDTH, WIDTH, midblock_groupnorm) for _ in range(count)]


def tiny_encoder(latent_channels: int, midblock_groupnorm: bool = False) -> nn.Sequential:
    """Image [0,1] (B,3,H,W) -> latents (B,C,H/8,W/8)."""
    down = lambda: conv3x3(WIDTH, WIDTH, stride=2, bias=False)  # noqa: E731
    return nn.Sequential(
        conv3x3(3, WIDTH), *_blocks(1),
        down(), *_blocks(3),
        down(), *_blocks(3),
        down(), *_blocks(3, midblock_groupnorm),
        conv3x3(WIDTH, latent_channels),
    )


def tiny_decoder(latent_channels: int, midblock_groupnorm: bool = False) -> nn.Sequential:
    """Latents (B,C,h,w) -> image (B,3,8h,8w), nominally [0,1] but not clamped."""
    up = lambda: [nn.Upsample(scale_factor=2), conv3x3(WIDTH, WIDTH, bias=False)]  # noqa: E731
    return nn.Sequential(
        SoftClamp(), conv3x3(latent_channels, WIDTH), nn.ReLU(),
        *_blocks(3, midblock_groupnorm), *up(),
        *_blocks(3), *up(),
        *_blocks(3), *up(),
        *_blocks(1), conv3x3(WIDTH, 3),
    )


def tiny_layout_of(state_dict: dict[str, torch.Tensor], part: str) -> tuple[int, bool]:
    """(latent_channels, midblock_groupnorm) of a madebyollin-layout encoder or decoder state dict."""
    if part == "encoder":
        last = max(int(k.split(".")[0]) for k in state_dict)
        latent_channels = state_dict[f"{last}.weight"].shape[0]
    elif part == "decoder":
        latent_channels = state_dict["1.weight"].shape[1]
    else:
        raise ValueError(f"part must be 'encoder' or 'decoder', not {part!r}")
    return int(latent_channels), any(".pool." in k for k in state_dict)


class TinyAutoencoder(nn.Module):
    """Encoder + decoder pair; ``encode``/``decode`` speak raw latents, images in [0, 1]."""

    def __init__(self, latent_channels: int, midblock_groupnorm: bool = False):
        super().__init__()
        self.latent_channels = latent_channels
        self.encoder = tiny_encoder(latent_channels, midblock_groupnorm)
        self.decoder = tiny_decoder(latent_channels, midblock_groupnorm)

    @classmethod
    def from_state_dicts(cls, encoder_sd: dict, decoder_sd: dict) -> "TinyAutoencoder":
        channels, midblock_gn = tiny_layout_of(decoder_sd, "decoder")
        model = cls(channels, midblock_gn)
        model.encoder.load_state_dict({k: v.float() for k, v in encoder_sd.items()})
        model.decoder.load_state_dict({k: v.float() for k, v in decoder_sd.items()})
        return model

    def encode(self, images01: torch.Tensor) -> torch.Tensor:
        return self.encoder(images01)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(latents)


def load_tiny_autoencoder(encoder_path, decoder_path) -> TinyAutoencoder:
    """A TinyAutoencoder from madebyollin's ``<name>_encoder.pth`` / ``<name>_decoder.pth`` pair."""
    from .files import load_state_dict_file

    return TinyAutoencoder.from_state_dicts(load_state_dict_file(encoder_path), load_state_dict_file(decoder_path))
