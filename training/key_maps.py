"""Renaming keys between the layouts a VAE file can come in: kl-f8 diffusers <-> LDM (core's), and the TAESD family's
ComfyUI combined / diffusers ``AutoencoderTiny`` / madebyollin parts <-> canonical. Detection is ``layouts.detect``."""

from __future__ import annotations

import re

import torch


class LayoutError(ValueError):
    """A state dict this pack cannot interpret; the message says what was found and what to do."""


# ----------------------------------------------------------------------------------------------
# kl: diffusers <-> LDM

_DIFFUSERS_ATTENTION = {
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
    "query": "q",
    "key": "k",
    "value": "v",
    "proj_attn": "proj_out",
    "group_norm": "norm",
}
_LDM_ATTENTION = {"q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0", "norm": "group_norm"}
_RESNET_D2L = {"conv_shortcut": "nin_shortcut"}
_RESNET_L2D = {"nin_shortcut": "conv_shortcut"}


def _levels(keys, pattern: str) -> int:
    found = [int(m.group(1)) for k in keys if (m := re.match(pattern, k))]
    return 1 + max(found) if found else 0


def ldm_from_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Diffusers AutoencoderKL keys -> LDM keys (attention projections become 1x1 convs)."""
    decoder_levels = _levels(sd, r"decoder\.up_blocks\.(\d+)\.")
    out = {}
    for key, value in sd.items():
        new = key
        if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)$", key):
            part, name, kind = m.groups()
            if name not in _DIFFUSERS_ATTENTION:
                raise LayoutError(f"unrecognised diffusers attention key {key!r}")
            new = f"{part}.mid.attn_1.{_DIFFUSERS_ATTENTION[name]}.{kind}"
            if kind == "weight" and value.ndim == 2:
                value = value[:, :, None, None]
        elif m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(\w+)\.(.+)$", key):
            part, index, name, rest = m.groups()
            new = f"{part}.mid.block_{int(index) + 1}.{_RESNET_D2L.get(name, name)}.{rest}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(.+)$", key):
            level, index, name, rest = m.groups()
            new = f"encoder.down.{level}.block.{index}.{_RESNET_D2L.get(name, name)}.{rest}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)$", key):
            new = f"encoder.down.{m.group(1)}.downsample.conv.{m.group(2)}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(.+)$", key):
            level, index, name, rest = m.groups()
            new = f"decoder.up.{decoder_levels - 1 - int(level)}.block.{index}.{_RESNET_D2L.get(name, name)}.{rest}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)$", key):
            new = f"decoder.up.{decoder_levels - 1 - int(m.group(1))}.upsample.conv.{m.group(2)}"
        elif m := re.match(r"(encoder|decoder)\.conv_norm_out\.(.+)$", key):
            new = f"{m.group(1)}.norm_out.{m.group(2)}"
        out[new] = value
    return out


def diffusers_from_ldm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LDM keys -> diffusers AutoencoderKL keys (current names: ``to_q`` ... ``to_out.0``)."""
    decoder_levels = _levels(sd, r"decoder\.up\.(\d+)\.")
    out = {}
    for key, value in sd.items():
        new = key
        if m := re.match(r"(encoder|decoder)\.mid\.attn_1\.(\w+)\.(weight|bias)$", key):
            part, name, kind = m.groups()
            new = f"{part}.mid_block.attentions.0.{_LDM_ATTENTION[name]}.{kind}"
            if kind == "weight" and name != "norm" and value.ndim == 4:
                value = value[:, :, 0, 0]
        elif m := re.match(r"(encoder|decoder)\.mid\.block_(\d)\.(\w+)\.(.+)$", key):
            part, index, name, rest = m.groups()
            new = f"{part}.mid_block.resnets.{int(index) - 1}.{_RESNET_L2D.get(name, name)}.{rest}"
        elif m := re.match(r"encoder\.down\.(\d+)\.block\.(\d+)\.(\w+)\.(.+)$", key):
            level, index, name, rest = m.groups()
            new = f"encoder.down_blocks.{level}.resnets.{index}.{_RESNET_L2D.get(name, name)}.{rest}"
        elif m := re.match(r"encoder\.down\.(\d+)\.downsample\.conv\.(.+)$", key):
            new = f"encoder.down_blocks.{m.group(1)}.downsamplers.0.conv.{m.group(2)}"
        elif m := re.match(r"decoder\.up\.(\d+)\.block\.(\d+)\.(\w+)\.(.+)$", key):
            level, index, name, rest = m.groups()
            resnet = f"resnets.{index}.{_RESNET_L2D.get(name, name)}"
            new = f"decoder.up_blocks.{decoder_levels - 1 - int(level)}.{resnet}.{rest}"
        elif m := re.match(r"decoder\.up\.(\d+)\.upsample\.conv\.(.+)$", key):
            new = f"decoder.up_blocks.{decoder_levels - 1 - int(m.group(1))}.upsamplers.0.conv.{m.group(2)}"
        elif m := re.match(r"(encoder|decoder)\.norm_out\.(.+)$", key):
            new = f"{m.group(1)}.conv_norm_out.{m.group(2)}"
        out[new] = value
    return out


# ----------------------------------------------------------------------------------------------
# tiny: ComfyUI combined / diffusers AutoencoderTiny / madebyollin parts <-> canonical


def tiny_from_comfy(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI's combined ``taesd_encoder.`` / ``taesd_decoder.`` keys -> canonical (scale/shift dropped)."""
    out = {}
    for key, value in sd.items():
        for prefix, part in (("taesd_encoder.", "encoder."), ("taesd_decoder.", "decoder.")):
            if key.startswith(prefix):
                out[part + key[len(prefix) :]] = value
    return out


def comfy_from_tiny(sd: dict[str, torch.Tensor], latent_scale: float, latent_shift: float) -> dict[str, torch.Tensor]:
    """Canonical tiny keys -> the combined layout ComfyUI's VAE class builds a TAESD from."""
    out = {("taesd_" + key): value for key, value in sd.items()}
    out["vae_scale"] = torch.tensor(float(latent_scale))
    out["vae_shift"] = torch.tensor(float(latent_shift))
    return out


def tiny_from_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Diffusers AutoencoderTiny -> canonical: its decoder Sequential starts after madebyollin's Clamp."""
    out = {}
    for key, value in sd.items():
        if m := re.match(r"encoder\.layers\.(\d+)\.(.+)$", key):
            out[f"encoder.{m.group(1)}.{m.group(2)}"] = value
        elif m := re.match(r"decoder\.layers\.(\d+)\.(.+)$", key):
            out[f"decoder.{int(m.group(1)) + 1}.{m.group(2)}"] = value
    return out


def diffusers_from_tiny(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in sd.items():
        part, index, rest = key.split(".", 2)
        index = int(index) - (1 if part == "decoder" else 0)
        out[f"{part}.layers.{index}.{rest}"] = value
    return out


def tiny_part_of(sd: dict[str, torch.Tensor]) -> str | None:
    """'encoder' or 'decoder' for a bare madebyollin part file (``0.weight`` ...), else None.

    A decoder's index 1 is a conv (``1.weight``); an encoder's index 1 is a Block (``1.conv.0.weight``).
    """
    if not sd or not all(re.match(r"\d+\.", k) for k in sd):
        return None
    if "1.weight" in sd:
        return "decoder"
    if "0.weight" in sd and sd["0.weight"].ndim == 4 and sd["0.weight"].shape[1] == 3:
        return "encoder"
    return None
