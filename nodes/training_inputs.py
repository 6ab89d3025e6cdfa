"""The training inputs Decoder Finetune Steps and Start Finetune Job share, each defined once (name, default, range,
tooltip). Each node lists them in its own order: saved workflows map widget values by position."""

from __future__ import annotations

from comfy_api.latest import io

from ..training import recipes

TrainingState = io.Custom("VAE_LAB_TRAINING_STATE")
BUNDLED = "bundled"


def images() -> io.Image.Input:
    return io.Image.Input(
        "images",
        optional=True,
        tooltip="Training images as an IMAGE batch (e.g. from Load Image), instead of a folder (clear "
        "folder then). A job copies them into its folder as PNGs.",
    )


def folder(default: str) -> io.String.Input:
    return io.String.Input(
        "folder",
        default=default,
        tooltip="A folder of images (png/jpg/webp/...; subfolders too; unreadable files are skipped "
        "and counted). 'bundled' = VAE Lab's sample photos. Used when images is not connected.",
    )


def recipe() -> io.Combo.Input:
    return io.Combo.Input(
        "recipe",
        options=list(recipes.RECIPES),
        default=recipes.DEFAULT_RECIPE,
        tooltip="furception: Oklab + LPIPS-VGG + PatchGAN + EMA (falls back to furception-nolpips, and "
        "says so, when the LPIPS weights are missing; that one keeps sharpness with a fine-band "
        "blur inside the pixel loss instead). ft-mse / ft-ema: Stability's recipes (need LPIPS "
        "weights). See the help page.",
    )


def batch_size() -> io.Int.Input:
    return io.Int.Input("batch_size", default=4, min=1, max=256, tooltip="Crops per step.")


def crop_size() -> io.Int.Input:
    return io.Int.Input(
        "crop_size",
        default=256,
        min=64,
        max=1024,
        step=64,
        tooltip="Training crop side in pixels (a multiple of 64). Images smaller than this are skipped.",
    )


def learning_rate() -> io.Float.Input:
    return io.Float.Input(
        "learning_rate",
        default=0.0,
        min=0.0,
        max=0.01,
        step=1e-6,
        round=1e-8,
        tooltip="0 = the recipe's learning rate (3e-5). Warm-up over the recipe's first steps.",
    )


def seed() -> io.Int.Input:
    return io.Int.Input(
        "seed",
        default=0,
        min=0,
        max=2**31 - 1,
        control_after_generate=True,
        tooltip="Fixes crops, held-out split and critic init: same seed + same data = same weights.",
    )


def held_out_fraction() -> io.Float.Input:
    return io.Float.Input(
        "held_out_fraction",
        default=0.2,
        min=0.0,
        max=0.9,
        step=0.05,
        tooltip="Share of the images never trained on, used for before/after numbers (with 2+ images "
        "at least one is held out; 0 = train on all).",
    )


def gradient_checkpointing(optional: bool) -> io.Boolean.Input:
    return io.Boolean.Input(
        "gradient_checkpointing",
        default=False,
        optional=optional,
        tooltip="Recompute activations per decoder block in the backward pass: much less memory, "
        "~30 % slower (what an out-of-memory message suggests).",
    )


def training_state(tooltip: str) -> io.Custom:
    return TrainingState.Input("training_state", optional=True, tooltip=tooltip)
