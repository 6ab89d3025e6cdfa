#!/usr/bin/env python3
"""Metrics throughput: VAE Lab's batched torch metrics vs a naive per-image loop over the reference
implementations (scikit-image PSNR/SSIM, colour-science Oklab ΔE, numpy detail ratio), same machine,
same run, same images. Prints one table (plus a GPU row when CUDA is present).

    .venv/bin/python bench/metrics.py [--images 16] [--size 256] [--threads 2]
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np
import torch

from training import data, metrics


def naive_loop(outputs: np.ndarray, references: np.ndarray) -> None:
    import colour
    from scipy.ndimage import convolve1d
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    k = np.array([1, 4, 6, 4, 1]) / 16

    def blur(x):
        return convolve1d(convolve1d(x, k, axis=0, mode="mirror"), k, axis=1, mode="mirror")

    for y, x in zip(outputs, references):
        y = np.clip(y, 0, 1)
        peak_signal_noise_ratio(x, y, data_range=1.0)
        structural_similarity(
            y, x, data_range=1.0, channel_axis=-1, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
        )
        np.sqrt(((colour.convert(y, "sRGB", "Oklab") - colour.convert(x, "sRGB", "Oklab")) ** 2).sum(-1)).mean()
        ((y - blur(y)) ** 2).mean() / ((x - blur(x)) ** 2).mean()


def ours(outputs: torch.Tensor, references: torch.Tensor) -> None:
    metrics.reconstruction_metrics(outputs, references)


def timed(fn, *args, repeats=3):
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - start)
    return best


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    paths = sorted(glob.glob(os.path.join(ROOT, "assets", "images", "*.*")))
    paths = [p for p in paths if not p.endswith(".md")]
    refs = [data.center_crop(data.load_image01(paths[i % len(paths)]), args.size) for i in range(args.images)]
    rng = np.random.default_rng(0)
    outs = [np.clip(r + rng.normal(0, 0.02, r.shape).astype(np.float32), -0.05, 1.05) for r in refs]
    t_naive = timed(naive_loop, np.stack(outs).astype(np.float64), np.stack(refs).astype(np.float64))
    t_ours = timed(ours, data.to_tensor(outs), data.to_tensor(refs))
    n = args.images
    rows = []
    if torch.cuda.is_available():
        o, r = data.to_tensor(outs).cuda(), data.to_tensor(refs).cuda()

        def on_gpu():
            ours(o, r)
            torch.cuda.synchronize()

        t_gpu = timed(on_gpu)
        rows.append(
            f"| VAE Lab batched torch, {torch.cuda.get_device_name()} | {t_gpu:.3f} | {1000 * t_gpu / n:.1f} | "
            f"{t_naive / t_gpu:.2f}× |"
        )
    print(f"metrics (PSNR, SSIM, Oklab ΔE, detail ratio), {n} images at {args.size}², {args.threads} threads, CPU")
    print("| implementation | total s | ms / image | speed-up |")
    print("|---|---|---|---|")
    print(f"| naive loop (scikit-image, colour-science, scipy) | {t_naive:.3f} | {1000 * t_naive / n:.1f} | 1.00× |")
    print(f"| VAE Lab batched torch, CPU | {t_ours:.3f} | {1000 * t_ours / n:.1f} | {t_naive / t_ours:.2f}× |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
