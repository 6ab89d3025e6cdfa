#!/usr/bin/env python3
"""Training throughput and peak memory: VAE Lab's trainer vs a naive loop, same model, same loss code, same
thread count, same device, in one run (each variant in its own subprocess so peak memory is its own).

    .venv/bin/python bench/train_step.py [--family taef2|kl] [--batch 8] [--crop 128] [--steps 6] [--checkpointing]

naive: fp32, the encoder runs every step on freshly cut crops, no latent cache, no checkpointing, no
channels_last, the critic and its gradient penalty as in the recipe.
ours: DecoderFinetune.train_step: cached latents (the pool is filled before timing), bf16 autocast +
channels_last on CUDA, optional gradient checkpointing.
Both run the full furception-nolpips recipe with the critic on from step 0 (gan_start 0). LPIPS is left out
(furception-nolpips): with LPIPS both loops pay the same LPIPS cost. kl = a full-size SD kl-f8 with random
weights (the cost is the architecture's, not the weights').
Peak memory: torch.cuda.max_memory_allocated on CUDA, the process's peak RSS on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def build(family: str):
    import torch

    from training import klf8, taesd

    if family == "taef2":
        weights = os.path.join(ROOT, "assets", "taef2")
        return taesd.load_tiny_autoencoder(
            os.path.join(weights, "taef2_encoder.pth"), os.path.join(weights, "taef2_decoder.pth")
        )
    torch.manual_seed(0)
    return klf8.KlAutoencoder(klf8.KlConfig())


def images():
    from training import data

    folder = os.path.join(ROOT, "assets", "images")
    return [data.load_image01(os.path.join(folder, n)) for n in sorted(os.listdir(folder)) if not n.endswith(".md")]


def variant(args) -> dict:
    import numpy as np
    import torch

    from training import data, decoders, finetune, gan, losses, metrics, recipes
    from training.latent_cache import LatentCache

    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    model = build(args.family).to(device).eval()
    recipe = recipes.recipe_with(recipes.RECIPES["furception-nolpips"], gan_start=0, critic_warmup_steps=0)
    pictures = images()

    def encode(x):
        return model.encode(x.to(device))

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    if args.variant == "ours":
        config = finetune.FinetuneConfig(
            batch_size=args.batch,
            crop_size=args.crop,
            crops_per_image=max(2, args.batch),
            gradient_checkpointing=args.checkpointing,
        )
        cache = LatentCache(pictures, args.crop, config.crops_per_image, 0, encode)
        run = finetune.DecoderFinetune(
            model, recipe, config, cache, None, device=device
        )  # fills the pool (reference pass)
        run.train_step()  # warm-up
        sync()
        start = time.perf_counter()
        for _ in range(args.steps):
            run.train_step()
        sync()
        seconds = time.perf_counter() - start
        cache.close()
    else:
        params = decoders.decoder_parameters(model)
        for p in params.values():
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW(params.values(), lr=recipe.lr, betas=(recipe.beta1, recipe.beta2))
        critic = gan.PatchDiscriminator(norm=recipe.disc_norm).to(device)
        critic_optimizer = torch.optim.AdamW(critic.parameters(), lr=recipe.disc_lr, betas=(0.5, 0.9))
        last = decoders.last_decoder_layer(model)

        def step(i):
            rng = np.random.default_rng([0, i])
            targets = data.to_tensor(
                [
                    data.random_crop(pictures[int(rng.integers(len(pictures)))], args.crop, rng)
                    for _ in range(args.batch)
                ]
            ).to(device)
            with torch.no_grad():
                latents = model.encode(targets)
            out01 = model.decode(latents).clamp(0, 1)
            rec = losses.pixel_loss(out01, targets, recipe, i)
            rec = rec + recipe.detail_weight * losses.detail_loss(out01, metrics.high_frequency_energy(targets))
            critic.requires_grad_(False)
            g_loss = gan.generator_loss(critic(losses.quantize_straight_through(out01)), recipe.disc_loss)
            loss = rec + gan.adaptive_gan_weight(rec, g_loss, last, recipe.gan_weight) * g_loss
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params.values(), recipe.grad_clip)
            optimizer.step()
            critic.requires_grad_(True)
            fake = (out01.detach() * 255).round() / 255
            d_loss = gan.wasserstein_discriminator_loss(critic(targets), critic(fake)) + gan.gradient_penalty(
                critic, targets, fake, recipe.gp_weight
            )
            critic_optimizer.zero_grad()
            d_loss.backward()
            critic_optimizer.step()

        step(0)
        sync()
        start = time.perf_counter()
        for i in range(1, args.steps + 1):
            step(i)
        sync()
        seconds = time.perf_counter() - start
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB on Linux
    return {"images_per_s": args.steps * args.batch / seconds, "peak_gib": peak, "device": str(device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=["taef2", "kl"], default="taef2")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--cpu", action="store_true", help="force the CPU even when CUDA is there")
    parser.add_argument("--variant", choices=["ours", "naive"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print("RESULT " + json.dumps(variant(args)))
        return
    results = {}
    for name in ("naive", "ours"):
        command = [sys.executable, __file__, "--variant", name] + sys.argv[1:]
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        results[name] = json.loads(next(line for line in output.splitlines() if line.startswith("RESULT "))[7:])
    device = results["ours"]["device"]
    print(
        f"{args.family} decoder training, batch {args.batch} at {args.crop}², {args.steps} timed steps, "
        f"{args.threads} threads, device {device}, furception-nolpips with the critic on"
        f"{', checkpointing' if args.checkpointing else ''}"
    )
    print("| loop | images/s | peak memory |")
    print("|---|---|---|")
    for name, label in (
        ("naive", "naive (fp32, encoder every step)"),
        ("ours", "VAE Lab (cached latents" + (", bf16, channels_last" if "cuda" in device else "") + ")"),
    ):
        r = results[name]
        print(f"| {label} | {r['images_per_s']:.2f} | {r['peak_gib']:.2f} GiB |")
    print(
        f"| ratio | {results['ours']['images_per_s'] / results['naive']['images_per_s']:.2f}× | "
        f"{results['ours']['peak_gib'] / results['naive']['peak_gib']:.2f}× |"
    )


if __name__ == "__main__":
    main()
