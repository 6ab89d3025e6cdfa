from __future__ import annotations

import logging
import os

from comfy_api.latest import io

from ..training import data, finetune, perceptual, recipes, visualize
from ..training.run import TrainingRun
from . import training_inputs as inputs
from .common import CATEGORY, summary_ui
from .host import comfy_from_images01, images_from_comfy_batch, training_device
from .host_vae import host_encoder, trainable_decoder, vae_with_decoder
from .training_inputs import BUNDLED, TrainingState

PACK_IMAGES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "images")
WEIGHTS = ["ema", "raw"]


def image_source(images, folder: str, min_side: int, node: str):
    """The training images a node was given: (arrays, None) from an IMAGE batch or (None, ImageFolder) from a folder
    ('bundled' = the pack's photos), with the refusals both finetune nodes share."""
    if images is not None and folder.strip():
        raise ValueError(f"{node}: both images and folder are set; clear folder or disconnect images")
    if images is not None:
        arrays = images_from_comfy_batch(images, "images")
        small = [a for a in arrays if min(a.shape[:2]) < min_side]
        if small:
            raise ValueError(
                f"{node}: the images are {small[0].shape[1]}x{small[0].shape[0]}, smaller than "
                f"crop_size {min_side}; lower crop_size or use larger images"
            )
        return arrays, None
    if not folder.strip():
        raise ValueError(f"{node}: connect images or name a folder (or 'bundled' for VAE Lab's sample photos)")
    path = PACK_IMAGES if folder.strip() == BUNDLED else os.path.expanduser(folder.strip())
    if not os.path.isdir(path):
        raise ValueError(f"{node}: folder {folder!r} does not exist or is not a folder")
    return None, data.ImageFolder(path, min_side=min_side)


def training_images(images, folder: str, seed: int, held_out_fraction: float, min_side: int):
    """(train arrays, held-out arrays, held-out names, what was read) from an IMAGE batch or a folder."""
    arrays, found = image_source(images, folder, min_side, "Decoder Finetune Steps")
    if found is None:
        names = [f"image {i}" for i in range(len(arrays))]
        source = f"{len(arrays)} image(s) from the IMAGE input"
    else:
        arrays = [found.image(i) for i in range(len(found))]
        names = [os.path.relpath(p, found.folder) for p in found.paths]
        source = f"{len(arrays)} image(s) from {found.folder}" + (
            f"; {found.skipped.summary()}" if found.skipped.count else ""
        )
    train, held = data.split_or_all(len(arrays), held_out_fraction, seed)
    return [arrays[i] for i in train], [arrays[i] for i in held], [names[i] for i in held], source


def _preview(run: finetune.DecoderFinetune, sample) -> tuple:
    """Progress-bar preview: target | before | now, on one held-out (or training) crop."""
    target, latents, before = sample
    now = run.decode_with(latents, use_ema=False)[0]
    picture = visualize.grid(
        [
            [
                visualize.label(target, "target"),
                visualize.label(before, "before"),
                visualize.label(now, f"step {run.step}"),
            ]
        ]
    )
    from PIL import Image

    array = (picture.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    return ("JPEG", Image.fromarray(array), 768)


def loss_curve(run: finetune.DecoderFinetune):
    history = [h for h in run.history if not h.get("skipped")]
    series = {"loss": [(h["step"], h["loss"]) for h in history], "pixel": [(h["step"], h["pixel"]) for h in history]}
    if run.evaluations and run.base_evaluation:
        series["held-out PSNR"] = [(0, run.base_evaluation["psnr"])] + [(e["step"], e["psnr"]) for e in run.evaluations]
    return visualize.line_plot(series, title=f"{run.recipe.name}: {run.step} steps, {run.images_seen} images seen")


def summary_text(run: finetune.DecoderFinetune, note: str | None, source: str, weights: str) -> tuple[str, dict]:
    family = {"kl": "kl-f8", "tiny": "TAESD-family", "stage_a": "Stable Cascade stage A"}.get(run.family, run.family)
    lines = [
        (
            f"{run.recipe.name} on a {family} decoder: step {run.step} ({run.images_seen} crops seen), "
            f"output {weights} weights"
        )
    ]
    if note:
        lines.append("NOTE: " + note)
    held = len(run.held_out.names) if run.held_out is not None else 0
    lines.append(f"{source}: {held} held out" if held else source)
    lines += ["NOTE: " + n for n in run.notes]
    if run.skipped_steps:
        lines.append(f"{run.skipped_steps} step(s) skipped for non-finite losses (nothing non-finite was applied)")
    values = {
        "step": run.step,
        "images_seen": run.images_seen,
        "recipe": run.recipe.name,
        "fallback_note": note,
        "skipped_steps": run.skipped_steps,
    }
    if run.base_evaluation and run.evaluations:
        base, now = run.base_evaluation, run.evaluations[-1]
        lines.append(
            f"held-out ({len(run.held_out.names)}): PSNR {base['psnr']:.2f} → {now['psnr']:.2f} dB "
            f"({now['psnr'] - base['psnr']:+.2f}), Oklab ΔE {base['delta_e']:.4f} → {now['delta_e']:.4f} "
            f"({(now['delta_e'] / base['delta_e'] - 1) * 100:+.1f} %), detail ratio {base['detail_ratio']:.3f} → "
            f"{now['detail_ratio']:.3f}, SSIM {base['ssim']:.4f} → {now['ssim']:.4f}"
        )
        values.update(base=base, held_out=now)
    else:
        lines.append("no held-out images (one image, or held_out_fraction 0): no before/after numbers")
    if run.history:
        values["last_loss"] = run.history[-1]["loss"]
    return "\n".join(lines), values


class DecoderFinetuneSteps(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VAELab_DecoderFinetuneSteps",
            display_name="Decoder Finetune Steps",
            category=CATEGORY,
            description=(
                "Finetunes a VAE's decoder on your images (the encoder stays frozen) for a number of steps, inside "
                "the graph, and outputs the finetuned VAE for any VAE input. Chain it with its training_state to "
                "continue: two chained nodes give exactly what one node with the summed steps gives. Works on "
                "kl-f8 (SD/SDXL/SD3/FLUX.1), TAESD-family and Stable Cascade stage A decoders."
            ),
            inputs=[
                io.Vae.Input("vae", tooltip="The VAE whose decoder is trained. It is copied, never changed."),
                inputs.images(),
                inputs.folder(default=""),
                inputs.recipe(),
                io.Int.Input(
                    "steps",
                    default=200,
                    min=1,
                    max=1_000_000,
                    tooltip="Optimiser steps in this node. On a GPU, thousands; on a CPU, ~3 s per step for TAEF2 at "
                    "batch 8, 128 px.",
                ),
                inputs.batch_size(),
                inputs.crop_size(),
                inputs.learning_rate(),
                inputs.seed(),
                inputs.held_out_fraction(),
                io.Combo.Input(
                    "output_weights",
                    options=WEIGHTS,
                    default="ema",
                    tooltip="ema = the exponential moving average of the weights (smoother, what the recipes "
                    "publish); raw = the last step's weights.",
                ),
                inputs.gradient_checkpointing(optional=False),
                io.Boolean.Input(
                    "posthoc_ema",
                    default=False,
                    optional=True,  # optional: older prompts lack it
                    tooltip="Keep snapshots of two power-function EMAs (EDM2) in the training_state, so Post-hoc "
                    "EMA can rebuild the decoder for any EMA length afterwards. Costs up to 34 fp16 "
                    "copies of the decoder in memory (TAEF2 ~0.1 GB, SD kl-f8 ~3.4 GB).",
                ),
                inputs.training_state(
                    "Continue from an earlier Decoder Finetune Steps (same VAE). Its steps count "
                    "on: schedules and crops follow the global step."
                ),
            ],
            outputs=[
                io.Vae.Output(
                    "finetuned_vae", display_name="VAE", tooltip="The VAE with the finetuned decoder (same encoder)."
                ),
                TrainingState.Output(
                    "state",
                    display_name="training_state",
                    tooltip="Weights, optimiser, critic, EMA and history so far: connect to another "
                    "Decoder Finetune Steps to continue, or to Save Finetuned VAE for its metadata.",
                ),
                io.Image.Output(
                    "loss_curve", display_name="loss curve", tooltip="Loss and held-out PSNR over the steps."
                ),
                io.String.Output("summary", display_name="summary", tooltip="The text shown on the node."),
            ],
        )

    @classmethod
    def execute(
        cls,
        vae,
        folder,
        recipe,
        steps,
        batch_size,
        crop_size,
        learning_rate,
        seed,
        held_out_fraction,
        output_weights,
        gradient_checkpointing,
        posthoc_ema=False,
        images=None,
        training_state=None,
    ) -> io.NodeOutput:
        import comfy.model_management as mm
        import comfy.utils
        import torch

        train, held, held_names, source = training_images(images, folder, seed, held_out_fraction, crop_size)
        if not train:
            raise ValueError(
                "Decoder Finetune Steps: no training images left after the held-out split; lower "
                "held_out_fraction or add images"
            )
        lpips = (
            perceptual.lpips_if_available(recipes.RECIPES[recipe].lpips_net)
            if recipes.RECIPES[recipe].uses_lpips
            else None
        )
        chosen, note = recipes.resolve_recipe(recipe, lpips is not None)
        if note:
            logging.warning("VAE Lab Decoder Finetune Steps: %s", note)
        if learning_rate > 0:
            chosen = recipes.recipe_with(chosen, lr=learning_rate)
        config = finetune.FinetuneConfig(
            batch_size=batch_size,
            crop_size=crop_size,
            seed=seed,
            gradient_checkpointing=gradient_checkpointing,
            posthoc_ema=posthoc_ema,
        )
        mm.unload_all_models()  # as core's LoRA trainer does: the decoder gets the memory
        mm.soft_empty_cache()
        device = training_device()
        model, family, scale, shift = trainable_decoder(vae, "Decoder Finetune Steps")
        encode = host_encoder(vae)
        progress = comfy.utils.ProgressBar(steps)
        with torch.inference_mode(False), torch.enable_grad():
            try:
                training = TrainingRun(
                    model,
                    chosen,
                    config,
                    train,
                    encode,
                    held_out_images=held,
                    held_out_names=held_names,
                    lpips=lpips.to(device) if chosen.uses_lpips else None,
                    state=training_state,
                    device=device,
                )
            except finetune.FinetuneError as exc:
                raise ValueError(f"Decoder Finetune Steps: {exc}") from exc
            with training:
                run = training.trainer
                sample = _preview_sample(run, training.cache, training.held_out)
                every = max(1, steps // 25)
                done = {"n": 0}

                def on_step(_logs):
                    done["n"] += 1
                    mm.throw_exception_if_processing_interrupted()
                    preview = _preview(run, sample) if done["n"] % every == 0 or done["n"] == steps else None
                    progress.update_absolute(done["n"], steps, preview)

                try:
                    training.run(steps, on_step=on_step)
                except torch.cuda.OutOfMemoryError as exc:
                    raise RuntimeError(
                        f"Decoder Finetune Steps ran out of GPU memory at batch_size {batch_size}, "
                        f"crop_size {crop_size}: lower batch_size or crop_size, or turn on gradient_checkpointing"
                    ) from exc
                state = run.state_dict()
                tuned = run.decoder_tensors(use_ema=output_weights == "ema")
                curve = loss_curve(run)
                text, values = summary_text(run, note, source, output_weights)
        new_vae = vae_with_decoder(vae, family, tuned, scale, shift)
        new_vae.vae_lab_training = {
            "recipe": chosen.as_dict(),
            "steps": run.step,
            "images_seen": run.images_seen,
            "output_weights": output_weights,
            "held_out": values.get("held_out"),
            "base_held_out": values.get("base"),
            "family": family,
            "base": getattr(vae, "vae_lab_source", None),
        }
        new_vae.vae_lab_source = getattr(vae, "vae_lab_source", None)
        return io.NodeOutput(new_vae, state, comfy_from_images01(curve[None]), text, ui=summary_ui(text, values))


def _preview_sample(run, cache, held_out):
    if held_out is not None:
        target, latents = held_out.images01[0], held_out.latents[:1]
    else:
        latents, targets = cache.batch(0, 1)
        target = targets[0]
    return target, latents, run.decode_with(latents, use_ema=False)[0]
