#!/usr/bin/env python3
"""VAE Lab standalone demo: finetune the real TAEF2 decoder on a folder of images and measure it.

    tools/demo.sh [--images DIR] [--minutes 4] [--out DIR] [--recipe furception] [--size 256]

The images are split into training and held-out images (never trained on). TAEF2 (bundled, MIT) is
finetuned decoder-only for --minutes on CUDA when present, else the CPU, with the recipe's EMA weights
kept; the furception recipe falls back to furception-nolpips (and says so) when no LPIPS weights are found.
Then, on the held-out images (Lanczos short side --size, centre square), base vs finetuned:
  <out>/comparison.png       rows = held-out images; original | base | finetuned | ΔE base | ΔE finetuned
  <out>/metrics.md           mean ± std table (PSNR, SSIM, Oklab ΔE, detail ratio, LPIPS when available)
  <out>/metrics.json         the per-image numbers and the run's settings
  <out>/taef2_decoder.pth    the finetuned decoder in madebyollin's key layout: madebyollin's taesd.py loads
                             it strictly (TAESD(decoder_path=...)); copy it with taef2_encoder.pth to
                             ComfyUI/models/vae_approx as <name>_decoder.pth for Load Tiny Autoencoder
No ComfyUI needed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch

from training import data, finetune, metrics, perceptual, recipes, report, visualize
from training.files import atomic_write
from training.run import TrainingRun
from training.taesd import load_tiny_autoencoder

HEATMAP_MAX = 0.1


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--images",
        default=os.path.join(ROOT, "assets", "images"),
        help="folder of images (default: the bundled photos)",
    )
    p.add_argument("--minutes", type=float, default=4.0, help="training time budget in minutes (default 4)")
    p.add_argument(
        "--steps", type=int, default=0, help="stop after this many steps even within the time budget (0: no limit)"
    )
    p.add_argument(
        "--out", default=os.path.join(ROOT, "out", "demo"), help="where to write results (default: out/demo)"
    )
    p.add_argument("--recipe", default=recipes.DEFAULT_RECIPE, choices=sorted(recipes.RECIPES))
    p.add_argument(
        "--size", type=int, default=256, help="evaluation crop size in pixels, a multiple of 8 (default 256)"
    )
    p.add_argument("--crop", type=int, default=128, help="training crop size (default 128)")
    p.add_argument("--batch", type=int, default=8, help="training batch size (default 8)")
    p.add_argument("--held-out", type=float, default=0.25, help="share of the images held out (default 0.25)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--taef2",
        default=os.path.join(ROOT, "assets", "taef2"),
        help="folder with taef2_encoder.pth / taef2_decoder.pth",
    )
    p.add_argument("--lpips-dir", default=None, help="extra folder to look in for LPIPS backbone weights")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.size % 8 or args.crop % 8:
        sys.exit(
            f"--size and --crop must be multiples of 8 (TAEF2 works on 8x8 pixel cells), got {args.size}, {args.crop}"
        )
    if args.lpips_dir:
        perceptual.SEARCH_DIRS.append(args.lpips_dir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    os.makedirs(args.out, exist_ok=True)

    try:
        folder = data.ImageFolder(args.images, min_side=max(args.crop, 64))
    except (data.NoUsableImages, NotADirectoryError) as exc:
        sys.exit(f"--images: {exc}")
    if folder.skipped.count:
        print(f"note: {folder.skipped.summary()}")
    train_idx, held_idx = data.split_held_out(len(folder), args.held_out, args.seed)
    if not held_idx:
        sys.exit("--images: at least two usable images are needed (one to train on, one held out to measure)")
    names = [os.path.relpath(p, args.images) for p in folder.paths]
    held_names = [names[i] for i in held_idx]

    model = load_tiny_autoencoder(
        os.path.join(args.taef2, "taef2_encoder.pth"), os.path.join(args.taef2, "taef2_decoder.pth")
    )
    model = model.to(device).eval()
    lpips = {net: perceptual.lpips_if_available(net) for net in ("alex", "vgg")}
    recipe, note = recipes.resolve_recipe(args.recipe, lpips[recipes.RECIPES[args.recipe].lpips_net] is not None)
    if note:
        print("note: " + note)
    config = finetune.FinetuneConfig(batch_size=args.batch, crop_size=args.crop, seed=args.seed)
    train = [folder.image(i) for i in train_idx]
    held = [folder.image(i) for i in held_idx]
    with TrainingRun(
        model,
        recipe,
        config,
        train,
        model.encode,
        held_out_images=held,
        held_out_names=held_names,
        held_out_size=args.size,
        lpips=lpips[recipe.lpips_net].to(device) if recipe.uses_lpips else None,
        device=device,
    ) as training:
        run, held_out = training.trainer, training.held_out
        base_out = run.decode_with(held_out.latents, use_ema=False)

        def progress(logs):
            if logs["step"] % 25 == 0:
                print(
                    f"step {logs['step']}  loss {logs['loss']:.4f}  ({time.perf_counter() - start:.0f} s)", flush=True
                )

        start = time.perf_counter()
        outcome = training.run(steps=args.steps or None, seconds=args.minutes * 60, on_step=progress)
        seconds = outcome.seconds
        tuned_out = run.decode_with(held_out.latents, use_ema=True)
        tuned = run.decoder_tensors(use_ema=True)

    available = {n: m for n, m in lpips.items() if m is not None}
    rows = {
        "TAEF2 (base)": metrics.reconstruction_metrics(base_out, held_out.images01, available),
        f"TAEF2 finetuned ({recipe.name}, {run.step} steps)": metrics.reconstruction_metrics(
            tuned_out, held_out.images01, available
        ),
    }
    missing = {f"lpips_{n}": "unavailable (no weights)" for n, m in lpips.items() if m is None}

    heat_base = visualize.heatmap(metrics.delta_e_map(base_out, held_out.images01), HEATMAP_MAX)
    heat_tuned = visualize.heatmap(metrics.delta_e_map(tuned_out, held_out.images01), HEATMAP_MAX)
    header = [
        visualize.label(torch.zeros(3, 0, args.size), t)
        for t in ("original (held out)", "TAEF2", "finetuned", f"ΔE TAEF2 (yellow {HEATMAP_MAX}+)", "ΔE finetuned")
    ]
    picture = visualize.grid(
        [header]
        + [
            [held_out.images01[i], base_out[i], tuned_out[i], heat_base[i], heat_tuned[i]]
            for i in range(len(held_names))
        ]
    )
    visualize.save_png(picture, os.path.join(args.out, "comparison.png"))

    decoder_file = os.path.join(args.out, "taef2_decoder.pth")
    decoder = {k[len("decoder.") :]: v for k, v in tuned.items()}
    atomic_write(decoder_file, lambda temporary: torch.save(decoder, temporary))
    shutil.copy(os.path.join(args.taef2, "taef2_encoder.pth"), os.path.join(args.out, "taef2_encoder.pth"))

    table = report.markdown_table(rows, missing)
    settings = {
        "recipe": recipe.as_dict(),
        "fallback_note": note,
        "steps": run.step,
        "seconds": seconds,
        "device": str(device),
        "batch": args.batch,
        "crop": args.crop,
        "seed": args.seed,
        "train_images": [names[i] for i in train_idx],
        "held_out_images": held_names,
        "skipped": folder.skipped.by_reason,
    }
    with open(os.path.join(args.out, "metrics.md"), "w") as f:
        f.write(
            f"# TAEF2 finetuned on {len(train_idx)} images, measured on {len(held_names)} held-out images "
            f"({args.size}² centre crops)\n\n{table}\n"
        )
        if note:
            f.write(f"\n{note}\n")
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(
            {
                "settings": settings,
                "held_out_images": held_names,
                "per_image": {
                    row: {k: [float(x) for x in v] for k, v in values.items()} for row, values in rows.items()
                },
                "summary": {row: report.summarize(values) for row, values in rows.items()},
                "unavailable": sorted(missing),
            },
            f,
            indent=2,
        )

    print(f"{recipe.name} on {device}: {run.step} steps in {seconds:.0f} s; held out: {', '.join(held_names)}")
    print(table)
    print(f"wrote {os.path.join(args.out, 'comparison.png')}, metrics.md, metrics.json, taef2_decoder.pth")
    return 0


if __name__ == "__main__":
    sys.exit(main())
