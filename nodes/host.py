"""The one adapter between ComfyUI's objects and the host-free ``training`` library.

ComfyUI IMAGE tensors are (B, H, W, 3) float in [0, 1], created under ``torch.inference_mode()``;
``training`` works on (B, 3, H, W). Everything that touches ``comfy`` or ``folder_paths`` lives here.
"""

from __future__ import annotations

import os

import torch

from ..training import perceptual

LPIPS_FOLDER = "lpips"
DECODERS_FOLDER = "vae_decoders"


def register_model_folders() -> None:
    """Adds ``models/lpips`` (and LPIPS's offline search path), ``output/vae_approx`` and ``vae_decoders`` to
    ComfyUI's folders."""
    import folder_paths

    default = os.path.join(folder_paths.models_dir, LPIPS_FOLDER)
    if LPIPS_FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[LPIPS_FOLDER] = ([default], {".pth", ".safetensors"})
    for folder in folder_paths.get_folder_paths(LPIPS_FOLDER):
        if folder not in perceptual.SEARCH_DIRS:
            perceptual.SEARCH_DIRS.append(folder)
    # finetuned TAESD-family decoders ComfyUI cannot build are saved as madebyollin pairs in output/vae_approx;
    # decoder-only kl files in models|output/vae_decoders, where core Load VAE does not look
    output = folder_paths.get_output_directory()
    if os.path.join(output, "vae_approx") not in folder_paths.get_folder_paths("vae_approx"):
        folder_paths.add_model_folder_path("vae_approx", os.path.join(output, "vae_approx"))
    if DECODERS_FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[DECODERS_FOLDER] = (
            [os.path.join(folder_paths.models_dir, DECODERS_FOLDER), os.path.join(output, DECODERS_FOLDER)],
            set(folder_paths.supported_pt_extensions),
        )


def images01_from_comfy(image: torch.Tensor, name: str) -> torch.Tensor:
    """ComfyUI IMAGE (B, H, W, C) -> float32 (B, 3, H, W), a normal (non-inference) tensor."""
    if image.ndim != 4 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"{name}: expected an IMAGE batch (B, H, W, 3), got shape {tuple(image.shape)}")
    with torch.inference_mode(False):
        pixels = image[..., :3] if image.shape[-1] != 1 else image.expand(-1, -1, -1, 3)
        return pixels.movedim(-1, 1).float().clone()


def comfy_from_images01(images01: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> ComfyUI IMAGE (B, H, W, 3) on the CPU, clamped to [0, 1]."""
    return images01.detach().clamp(0, 1).movedim(1, -1).float().cpu().contiguous()


def matching_batches(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs two (B, 3, H, W) batches image by image; a batch of one is paired with every image of the other."""
    if a.shape[-2:] != b.shape[-2:]:
        raise ValueError(
            f"{name_a} is {a.shape[-1]}x{a.shape[-2]} but {name_b} is {b.shape[-1]}x{b.shape[-2]}: "
            "both must have the same size (resize or crop one of them, e.g. with Upscale Image or ImageCrop)."
        )
    if a.shape[0] != b.shape[0]:
        if a.shape[0] == 1:
            a = a.expand(b.shape[0], -1, -1, -1)
        elif b.shape[0] == 1:
            b = b.expand(a.shape[0], -1, -1, -1)
        else:
            raise ValueError(
                f"{name_a} has {a.shape[0]} images but {name_b} has {b.shape[0]}: give both the same number, "
                "or one image to compare against every image of the other."
            )
    return a, b


def images_from_comfy_batch(image: torch.Tensor, name: str) -> list:
    """ComfyUI IMAGE (B, H, W, C) -> list of float32 (H, W, 3) numpy arrays in [0, 1]."""
    pixels = images01_from_comfy(image, name).clamp(0, 1)
    return [p.permute(1, 2, 0).numpy().copy() for p in pixels]


def training_device() -> torch.device:
    """Where ComfyUI runs models (its --cpu / device choice is honoured)."""
    import comfy.model_management

    return comfy.model_management.get_torch_device()


def output_folder(kind: str) -> str:
    """``output/<kind>``: where VAE Lab writes files of that kind."""
    import folder_paths

    return os.path.join(folder_paths.get_output_directory(), kind)
