#!/usr/bin/env python3
"""Makes a VAE Lab job folder from a shell (headless training, no ComfyUI needed), then prints how to run it:

    python tools/make_job.py --name my_job --images ~/photos [--vae bundled | --vae sdxl_vae.safetensors]
        [--root vae_lab_jobs] [--recipe furception] [--steps 2000] [--batch-size 8] [--crop-size 256] ...

    python tools/run_job.py vae_lab_jobs/my_job                                           # one GPU (or the CPU)
    torchrun --standalone --nproc_per_node 4 tools/run_job.py vae_lab_jobs/my_job          # four GPUs, one machine

``--batch-size`` is the global batch (divided among the processes under torchrun). The folder is the same as Start
Finetune Job makes in ComfyUI (put it under ComfyUI's output/vae_lab_jobs to see it in the panel and load it with Load
Finetune Job). Any VAE file VAE Lab's loaders read works: SD/SDXL/SD3/FLUX kl-f8 (LDM or diffusers keys, checkpoints'
VAE part), TAESD-family files, Stable Cascade stage A; a decoder-only file needs ``--encoder`` (e.g. madebyollin's
taesd_encoder.pth beside taesd_decoder.pth).
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from training import data, finetune, jobs, recipes
from training.taesd import load_tiny_autoencoder
from training.vae_files import VaeFileError, join_files, open_vae_file

BUNDLED_TAEF2 = os.path.join(ROOT, "assets", "taef2")


def base_weights(vae: str, encoder: str | None) -> tuple[str, dict, str, float, float]:
    """(family, canonical tensors, description, latent scale, latent shift) of the base VAE."""
    if vae == "bundled":
        model = load_tiny_autoencoder(
            os.path.join(BUNDLED_TAEF2, "taef2_encoder.pth"), os.path.join(BUNDLED_TAEF2, "taef2_decoder.pth")
        )
        return "tiny", {k: v.clone() for k, v in model.state_dict().items()}, "the bundled TAEF2", 1.0, 0.0
    weights = open_vae_file(vae)
    if encoder:
        weights = join_files(weights, open_vae_file(encoder), os.path.basename(vae))
    if not weights.detected.has_encoder:
        raise VaeFileError(
            f"{vae} holds a decoder only: give its encoder with --encoder (a job encodes its crops with it)"
        )
    scale, shift = weights.detected.latent_scale, weights.detected.latent_shift
    return weights.family, dict(weights.tensors), weights.source, scale or 1.0, shift or 0.0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="job name: letters, digits, '_', '-', '.'")
    p.add_argument(
        "--images", default=os.path.join(ROOT, "assets", "images"), help="training image folder (default: bundled)"
    )
    p.add_argument("--vae", default="bundled", help="a VAE file, or 'bundled' (TAEF2)")
    p.add_argument("--encoder", default=None, help="the encoder file for a decoder-only --vae")
    p.add_argument("--root", default="vae_lab_jobs", help="folder that holds job folders (default ./vae_lab_jobs)")
    p.add_argument("--recipe", default=recipes.DEFAULT_RECIPE, choices=sorted(recipes.RECIPES))
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--checkpoint-interval", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=8, help="global batch (all processes together)")
    p.add_argument("--crop-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=0.0, help="0 = the recipe's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--held-out", type=float, default=0.2, help="share of images held out for metrics")
    p.add_argument("--threads", type=int, default=0, help="CPU threads per process (0 = torch's default)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    args = p.parse_args(argv)
    try:
        family, tensors, source, scale, shift = base_weights(args.vae, args.encoder)
        found = data.ImageFolder(os.path.expanduser(args.images), min_side=args.crop_size)
    except (VaeFileError, data.NoUsableImages, OSError) as exc:
        p.error(str(exc))
    train_idx, held_idx = data.split_or_all(len(found.paths), args.held_out, args.seed)
    config = finetune.FinetuneConfig(
        batch_size=args.batch_size,
        crop_size=args.crop_size,
        seed=args.seed,
        eval_every=args.checkpoint_interval,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    spec, note = jobs.new_spec(
        args.recipe,
        args.lr,
        config,
        args.steps,
        args.checkpoint_interval,
        [found.paths[i] for i in train_idx],
        [found.paths[i] for i in held_idx],
        family,
        scale,
        shift,
        args.threads,
    )
    os.makedirs(args.root, exist_ok=True)
    try:
        folder = jobs.create_job(args.root, args.name, tensors, spec)
    except jobs.JobError as exc:
        p.error(str(exc))
    print(
        f"made {folder}: {source} ({family}), {len(train_idx)} training / {len(held_idx)} held-out images"
        + (f" ({found.skipped.summary()})" if found.skipped.count else "")
        + f", {spec.recipe['name']}, {args.steps} steps"
    )
    if note:
        print("note:", note)
    script = os.path.join(ROOT, "tools", "run_job.py")
    print(f"run it:   python {script} {folder}")
    print(f"   or:    torchrun --standalone --nproc_per_node <GPUs> {script} {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
