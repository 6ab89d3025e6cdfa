#!/usr/bin/env python3
"""Compare Reconstructions' speed: the node (4 VAEs x N images, autoencoders mode) vs a plain loop of core
VAEEncode / VAEDecode per image and per VAE plus the same metrics, same process, same VAE objects, interleaved
runs, median time per image. Needs a ComfyUI checkout; run it with ComfyUI's Python:

    $COMFYUI_DIR/venv/bin/python bench/compare_speed.py --comfyui $COMFYUI_DIR [--images 8] [--size 256] [--repeats 3]

VAEs: a full-size SD/SDXL-layout kl-f8 and a TAESD pair (random weights in the real layouts), the bundled TAEF2, and
the kl-f8 again under another label (so two of the four are heavyweights). Images: the bundled photos, centre-cropped.
The node also draws the grid, crops and heatmaps; the naive loop only computes the numbers.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

PACK = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--comfyui", default=os.environ.get("COMFYUI_DIR"), help="ComfyUI checkout (default $COMFYUI_DIR)"
    )
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=4, help="the node's chunk_size")
    args = parser.parse_args()
    if not args.comfyui:
        parser.error("--comfyui (or $COMFYUI_DIR) must name a ComfyUI checkout")
    sys.path.insert(0, os.path.join(PACK, "tests", "host_scripts"))
    from host_boot import boot

    boot(args.comfyui)
    import numpy as np
    import torch
    from vae_lab.nodes.compare import CompareReconstructions, VAEList
    from vae_lab.nodes.load_tiny_autoencoder import BUNDLED_TAEF2, LoadTinyAutoencoder
    from vae_lab.nodes.load_vae_decoder import LoadVAEDecoder
    from vae_lab.training import data, metrics

    import nodes

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from random_vaes import write_random_vaes

    write_random_vaes()
    kl = LoadVAEDecoder.execute(vae_name="kl4.safetensors", encoder="from this file", base_file="(none)").result[0]
    pair = LoadTinyAutoencoder.execute(name="taesd", latent_space="auto", encoder="from this file").result[0]
    taef2 = LoadTinyAutoencoder.execute(name=BUNDLED_TAEF2, latent_space="auto", encoder="from this file").result[0]
    vaes = [("kl-f8", kl), ("taesd", pair), ("taef2", taef2), ("kl-f8 again", kl)]
    vae_list = None
    for label, vae in vaes:
        vae_list = VAEList.execute(vae, label, vae_list).result[0]

    folder = os.path.join(PACK, "assets", "images")
    found = data.ImageFolder(folder, min_side=args.size)
    crops = []
    for i in range(args.images):
        image = found.image(i % len(found))
        top, left = (image.shape[0] - args.size) // 2, (image.shape[1] - args.size) // 2
        crops.append(image[top : top + args.size, left : left + args.size])
    images = torch.from_numpy(np.stack(crops)).float()  # ComfyUI IMAGE (B, H, W, 3)

    def ours():  # ComfyUI runs nodes in inference mode
        with torch.inference_mode():
            CompareReconstructions.execute(images, vae_list, "autoencoders", "off", False, 512, args.chunk, 64, 1, 2)

    @torch.inference_mode()
    def naive():
        reference = images.movedim(-1, 1)
        for _label, vae in vaes:
            for i in range(images.shape[0]):
                latent = nodes.VAEEncode().encode(vae, images[i : i + 1])[0]
                decoded = nodes.VAEDecode().decode(vae, latent)[0].movedim(-1, 1)
                metrics.reconstruction_metrics(decoded, reference[i : i + 1])

    times = {"VAE Lab Compare Reconstructions": [], "core VAEEncode/VAEDecode loop + metrics": []}
    ours()  # warm-up: first-call allocations and module loads
    naive()
    for _ in range(args.repeats):
        for name, fn in zip(times, (ours, naive)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    device = "CUDA" if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\n{len(vaes)} VAEs x {args.images} images at {args.size}², {device}, median of {args.repeats}")
    print("| | total s | ms per image per VAE |")
    print("|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.2f} | {median / (len(vaes) * args.images) * 1000:.0f} |")


if __name__ == "__main__":
    main()
