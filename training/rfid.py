"""rFID (reconstruction FID) as an opt-in extra, through the ``pytorch-fid`` package (mseitzer/pytorch-fid: the
FID Inception network and its Fréchet distance, as most papers compute it) and weights the user supplies.

Nothing is downloaded: pytorch-fid would fetch ``pt_inception-2015-12-05-6726825d.pth`` from GitHub; here the
file is read from the user's folder with ``weights_only=True`` and handed to pytorch-fid's builder instead.
rFID compares the *distribution* of reconstructions with that of the references: with few images it is biased
and noisy (the model cards use COCO 2017 val, 5000 images), so a warning is given below ``MIN_IMAGES``.
"""

from __future__ import annotations

import os
import threading

import numpy as np
import torch

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_FILE
MIN_IMAGES = 500
_BUILD_LOCK = threading.Lock()


class RfidUnavailable(RuntimeError):
    """rFID asked for but its library or weights are missing; the message says how to add them."""


def find_weights(folders: list[str]) -> str | None:
    """The FID Inception weights in the first folder that has them, then torch's own cache."""
    from .perceptual import torch_hub_checkpoints_dir

    for folder in [*folders, torch_hub_checkpoints_dir()]:
        path = os.path.join(folder, WEIGHTS_FILE)
        if os.path.isfile(path):
            return path
    return None


def inception(weights_path: str) -> torch.nn.Module:
    """pytorch-fid's InceptionV3 (2048-d pool features, inputs in [0, 1] resized to 299) with the user's weights."""
    try:
        from pytorch_fid import inception as fid_inception
    except ImportError as exc:
        raise RfidUnavailable(
            "rFID needs the pytorch-fid package: install it into ComfyUI's Python (python -m pip install pytorch-fid)"
        ) from exc
    from .files import load_state_dict_file

    tensors = load_state_dict_file(weights_path)  # weights_only=True; a pickle with code is refused
    with _BUILD_LOCK:  # pytorch-fid fetches by URL inside its builder: give it the file's tensors instead
        original = fid_inception.load_state_dict_from_url
        fid_inception.load_state_dict_from_url = lambda *args, **kwargs: tensors
        try:
            model = fid_inception.InceptionV3([fid_inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
        finally:
            fid_inception.load_state_dict_from_url = original
    return model.eval()


@torch.no_grad()
def features(model: torch.nn.Module, images01: torch.Tensor, batch: int = 16) -> np.ndarray:
    """(N, 2048) pool features of (N, 3, H, W) images in [0, 1]."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, images01.shape[0], batch):
        chunk = images01[start : start + batch].float().clamp(0, 1).to(device)
        out.append(model(chunk)[0].flatten(1).double().cpu().numpy())
    return np.concatenate(out)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """FID between two feature sets (pytorch-fid's closed form on their means and covariances)."""
    from pytorch_fid.fid_score import calculate_frechet_distance

    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError("rFID needs at least 2 images")
    return float(calculate_frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)))


def rfid_per_decoder(
    model: torch.nn.Module, reference01: torch.Tensor, outputs: dict[str, torch.Tensor]
) -> tuple[dict[str, float], str | None]:
    """{label: rFID} against the references, and a warning when there are too few images to trust it."""
    count = reference01.shape[0]
    if count < 2:
        raise ValueError(f"rFID needs at least 2 images (got {count}); use more images or turn rfid off")
    reference = features(model, reference01)
    values = {label: frechet_distance(reference, features(model, out)) for label, out in outputs.items()}
    warning = None
    if count < MIN_IMAGES:
        warning = (
            f"rFID on {count} images is biased and noisy (the model cards use 5000; use {MIN_IMAGES}+ before "
            "reading differences between decoders)"
        )
    return values, warning
