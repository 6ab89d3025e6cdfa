#!/usr/bin/env python3
"""Efficacy: every recipe finetunes the bundled TAEF2 decoder for the same wall-clock budget, then the
base and finetuned (EMA) decoders are measured on held-out images never trained on. One table.

    .venv/bin/python bench/efficacy.py [--minutes 10] [--recipes furception-nolpips,ft-mse] [--set lr=1e-5]
    .venv/bin/python bench/efficacy.py --train-dir MY_IMAGES --held-out-dir OTHER_IMAGES --per-image  # yours

The held-out images are from other domains than the training photos (by default: train on the bundled
photographs, hold out the telescope, microscope and retina images). Evaluation view: Lanczos short side
256, centre 256x256 crop. The target for the default recipe (no LPIPS weights): held-out PSNR +1.0 dB or
more, Oklab ΔE -10 % or more, detail ratio within 0.95-1.05, in 10 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch

from training import data, finetune, metrics, perceptual, recipes, taesd
from training.run import TrainingRun

HELD_OUT = ["hubble_deep_field.jpg", "ihc.png", "retina.jpg"]


def parse_value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def images_of(args) -> tuple[list, list, list[str]]:
    """(training images, held-out images, held-out names): two folders of the user's, or the bundled set split."""
    if args.train_dir or args.held_out_dir:
        if not (args.train_dir and args.held_out_dir):
            raise SystemExit("--train-dir and --held-out-dir go together: one folder to train on, one never trained on")
        train = data.ImageFolder(args.train_dir, min_side=args.crop)
        held = data.ImageFolder(args.held_out_dir)
        for folder in (train, held):
            if folder.skipped.count:
                print(f"{folder.folder}: {folder.skipped.summary()}", flush=True)
        return (
            [train.image(i) for i in range(len(train))],
            [held.image(i) for i in range(len(held))],
            [os.path.basename(p) for p in held.paths],
        )
    images_dir = os.path.join(ROOT, "assets", "images")
    held_names = args.held_out.split(",")
    train_names = [n for n in sorted(os.listdir(images_dir)) if not n.endswith(".md") and n not in held_names]
    return (
        [data.load_image01(os.path.join(images_dir, n)) for n in train_names],
        [data.load_image01(os.path.join(images_dir, n)) for n in held_names],
        held_names,
    )


def run(recipe_name: str, minutes: float, args, overrides: dict, images: tuple) -> dict:
    train, held, held_names = images
    weights = os.path.join(ROOT, "assets", "taef2")
    model = taesd.load_tiny_autoencoder(
        os.path.join(weights, "taef2_encoder.pth"), os.path.join(weights, "taef2_decoder.pth")
    )
    model.eval()
    lpips = perceptual.lpips_if_available(recipes.RECIPES[recipe_name].lpips_net)
    recipe, note = recipes.resolve_recipe(recipe_name, lpips is not None)
    recipe = recipes.recipe_with(recipe, **overrides)
    config = finetune.FinetuneConfig(
        batch_size=args.batch,
        crop_size=args.crop,
        seed=args.seed,
        crops_per_image=args.crops_per_image,
        eval_every=args.eval_every or 0,
    )
    with TrainingRun(
        model,
        recipe,
        config,
        train,
        model.encode,
        held_out_images=held,
        held_out_names=held_names,
        held_out_size=256,
        lpips=lpips,
    ) as training:
        run_, held_out = training.trainer, training.held_out
        base_images = per_image(run_, use_ema=False) if args.per_image else None

        def verbose(last):
            if args.verbose and last["step"] % 20 == 0:
                print(
                    f"  {recipe.name} step {last['step']} loss {last['loss']:.4f} "
                    + " ".join(
                        f"{k} {v:.4g}"
                        for k, v in last.items()
                        if k in ("pixel", "detail", "gan", "gan_weight", "critic")
                    ),
                    flush=True,
                )

        outcome = training.run(steps=args.steps or None, seconds=None if args.steps else minutes * 60, on_step=verbose)
        elapsed = outcome.seconds
    if args.verbose:
        for e in run_.evaluations:
            print(f"  eval step {e['step']}: PSNR {e['psnr']:.2f} ΔE {e['delta_e']:.4f} detail {e['detail_ratio']:.3f}")
    if args.per_image:
        tuned_images = per_image(run_, use_ema=True)
        print(
            f"\n{recipe.name}, {run_.step} steps, per held-out image:\n"
            "| image | PSNR base → tuned (Δ) | Oklab ΔE base → tuned (Δ %) | detail ratio base → tuned |\n"
            "|---|---|---|---|"
        )
        for i, name in enumerate(held_out.names):
            b, t = ({k: float(v[i]) for k, v in m.items()} for m in (base_images, tuned_images))
            print(
                f"| {name} | {b['psnr']:.2f} → {t['psnr']:.2f} ({t['psnr'] - b['psnr']:+.2f} dB) | "
                f"{b['delta_e']:.4f} → {t['delta_e']:.4f} ({(t['delta_e'] / b['delta_e'] - 1) * 100:+.1f} %) | "
                f"{b['detail_ratio']:.3f} → {t['detail_ratio']:.3f} |",
                flush=True,
            )
    return {
        "recipe": recipe.name,
        "note": note,
        "steps": run_.step,
        "seconds": elapsed,
        "base": run_.base_evaluation,
        "tuned": run_.evaluations[-1],
    }


def per_image(run_: finetune.DecoderFinetune, use_ema: bool) -> dict:
    """Held-out metrics per image (PSNR, Oklab ΔE, detail ratio...) of the current or EMA decoder."""
    out = run_.decode_with(run_.held_out.latents, use_ema)
    return metrics.reconstruction_metrics(out, run_.held_out.images01)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--recipes", default=",".join(recipes.RECIPES))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--crops-per-image",
        type=int,
        default=finetune.FinetuneConfig.crops_per_image,
        help="size of the fixed crop pool per training image",
    )
    parser.add_argument("--steps", type=int, default=0, help="stop after this many steps instead of --minutes")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], help="override a recipe field, e.g. --set lr=1e-5")
    parser.add_argument(
        "--held-out",
        default=",".join(HELD_OUT),
        help="bundled images held out (comma-separated); the others are trained on",
    )
    parser.add_argument("--train-dir", help="train on the images in this folder instead of the bundled ones ...")
    parser.add_argument("--held-out-dir", help="... and evaluate on the images in this one (never trained on)")
    parser.add_argument("--per-image", action="store_true", help="also print base vs finetuned for each held-out image")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument(
        "--eval-every", type=int, default=0, help="held-out evaluation every N steps (printed with --verbose)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    overrides = {k: parse_value(v) for k, v in (item.split("=", 1) for item in args.set)}
    images = images_of(args)
    rows = []
    for name in args.recipes.split(","):
        resolved = recipes.RECIPES.get(name)
        lpips_found = resolved is not None and perceptual.find_backbone_file(resolved.lpips_net) is not None
        fallback = recipes.FALLBACK_RECIPE if name == "furception" and not lpips_found else None
        if fallback and fallback in args.recipes.split(","):
            rows.append({"recipe": name, "error": f"no LPIPS weights: runs as {fallback} (its row)"})
            continue
        try:
            rows.append(run(name, args.minutes, args, overrides, images))
        except ValueError as exc:  # e.g. an LPIPS recipe without LPIPS weights
            rows.append({"recipe": name, "error": str(exc)})
        print(f"done {name}", flush=True)
    budget = f"{args.steps} steps" if args.steps else f"{args.minutes:g} min"
    print(
        f"\nTAEF2 decoder, {budget} per recipe, batch {args.batch} at {args.crop}², {args.threads} threads; "
        f"held out: {args.held_out_dir or args.held_out} (Lanczos 256 short side, centre 256²)"
    )
    if overrides:
        print("overrides: " + ", ".join(f"{k}={v}" for k, v in overrides.items()))
    print(
        "| recipe | steps | PSNR base → tuned (Δ) | Oklab ΔE base → tuned (Δ %) | detail ratio base → tuned | "
        "SSIM base → tuned |"
    )
    print("|---|---|---|---|---|---|")
    for row in rows:
        if "error" in row:
            print(f"| {row['recipe']} | — | {row['error']} | | | |")
            continue
        b, t = row["base"], row["tuned"]
        print(
            f"| {row['recipe']} | {row['steps']} | "
            f"{b['psnr']:.2f} → {t['psnr']:.2f} ({t['psnr'] - b['psnr']:+.2f} dB) | "
            f"{b['delta_e']:.4f} → {t['delta_e']:.4f} ({(t['delta_e'] / b['delta_e'] - 1) * 100:+.1f} %) | "
            f"{b['detail_ratio']:.3f} → {t['detail_ratio']:.3f} | {b['ssim']:.4f} → {t['ssim']:.4f} |"
        )
        if row["note"]:
            print(f"|  | | {row['note']} | | | |")


if __name__ == "__main__":
    main()
