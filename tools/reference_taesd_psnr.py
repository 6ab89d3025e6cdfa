#!/usr/bin/env python3
"""Reproduces the reference figures in tests/test_taesd.py with madebyollin's own taesd.py.

VAE Lab does not ship that file: fetch github.com/madebyollin/taesd (the figures were taken at commit
5cccb12) and pass its taesd.py. Runs TAESD(encoder_path, decoder_path) on the bundled TAEF2 and the
bundled images' central 256x256 crops and prints scikit-image PSNR per image.
"""

import argparse
import glob
import importlib.util
import os

import numpy as np
import torch
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--taesd-py", required=True, help="path to madebyollin's taesd.py")
    args = parser.parse_args()
    spec = importlib.util.spec_from_file_location("madebyollin_taesd", args.taesd_py)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    weights = os.path.join(ROOT, "assets", "taef2")
    model = module.TAESD(
        encoder_path=os.path.join(weights, "taef2_encoder.pth"), decoder_path=os.path.join(weights, "taef2_decoder.pth")
    ).eval()
    for path in sorted(glob.glob(os.path.join(ROOT, "assets", "images", "*.*"))):
        if path.endswith(".md"):
            continue
        pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255
        top, left = (pixels.shape[0] - 256) // 2, (pixels.shape[1] - 256) // 2
        crop = pixels[top : top + 256, left : left + 256]
        with torch.no_grad():
            out = model.decoder(model.encoder(torch.from_numpy(crop).permute(2, 0, 1)[None])).clamp(0, 1)
        psnr = peak_signal_noise_ratio(
            crop.astype(np.float64), out[0].permute(1, 2, 0).double().numpy(), data_range=1.0
        )
        print(f"{os.path.basename(path)}: {psnr:.4f}")


if __name__ == "__main__":
    main()
