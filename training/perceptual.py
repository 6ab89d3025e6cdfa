"""LPIPS (Zhang et al. 2018) through the ``lpips`` package, with backbone weights found offline.

The ``lpips`` package ships only its small linear heads; the AlexNet / VGG16 backbones are torchvision's
ImageNet weights, which torchvision would download on first use. Here nothing downloads silently: the
backbone file is looked up, in order, at

1. an explicit path given by the caller,
2. every folder in :data:`SEARCH_DIRS` (inside ComfyUI the host adapter adds ``models/lpips``),
3. ``$TORCH_HOME/hub/checkpoints`` (where torchvision itself caches them),

and a missing file raises :class:`LpipsWeightsMissing` naming the file and where to put it, unless the
caller opted in to ``allow_download``. A random backbone is never used by accident.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from .files import load_state_dict_file


@dataclass(frozen=True)
class Backbone:
    filename: str
    url: str


BACKBONES = {
    "vgg": Backbone("vgg16-397923af.pth", "https://download.pytorch.org/models/vgg16-397923af.pth"),
    "alex": Backbone("alexnet-owt-7be5be79.pth", "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"),
}

SEARCH_DIRS: list[str] = []


class LpipsWeightsMissing(FileNotFoundError):
    pass


def torch_hub_checkpoints_dir() -> str:
    return os.path.join(torch.hub.get_dir(), "checkpoints")


def find_backbone_file(net: str, explicit_path: str | None = None) -> str | None:
    """Path of the backbone weights for ``net`` ('vgg' or 'alex'), or None when nowhere to be found."""
    if explicit_path:
        if not os.path.isfile(explicit_path):
            raise LpipsWeightsMissing(f"LPIPS backbone file {explicit_path} does not exist")
        return explicit_path
    filename = BACKBONES[net].filename
    for folder in [*SEARCH_DIRS, torch_hub_checkpoints_dir()]:
        candidate = os.path.join(folder, filename)
        if os.path.isfile(candidate):
            return candidate
    return None


def missing_backbone_message(net: str) -> str:
    backbone = BACKBONES[net]
    places = " or ".join([*SEARCH_DIRS, torch_hub_checkpoints_dir()])
    return (
        f"LPIPS-{net} backbone not found: put {backbone.filename} (from {backbone.url}) in {places}, "
        "or allow the download explicitly, or pick a recipe without LPIPS."
    )


def _download_backbone(net: str) -> str:
    backbone = BACKBONES[net]
    folder = SEARCH_DIRS[0] if SEARCH_DIRS else torch_hub_checkpoints_dir()
    os.makedirs(folder, exist_ok=True)
    destination = os.path.join(folder, backbone.filename)
    torch.hub.download_url_to_file(backbone.url, destination, hash_prefix=backbone.filename.rsplit("-", 1)[1][:8])
    return destination


class Lpips(nn.Module):
    """LPIPS distance per image. Inputs are images in [0, 1] (B,3,H,W); they are mapped to [-1, 1] here,
    once. Frozen, in eval mode; gradients flow to the inputs only."""

    def __init__(self, net: str = "vgg", backbone_path: str | None = None, allow_download: bool = False):
        super().__init__()
        if net not in BACKBONES:
            raise ValueError(f"LPIPS net must be one of {sorted(BACKBONES)}, not {net!r}")
        path = find_backbone_file(net, backbone_path)
        if path is None:
            if not allow_download:
                raise LpipsWeightsMissing(missing_backbone_message(net))
            path = _download_backbone(net)
        self.net_name = net
        self.backbone_path = path
        self.model = build_lpips_with_backbone(net, load_state_dict_file(path))

    def forward(self, images01_a: torch.Tensor, images01_b: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=images01_a.device.type, enabled=False):
            a = images01_a.float() * 2 - 1
            b = images01_b.float() * 2 - 1
            return self.model(a, b, normalize=False).flatten()


def build_lpips_with_backbone(net: str, torchvision_features: dict[str, torch.Tensor]) -> nn.Module:
    """An ``lpips.LPIPS`` module whose backbone holds ``torchvision_features`` (torchvision's own
    ``features.<i>.*`` keys), built without any download."""
    import lpips

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torchvision's deprecation notice for `pretrained=`
        model = lpips.LPIPS(net=net, pnet_rand=True, verbose=False)
    backbone = model.net
    wanted = {}
    for slice_name, layers in backbone.named_children():
        for index, _layer in layers.named_children():
            for param_name, _ in _layer.named_parameters():
                wanted[f"{slice_name}.{index}.{param_name}"] = f"features.{index}.{param_name}"
    missing = [src for src in wanted.values() if src not in torchvision_features]
    if missing:
        raise ValueError(f"not a torchvision {net} backbone: missing {missing[:4]}")
    backbone.load_state_dict({dst: torchvision_features[src].float() for dst, src in wanted.items()})
    model.eval().requires_grad_(False)
    return model


def lpips_if_available(net: str, backbone_path: str | None = None) -> Lpips | None:
    """For metrics: the LPIPS module, or None (reported as unavailable) when its backbone is absent."""
    try:
        return Lpips(net, backbone_path)
    except LpipsWeightsMissing:
        return None
