"""Stable Cascade decoders: stage A as a VAE, and one node that turns a stage-C latent into pixels.

A Stable Cascade "decoder" is two models: stage B, a diffusion U-Net conditioned on the stage-C latent,
and stage A, the f4 VQGAN that turns stage B's latent into pixels. Decoding a stage-C latent is
``StableCascade_StageB_Conditioning`` -> ``KSampler`` (stage B) -> ``VAEDecode`` (stage A); the decode
node below runs exactly that chain through the host's own sampler.
"""

from __future__ import annotations

import os

import torch
from comfy_api.latest import io

from ..training.layouts import STAGE_A
from ..training.vae_files import VaeFileError, describe_weights, open_vae_file
from .common import CATEGORY, file_stamps, header_keys, summary_ui
from .host import DECODERS_FOLDER
from .host_vae import assemble

#: Where stage A lives: its own file (models/vae, or a finetune in vae_decoders), or the ``vae.`` part of a
#: stage-B checkpoint (models/checkpoints; a bare stage-B U-Net in diffusion_models carries none).
STAGE_A_FOLDERS = ("vae", DECODERS_FOLDER, "checkpoints")
STAGE_A_KEYS = ("vquantizer.codebook.weight", "vquantizer.embedding.weight", "out_block.0.weight")
SOURCES = ["stage_c latent", "image (reconstruct)"]
EMBEDDING = 1280  # stage B's CLIP-G pooled width


def _is_stage_a(keys) -> bool:
    return any(k in keys or f"vae.{k}" in keys for k in STAGE_A_KEYS)


def stage_a_choices() -> dict[str, str]:
    """Combo entry ("<folder>/<name>") -> path of every safetensors file holding a stage A (headers only)."""
    import folder_paths

    choices = {}
    for kind in STAGE_A_FOLDERS:
        if kind not in folder_paths.folder_names_and_paths:
            continue
        for name in folder_paths.get_filename_list(kind):
            path = folder_paths.get_full_path(kind, name)
            if path and name.lower().endswith(".safetensors") and _is_stage_a(set(header_keys(path))):
                choices.setdefault(f"{kind}/{name}", path)
    return choices


class LoadStageA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VAELab_LoadStageA",
            display_name="Load Stable Cascade Stage A",
            category=CATEGORY,
            description=(
                "Loads Stable Cascade's stage A (the f4 VQGAN that turns stage-B latents into pixels) as a ComfyUI "
                "VAE: from stage_a.safetensors in models/vae, from a finetune VAE Lab saved, or from the vae. part of "
                "a stage-B checkpoint in models/checkpoints (e.g. a SoteDiffusion decoder release; only the stage A "
                "tensors are read from the file)."
            ),
            inputs=[
                io.Combo.Input(
                    "stage_a",
                    options=list(stage_a_choices()),
                    tooltip="Files holding a stage A, by folder: vae/ (stage_a.safetensors), vae_decoders/ "
                    "(decoder-only finetunes), checkpoints/ (stage-B checkpoints with a vae. part). "
                    "Only .safetensors files are looked into.",
                ),
                io.Vae.Input(
                    "base_vae",
                    optional=True,
                    tooltip="A stage A VAE that supplies the encoder when the chosen file holds only a decoder "
                    "(a decoder-only finetune).",
                ),
            ],
            outputs=[
                io.Vae.Output(
                    "vae",
                    display_name="VAE",
                    tooltip="Stage A as a ComfyUI VAE: VAE Decode of a stage-B latent, "
                    "VAE Encode, Stable Cascade Decode, finetuning.",
                ),
                io.String.Output(
                    "info", display_name="info", tooltip="What was loaded, from where, and the file's metadata."
                ),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, stage_a, base_vae=None):
        return file_stamps([stage_a_choices().get(stage_a)])

    @classmethod
    def execute(cls, stage_a, base_vae=None) -> io.NodeOutput:
        path = stage_a_choices().get(stage_a)
        if path is None:
            raise FileNotFoundError(
                f"Load Stable Cascade Stage A: {stage_a!r} is gone or holds no stage A any more; "
                "refresh (press R) and pick again"
            )
        weights = open_vae_file(path)
        if weights.family != STAGE_A:
            raise VaeFileError(
                f"{stage_a}: this is a {weights.detected.family_name} file, not a Stable Cascade stage A"
            )
        vae, notes = assemble(weights, base_vae=base_vae)
        lines = describe_weights(weights) + ["VAE: " + "; ".join(notes)]
        if weights.detected.wrapper:
            lines.insert(1, f"  read only the {weights.detected.wrapper} part of {os.path.basename(path)}")
        vae.vae_lab_source = {
            "file": stage_a,
            "path": path,
            "licence": next((v for k, v in weights.metadata.items() if "licen" in k.lower()), None),
        }
        info = "\n".join(lines)
        return io.NodeOutput(
            vae,
            info,
            ui=summary_ui(
                info,
                {
                    "family": weights.detected.family_name,
                    "layout": weights.detected.layout,
                    "parts": weights.detected.parts,
                    "built": notes,
                },
            ),
        )


def _auto_size(c_size: int, compression: int) -> int:
    """Pixel size for a stage-C latent side: c x compression to the nearest multiple of 64 (recovers the
    size Stable Cascade's empty latent was made for: 24 x 42 = 1008 -> 1024)."""
    return max(64, round(c_size * compression / 64) * 64)


def stage_c_from_image(image: torch.Tensor, effnet, compression: int) -> torch.Tensor:
    """The stage-C latent of an image, as core's StableCascade_StageC_VAEEncode makes it."""
    import comfy.utils

    height, width = image.shape[1:3]
    if width // compression == 0 or height // compression == 0:
        raise ValueError(
            f"Stable Cascade Decode: the image ({width}x{height}) is smaller than compression {compression}"
        )
    scaled = comfy.utils.common_upscale(
        image.movedim(-1, 1),
        (width // compression) * effnet.downscale_ratio,
        (height // compression) * effnet.downscale_ratio,
        "bicubic",
        "center",
    ).movedim(1, -1)
    return effnet.encode(scaled[..., :3])


def stage_b_conditioning(positive, stage_c: torch.Tensor):
    """(positive, negative) for stage B: the prior set on the positive (as StableCascade_StageB_Conditioning
    does), the negative zeroed (as ConditioningZeroOut does). Without a positive: zero pooled embeddings."""
    if positive is None:
        positive = [[torch.zeros(1, 1, EMBEDDING), {"pooled_output": torch.zeros(1, EMBEDDING)}]]
    pos, neg = [], []
    for tensor, extras in positive:
        with_prior = dict(extras, stable_cascade_prior=stage_c)
        pos.append([tensor, with_prior])
        zeroed = {k: (torch.zeros_like(v) if k == "pooled_output" and v is not None else v) for k, v in extras.items()}
        neg.append([torch.zeros_like(tensor), zeroed])
    return pos, neg


def _check_models(model, vae) -> None:
    import comfy.model_base

    if not isinstance(model.model, comfy.model_base.StableCascade_B):
        raise ValueError(
            f"Stable Cascade Decode: 'model' is a {type(model.model).__name__}, not a Stable Cascade stage B; "
            "load stage B (e.g. stable_cascade_stage_b.safetensors) with Load Checkpoint or Load Diffusion Model"
        )
    if type(vae.first_stage_model).__name__ != "StageA":
        raise ValueError(
            f"Stable Cascade Decode: 'vae' is a {type(vae.first_stage_model).__name__}, not stage A; "
            "load it with Load Stable Cascade Stage A (or Load VAE on stage_a.safetensors)"
        )


class StableCascadeDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        import comfy.samplers

        return io.Schema(
            node_id="VAELab_StableCascadeDecode",
            display_name="Stable Cascade Decode",
            category=CATEGORY,
            description=(
                "Turns a stage-C latent into an image with a stage-B model and a stage-A VAE, in one node: the same "
                "sampling core's StableCascade_StageB_Conditioning -> KSampler -> VAE Decode chain does, with "
                "SoteDiffusion's defaults (Euler ancestral, Karras, 10 steps, CFG 1.1). 'image (reconstruct)' encodes "
                "an image with the stage-C encoder (effnet) first, so Cascade decoders can be compared on your own "
                "images."
            ),
            inputs=[
                io.Model.Input(
                    "model",
                    tooltip="Stage B (a Stable Cascade decoder's diffusion model), from Load Checkpoint "
                    "or Load Diffusion Model.",
                ),
                io.Vae.Input("vae", tooltip="Stage A, from Load Stable Cascade Stage A, Load VAE or Load Checkpoint."),
                io.Combo.Input(
                    "source",
                    options=SOURCES,
                    default=SOURCES[0],
                    tooltip="'stage_c latent': decode the stage_c input (e.g. from a stage-C KSampler). "
                    "'image (reconstruct)': image -> effnet -> stage B -> stage A.",
                ),
                io.Int.Input(
                    "seed",
                    default=0,
                    min=0,
                    max=0xFFFFFFFFFFFFFFFF,
                    control_after_generate=True,
                    tooltip="Stage B's sampling noise.",
                ),
                io.Int.Input(
                    "steps",
                    default=10,
                    min=1,
                    max=1000,
                    tooltip="Stage B sampling steps (10 on the SoteDiffusion card).",
                ),
                io.Float.Input(
                    "cfg",
                    default=1.1,
                    min=0.0,
                    max=100.0,
                    step=0.05,
                    round=0.01,
                    tooltip="Guidance against the zeroed conditioning; 1.0-1.2 for stage B. At 1.0 the "
                    "negative pass is skipped.",
                ),
                io.Combo.Input(
                    "sampler_name",
                    options=comfy.samplers.KSampler.SAMPLERS,
                    default="euler_ancestral",
                    tooltip="Stage B's sampler (Euler ancestral on the SoteDiffusion card).",
                ),
                io.Combo.Input(
                    "scheduler",
                    options=comfy.samplers.KSampler.SCHEDULERS,
                    default="karras",
                    tooltip="Stage B's noise schedule (Karras on the SoteDiffusion card).",
                ),
                io.Int.Input(
                    "compression",
                    default=42,
                    min=4,
                    max=128,
                    tooltip="Pixels per stage-C latent cell, as in Stable Cascade's empty latent (42 for 1024 px "
                    "from a 24x24 stage-C latent).",
                ),
                io.Int.Input(
                    "width",
                    default=0,
                    min=0,
                    max=16384,
                    step=8,
                    tooltip="Output width in latent mode; 0 = stage-C width x compression, to the nearest "
                    "multiple of 64. Reconstruct mode keeps the image's size.",
                ),
                io.Int.Input("height", default=0, min=0, max=16384, step=8, tooltip="As width."),
                io.Latent.Input(
                    "stage_c", optional=True, tooltip="The stage-C latent to decode ('stage_c latent' source)."
                ),
                io.Image.Input("image", optional=True, tooltip="Images to reconstruct ('image (reconstruct)' source)."),
                io.Vae.Input(
                    "effnet",
                    optional=True,
                    tooltip="The stage-C encoder (effnet_encoder.safetensors via Load VAE), for 'image (reconstruct)'.",
                ),
                io.Conditioning.Input(
                    "positive",
                    optional=True,
                    tooltip="Stage B's text conditioning (its pooled embedding is used). Unconnected: a "
                    "zero embedding, which is what a decoder-only release expects.",
                ),
            ],
            outputs=[
                io.Image.Output("decoded", display_name="IMAGE", tooltip="The decoded images."),
                io.Latent.Output(
                    "stage_c_out",
                    display_name="stage_c",
                    tooltip="The stage-C latent that was decoded (the effnet encoding in reconstruct mode).",
                ),
            ],
        )

    @classmethod
    def execute(
        cls,
        model,
        vae,
        source,
        seed,
        steps,
        cfg,
        sampler_name,
        scheduler,
        compression,
        width,
        height,
        stage_c=None,
        image=None,
        effnet=None,
        positive=None,
    ) -> io.NodeOutput:
        import nodes as host_nodes  # ComfyUI's nodes.py (this pack's own folder is imported relatively)

        _check_models(model, vae)
        if source == SOURCES[1]:
            if image is None or effnet is None:
                missing = " and ".join(n for n, v in (("image", image), ("effnet", effnet)) if v is None)
                raise ValueError(
                    f"Stable Cascade Decode: source 'image (reconstruct)' needs {missing} connected "
                    "(effnet: effnet_encoder.safetensors loaded with Load VAE)"
                )
            c_latent = stage_c_from_image(image, effnet, compression)
            b_height, b_width = (image.shape[1] // 8) * 2, (image.shape[2] // 8) * 2
        else:
            if stage_c is None:
                raise ValueError(
                    "Stable Cascade Decode: source 'stage_c latent' needs the stage_c input connected "
                    "(or switch source to 'image (reconstruct)')"
                )
            c_latent = stage_c["samples"]
            if c_latent.ndim != 4 or c_latent.shape[1] != 16:
                raise ValueError(
                    f"Stable Cascade Decode: stage_c has shape {tuple(c_latent.shape)}; a stage-C latent has "
                    "16 channels (from a stage-C sampler or StableCascade_StageC_VAEEncode)"
                )
            b_height = (height or _auto_size(c_latent.shape[2], compression)) // 4
            b_width = (width or _auto_size(c_latent.shape[3], compression)) // 4
        pos, neg = stage_b_conditioning(positive, c_latent)
        b_latent = {"samples": torch.zeros([c_latent.shape[0], 4, b_height, b_width])}
        (sampled,) = host_nodes.common_ksampler(model, seed, steps, cfg, sampler_name, scheduler, pos, neg, b_latent)
        images = vae.decode(sampled["samples"])
        return io.NodeOutput(images, {"samples": c_latent})
