#!/usr/bin/env python3
"""VAE Lab standalone demo: reconstruct real images through the real TAEF2 autoencoder and measure it.

    tools/demo.sh [--images DIR] [--out DIR] [--size 256]

For each image: Lanczos-resize the short side to --size, take the centre square, encode + decode with
TAEF2 (bundled, MIT) on CUDA when present else the CPU, then write
  <out>/reconstruction.png   rows = images; columns = original | TAEF2 | Oklab ΔE heatmap
  <out>/metrics.md           mean ± std table (PSNR, SSIM, Oklab ΔE, detail ratio, LPIPS when available)
  <out>/metrics.json         the per-image numbers
No ComfyUI needed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch

from training import data, metrics, perceptual, report, visualize
from training.taesd import load_tiny_autoencoder

HEATMAP_MAX = 0.1


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", default=os.path.join(ROOT, "assets", "images"), help="folder of images (default: the bundled photos)")
    p.add_argument("--out", default=os.path.join(ROOT, "out", "demo"), help="where to write results (default: out/demo)")
    p.add_argument("--size", type=int, default=256, help="evaluation crop size in pixels, a multiple of 8 (default 256)")
    p.add_argument("--taef2", default=os.path.join(ROOT, "assets", "taef2"), help="folder with taef2_encoder.pth / taef2_decoder.pth")
    p.add_argument("--lpips-dir", default=None, help="extra folder to look in for LPIPS backbone weights")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.size % 8:
        sys.exit(f"--size must be a multiple of 8 (TAEF2 works on 8x8 pixel cells), got {args.size}")
    if args.lpips_dir:
        perceptual.SEARCH_DIRS.append(args.lpips_dir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    os.makedirs(args.out, exist_ok=True)

    try:
        folder = data.ImageFolder(args.images, min_side=args.size)
    except (data.NoUsableImages, NotADirectoryError) as exc:
        sys.exit(f"--images: {exc}")
    if folder.skipped.count:
        print(f"note: {folder.skipped.summary()}")
    names = [os.path.relpath(p, args.images) for p in folder.paths]
    references = data.to_tensor([data.center_crop(folder.image(i), args.size) for i in range(len(folder))])

    model = load_tiny_autoencoder(os.path.join(args.taef2, "taef2_encoder.pth"), os.path.join(args.taef2, "taef2_decoder.pth"))
    model = model.to(device).eval()
    start = time.perf_counter()
    with torch.no_grad():
        outputs = torch.cat([model.decode(model.encode(chunk.to(device))).float().cpu() for chunk in references.split(8)])
    seconds = time.perf_counter() - start

    lpips_models = {net: perceptual.lpips_if_available(net) for net in ("alex", "vgg")}
    per_image = metrics.reconstruction_metrics(outputs, references, {n: m for n, m in lpips_models.items() if m is not None})
    missing = {f"lpips_{n}": "unavailable (no weights)" for n, m in lpips_models.items() if m is None}

    heat = visualize.heatmap(metrics.delta_e_map(outputs, references), HEATMAP_MAX)
    rows = [[references[i], outputs[i].clamp(0, 1), heat[i]] for i in range(len(names))]
    header = [visualize.label(torch.zeros(3, 0, args.size), t) for t in ("original", "TAEF2 reconstruction", f"Oklab dE heatmap (black 0, yellow {HEATMAP_MAX}+)")]
    picture = visualize.grid([header] + rows)
    visualize.save_png(picture, os.path.join(args.out, "reconstruction.png"))

    table = report.markdown_table({"TAEF2": per_image}, missing)
    with open(os.path.join(args.out, "metrics.md"), "w") as f:
        f.write(f"# TAEF2 reconstruction, {len(names)} images, {args.size}² centre crops\n\n{table}\n")
        if missing:
            f.write("\n" + perceptual.missing_backbone_message("alex") + "\n")
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump({
            "images": names,
            "size": args.size,
            "device": str(device),
            "per_image": {k: [float(x) for x in v] for k, v in per_image.items()},
            "summary": report.summarize(per_image),
            "unavailable": sorted(missing),
            "skipped": folder.skipped.by_reason,
        }, f, indent=2)

    print(f"TAEF2 on {device}: {len(names)} images at {args.size}² in {seconds:.1f} s")
    print(table)
    if missing:
        print("LPIPS: " + perceptual.missing_backbone_message("alex"))
    print(f"wrote {os.path.join(args.out, 'reconstruction.png')}, metrics.md, metrics.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
