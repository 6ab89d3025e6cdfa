"""The Tiny AutoEncoder family (TAESD, TAESDXL, TAESD3, TAEF1, TAEF2) as plain torch modules.

Architecture and state-dict layout follow madebyollin/taesd (MIT): encoder and decoder are
``nn.Sequential`` stacks whose indices are the key prefixes of the published ``*_encoder.pth`` /
``*_decoder.pth`` files, so those files load strictly. TAEF2 adds a "mid-block GroupNorm" branch
(``<i>.pool.*``) to the low-resolution blocks, which ComfyUI 0.3.64's TAESD class lacks.

Images are in [0, 1]; latents are the raw latents of the big VAE's latent space (scaled/shifted for
taesd..taef1 the way the host expects, unscaled for TAEF2).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

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
        self.conv = nn.Sequential(
            conv3x3(n_in, n_out), nn.ReLU(), conv3x3(n_out, n_out), nn.ReLU(), conv3x3(n_out, n_out)
        )
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.fuse = nn.ReLU()
        self.pool = None
        if midblock_groupnorm:
            wide = 4 * n_in
            self.pool = nn.Sequential(
                nn.Conv2d(n_in, wide, 1, bias=False),
                nn.GroupNorm(4, wide),
                nn.ReLU(),
                nn.Conv2d(wide, n_in, 1, bias=False),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool is not None:
            x = x + self.pool(x)
        return self.fuse(self.conv(x) + self.skip(x))


def _blocks(count: int, midblock_groupnorm: bool = False) -> list[nn.Module]:
    return [Block(WIDTH, WIDTH, midblock_groupnorm) for _ in range(count)]


def tiny_encoder(latent_channels: int, midblock_groupnorm: bool = False) -> nn.Sequential:
    """Image [0,1] (B,3,H,W) -> latents (B,C,H/8,W/8)."""

    def down() -> nn.Module:
        return conv3x3(WIDTH, WIDTH, stride=2, bias=False)

    return nn.Sequential(
        conv3x3(3, WIDTH),
        *_blocks(1),
        down(),
        *_blocks(3),
        down(),
        *_blocks(3),
        down(),
        *_blocks(3, midblock_groupnorm),
        conv3x3(WIDTH, latent_channels),
    )


def tiny_decoder(latent_channels: int, midblock_groupnorm: bool = False) -> nn.Sequential:
    """Latents (B,C,h,w) -> image (B,3,8h,8w), nominally [0,1] but not clamped."""

    def up() -> list[nn.Module]:
        return [nn.Upsample(scale_factor=2), conv3x3(WIDTH, WIDTH, bias=False)]

    return nn.Sequential(
        SoftClamp(),
        conv3x3(latent_channels, WIDTH),
        nn.ReLU(),
        *_blocks(3, midblock_groupnorm),
        *up(),
        *_blocks(3),
        *up(),
        *_blocks(3),
        *up(),
        *_blocks(1),
        conv3x3(WIDTH, 3),
    )


@dataclass(frozen=True)
class TinyVariant:
    """One member of the family: its latent space and how the host maps raw latents for it.

    ``decode(raw) = decoder((raw - latent_shift) * latent_scale)``: scale/shift are the big VAE's
    latent normalisation, which madebyollin's decoders were trained to undo (ComfyUI's values for
    the four it knows). TAEF2 was distilled on raw FLUX.2 latents: scale 1, shift 0.
    """

    name: str
    latent_space: str
    latent_channels: int
    latent_scale: float
    latent_shift: float
    midblock_groupnorm: bool = False


VARIANTS = {
    v.name: v
    for v in (
        TinyVariant("taesd", "SD 1.x/2.x", 4, 0.18215, 0.0),
        TinyVariant("taesdxl", "SDXL", 4, 0.13025, 0.0),
        TinyVariant("taesd3", "SD3", 16, 1.5305, 0.0609),
        TinyVariant("taef1", "FLUX.1", 16, 0.3611, 0.1159),
        TinyVariant("taef2", "FLUX.2", 32, 1.0, 0.0, midblock_groupnorm=True),
    )
}


def variant_from_name(file_name: str) -> TinyVariant | None:
    """The variant a madebyollin-style file name announces (``taesdxl_decoder.safetensors``), if any."""
    stem = file_name.lower().replace("\\", "/").rsplit("/", 1)[-1]
    for name in sorted(VARIANTS, key=len, reverse=True):  # 'taesdxl' before 'taesd'
        if stem.startswith(name):
            return VARIANTS[name]
    return None


def variant_from_scale(latent_scale: float, latent_shift: float) -> TinyVariant | None:
    for variant in VARIANTS.values():
        if abs(variant.latent_scale - latent_scale) < 1e-4 and abs(variant.latent_shift - latent_shift) < 1e-4:
            return variant
    return None


PART_FILE = re.compile(r"^(?P<stem>.+)_(?P<part>encoder|decoder)\.(safetensors|pth|pt|bin|ckpt)$", re.IGNORECASE)


def group_tiny_files(names: list[str]) -> tuple[dict[str, tuple[str, str]], list[str]]:
    """madebyollin-style file names -> ({stem: (encoder file, decoder file)}, every other file).

    ``taesdxl_encoder.pth`` + ``taesdxl_decoder.pth`` pair up as ``taesdxl``; a lone
    ``*_decoder.*`` or a combined/diffusers file is listed on its own.
    """
    parts: dict[str, dict[str, str]] = {}
    for name in names:
        if m := PART_FILE.match(name):
            parts.setdefault(m.group("stem"), {}).setdefault(m.group("part"), name)
    pairs = {stem: (p["encoder"], p["decoder"]) for stem, p in sorted(parts.items()) if len(p) == 2}
    paired = {f for pair in pairs.values() for f in pair}
    return pairs, [n for n in sorted(names) if n not in paired]


class TinyAutoencoder(nn.Module):
    """Encoder + decoder pair; ``encode``/``decode`` speak raw latents and images in [0, 1].

    State-dict keys are canonical: madebyollin's indices under ``encoder.`` / ``decoder.``.
    """

    def __init__(
        self,
        latent_channels: int,
        midblock_groupnorm: bool = False,
        latent_scale: float = 1.0,
        latent_shift: float = 0.0,
        with_encoder: bool = True,
    ):
        super().__init__()
        self.latent_channels = latent_channels
        self.latent_scale = float(latent_scale)
        self.latent_shift = float(latent_shift)
        self.encoder = tiny_encoder(latent_channels, midblock_groupnorm) if with_encoder else None
        self.decoder = tiny_decoder(latent_channels, midblock_groupnorm)

    @classmethod
    def from_canonical(
        cls, tensors: dict[str, torch.Tensor], latent_scale: float = 1.0, latent_shift: float = 0.0
    ) -> TinyAutoencoder:
        """Strict load of canonical tensors (see ``training.layouts``); without an encoder half the
        model is decoder-only."""
        channels = tensors["decoder.1.weight"].shape[1]
        model = cls(
            int(channels),
            any(".pool." in k for k in tensors),
            latent_scale,
            latent_shift,
            with_encoder="encoder.0.weight" in tensors,
        )
        model.load_state_dict({k: v.float() for k, v in tensors.items()})
        return model

    def encode(self, images01: torch.Tensor) -> torch.Tensor:
        return self.encoder(images01) / self.latent_scale + self.latent_shift

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder((latents - self.latent_shift) * self.latent_scale)


def load_tiny_autoencoder(encoder_path, decoder_path) -> TinyAutoencoder:
    """A TinyAutoencoder from madebyollin's ``<name>_encoder.pth`` / ``<name>_decoder.pth`` pair.

    The variant (and so its latent scale/shift) comes from the file name, as in madebyollin's code.
    """
    from .files import load_state_dict_file
    from .layouts import detect

    tensors = {
        **detect(load_state_dict_file(encoder_path), "encoder").tensors,
        **detect(load_state_dict_file(decoder_path), "decoder").tensors,
    }
    variant = variant_from_name(os.path.basename(os.fspath(decoder_path)))
    scale, shift = (variant.latent_scale, variant.latent_shift) if variant else (1.0, 0.0)
    return TinyAutoencoder.from_canonical(tensors, scale, shift)
