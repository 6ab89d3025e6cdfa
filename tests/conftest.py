"""Shared fixtures. The repository root goes on sys.path so ``import training`` works; the pack itself
(whose ``nodes/`` would shadow ComfyUI's ``nodes.py``) is never imported this way."""
from __future__ import annotations

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

BUNDLED_IMAGES = os.path.join(ROOT, "assets", "images")
TAEF2_DIR = os.path.join(ROOT, "assets", "taef2")


@pytest.fixture(scope="session")
def bundled_images_dir() -> str:
    return BUNDLED_IMAGES


@pytest.fixture(scope="session")
def taef2():
    from training.taesd import load_tiny_autoencoder

    return load_tiny_autoencoder(os.path.join(TAEF2_DIR, "taef2_encoder.pth"), os.path.join(TAEF2_DIR, "taef2_decoder.pth")).eval()


@pytest.fixture(scope="session")
def photo_crops():
    """Four real 128x128 photo crops (B, 3, H, W) from the bundled images."""
    from training.data import center_crop, load_image01, to_tensor

    names = ["astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg"]
    return to_tensor([center_crop(load_image01(os.path.join(BUNDLED_IMAGES, n)), 128) for n in names])


@pytest.fixture(scope="session")
def comfy_server():
    """One real ComfyUI server for the whole host tier (booted on first use, stopped at the end)."""
    from comfy_host import ComfyServer, comfyui_dir

    if comfyui_dir() is None:
        pytest.skip("host tier: set COMFYUI_DIR to a ComfyUI checkout with a venv")
    server = ComfyServer(comfyui_dir())
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
