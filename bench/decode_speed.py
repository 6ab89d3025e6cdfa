#!/usr/bin/env python3
"""Decode speed: a VAE from VAE Lab's loaders vs core VAELoader's VAE of the same weights, both through
core VAEDecode, same process, interleaved runs, median time. Needs a ComfyUI checkout; run it with
ComfyUI's Python:

    $COMFYUI_DIR/venv/bin/python bench/decode_speed.py --comfyui $COMFYUI_DIR [--latent 32] [--repeats 5]

Weights are random in the real layouts (a full-size SD/SDXL kl-f8, a TAESD pair) plus the bundled TAEF2.
TAEF2 has no core reference (core cannot build it); its row compares against core's TAESD module on
TAEF2's weights without the mid-block GroupNorm branch: the same network minus that branch.
"""

from __future__ import annotations

import argparse
import importlib.util
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
    parser.add_argument("--latent", type=int, default=32, help="latent side (pixels = 8x); default 32 -> 256 px")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cpu", action="store_true", help="force the CPU even when CUDA is there")
    args = parser.parse_args()
    if not args.comfyui:
        parser.error("--comfyui (or $COMFYUI_DIR) must name a ComfyUI checkout")
    sys.path.insert(0, args.comfyui)
    import torch
    from comfy.cli_args import args as comfy_args

    comfy_args.cpu = args.cpu or not torch.cuda.is_available()
    import utils.extra_config  # noqa: F401  (before nodes)
    from safetensors.torch import save_file

    import nodes

    spec = importlib.util.spec_from_file_location(
        "vae_lab", os.path.join(PACK, "__init__.py"), submodule_search_locations=[PACK]
    )
    sys.modules["vae_lab"] = module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from vae_lab.nodes.load_tiny_autoencoder import LoadTinyAutoencoder
    from vae_lab.nodes.load_vae_decoder import LoadVAEDecoder
    from vae_lab.training import key_maps, taesd

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from random_vaes import write_random_vaes

    scratch = write_random_vaes()
    taef2 = taesd.load_tiny_autoencoder(
        os.path.join(PACK, "assets", "taef2", "taef2_encoder.pth"),
        os.path.join(PACK, "assets", "taef2", "taef2_decoder.pth"),
    ).state_dict()
    without_branch = {k: v for k, v in taef2.items() if ".pool." not in k}
    save_file(
        key_maps.comfy_from_tiny(without_branch, 1.0, 0.0),
        os.path.join(scratch, "vae", "taef2_without_branch.safetensors"),
    )

    loader = nodes.VAELoader()
    cases = [
        (
            "SD/SDXL kl-f8 (83.7 M)",
            4,
            lambda: LoadVAEDecoder.execute(
                vae_name="kl4.safetensors", encoder="from this file", base_file="(none)"
            ).result[0],
            lambda: loader.load_vae("kl4.safetensors")[0],
        ),
        (
            "TAESD pair",
            4,
            lambda: LoadTinyAutoencoder.execute(name="taesd", latent_space="auto", encoder="from this file").result[0],
            lambda: loader.load_vae("taesd")[0],
        ),
        (
            "TAEF2 (core: without mid-block GN)",
            32,
            lambda: LoadTinyAutoencoder.execute(
                name="taef2 (bundled)", latent_space="auto", encoder="from this file"
            ).result[0],
            lambda: loader.load_vae("taef2_without_branch.safetensors")[0],
        ),
    ]
    decode = nodes.VAEDecode()
    rows = []
    with torch.inference_mode():
        for name, channels, ours_fn, core_fn in cases:
            ours, core = ours_fn(), core_fn()
            latents = {"samples": torch.randn(1, channels, args.latent, args.latent)}
            times = {"ours": [], "core": []}
            for vae in (ours, core):  # warm-up: first load, allocator
                decode.decode(vae, latents)
            for _ in range(args.repeats):
                for label, vae in (("ours", ours), ("core", core)):
                    start = time.perf_counter()
                    decode.decode(vae, latents)
                    if torch.cuda.is_available() and not comfy_args.cpu:
                        torch.cuda.synchronize()
                    times[label].append(time.perf_counter() - start)
            ours_t, core_t = statistics.median(times["ours"]), statistics.median(times["core"])
            rows.append((name, ours_t, core_t, ours_t / core_t - 1))
    device = "cuda" if torch.cuda.is_available() and not comfy_args.cpu else "cpu"
    print(
        f"VAEDecode of a {args.latent}x{args.latent} latent ({8 * args.latent} px), median of {args.repeats}, "
        f"device {device}"
    )
    print(f"| {'weights':36} | {'VAE Lab loader':>14} | {'core VAELoader':>14} | {'difference':>10} |")
    print(f"|{'-' * 38}|{'-' * 16}|{'-' * 16}|{'-' * 12}|")
    for name, ours_t, core_t, diff in rows:
        print(f"| {name:36} | {ours_t * 1000:11.1f} ms | {core_t * 1000:11.1f} ms | {diff:+9.1%} |")


if __name__ == "__main__":
    main()
