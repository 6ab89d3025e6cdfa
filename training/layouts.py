"""The pack's one state-dict key mapper and one family detector.

Files arrive in many layouts. Everything is brought to one *canonical* layout per family before any
other code sees it:

- ``kl`` (SD 1.x/2.x, SDXL, SD3, FLUX.1 VAEs, the x4 upscaler's f4): the LDM keys of
  ``training.klf8`` (``encoder.down.0.block.0.conv1.weight``, ``post_quant_conv.weight``).
  Read from LDM or diffusers keys (``decoder.up_blocks.0.resnets.0.norm1.weight``).
- ``tiny`` (TAESD family): madebyollin's ``nn.Sequential`` indices under ``encoder.`` /
  ``decoder.`` (the keys of ``training.taesd.TinyAutoencoder``). Read from madebyollin's separate
  ``*_encoder.pth`` / ``*_decoder.pth`` files, ComfyUI's combined ``taesd_encoder.`` /
  ``taesd_decoder.`` file (with ``vae_scale`` / ``vae_shift``, as VAESave writes it), or diffusers'
  AutoencoderTiny (``decoder.layers.0`` is madebyollin's ``decoder.1``: diffusers clamps outside
  the Sequential).
- ``stage_a`` (Stable Cascade / Würstchen v3 stage A, the f4 VQGAN): the release's keys, which are
  ComfyUI's and ``training.stage_a``'s (``up_blocks.1.gammas``, ``vquantizer.codebook.weight``).
  Read from the release's ``stage_a.safetensors``, the ``vae.`` part of a stage-B checkpoint, or
  diffusers' PaellaVQModel (``vquantizer.embedding.weight``).

Wrappers are peeled first: a whole SD checkpoint (``first_stage_model.``), ``vae.``-prefixed
checkpoints, ``state_dict`` nesting (see ``training.files``), and the ``model.`` / ``decoder_side.``
wrappers this pack's own host objects carry when core VAESave writes them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from .key_maps import LayoutError, ldm_from_diffusers, tiny_from_comfy, tiny_from_diffusers, tiny_part_of

KL = "kl"
TINY = "tiny"
STAGE_A = "stage_a"

#: Prefixes that wrap a VAE inside a bigger file; peeled in this order when what is inside is a VAE.
WRAPPER_PREFIXES = (
    "first_stage_model.",
    "vae.",
    "model.",
    "autoencoder.",
    "decoder_side.model.",
    "decoder_side.",
    "module.",
)

#: Families this pack recognises but whose loader lives elsewhere (or nowhere): refused by name.
FOREIGN_MARKERS = {
    "clf.1.weight": "a Stable Cascade stage B or C diffusion model (a MODEL: load it with Load Diffusion Model or "
    "Load Checkpoint; a stage-B checkpoint carries its stage A in its vae. part)",
    "backbone.1.0.block.0.1.num_batches_tracked": "Stable Cascade stage C EfficientNet encoder",
    "blocks.11.num_batches_tracked": "Stable Cascade stage C previewer",
    "encoder.backbone.1.0.block.0.1.num_batches_tracked": "Stable Cascade stage C encoder+previewer",
    "decoder.mid.block_1.mix_factor": "Stable Video Diffusion temporal VAE decoder",
    "decoder.layers.1.layers.0.beta": "Stable Audio VAE",
    "decoder.conv_in.conv.weight": "a video VAE (Hunyuan/Mochi/LTX/Wan family)",
    "decoder.up_blocks.0.res_blocks.0.conv1.conv.weight": "LTX-Video VAE",
    "decoder.unpatcher3d.wavelets": "Cosmos video tokenizer",
}


@dataclass
class Detected:
    """What a state dict holds, in canonical keys."""

    family: str  # KL, TINY or STAGE_A
    layout: str  # the source layout, in words ("LDM", "diffusers", "ComfyUI combined TAESD", ...)
    tensors: dict[str, torch.Tensor]  # canonical keys
    latent_channels: int
    has_encoder: bool
    has_decoder: bool
    wrapper: str = ""  # the prefix peeled off, if any
    latent_scale: float | None = None  # TAESD family: ComfyUI's vae_scale when the file carries it
    latent_shift: float | None = None
    midblock_groupnorm: bool = False  # TAEF2's variant
    notes: list[str] = field(default_factory=list)

    @property
    def parts(self) -> str:
        return {(True, True): "encoder + decoder", (False, True): "decoder only", (True, False): "encoder only"}[
            (self.has_encoder, self.has_decoder)
        ]

    @property
    def family_name(self) -> str:
        if self.family == STAGE_A:
            return "Stable Cascade stage A (f4 VQGAN)"
        if self.family == TINY:
            return "TAESD family" + (" (TAEF2 mid-block GroupNorm)" if self.midblock_groupnorm else "")
        return {
            4: "kl-f8, 4 latent channels (SD 1.x/2.x or SDXL)",
            16: "kl-f8, 16 latent channels (SD3 or FLUX.1)",
        }.get(self.latent_channels, f"kl, {self.latent_channels} latent channels")


# ----------------------------------------------------------------------------------------------
# detection


STAGE_A_PREFIXES = ("in_block.", "down_blocks.", "vquantizer.", "up_blocks.", "out_block.")


def _is_vae_like(sd) -> bool:
    return (
        any(k.startswith(("encoder.", "decoder.", "taesd_encoder.", "taesd_decoder.")) for k in sd)
        or tiny_part_of(sd) is not None
        or _is_stage_a(sd)
    )


def _is_stage_a(sd) -> bool:
    return ("up_blocks.0.0.weight" in sd and "out_block.0.weight" in sd) or "in_block.1.weight" in sd


def peel_wrappers(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """The VAE inside a bigger state dict, and the prefix that wrapped it ('' if none)."""
    if _is_vae_like(sd) and not any(k.startswith(WRAPPER_PREFIXES[:2]) for k in sd):
        return sd, ""
    for prefix in WRAPPER_PREFIXES:
        inner = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
        if inner and _is_vae_like(inner):
            return inner, prefix
    return sd, ""


def _foreign_family(sd) -> str | None:
    for marker, name in FOREIGN_MARKERS.items():
        if marker in sd or f"model.diffusion_model.{marker}" in sd:
            return name
    if (
        "decoder.conv_in.weight" in sd
        and sd["decoder.conv_in.weight"].shape[1] in (32, 64)
        and not any(k.startswith(("decoder.up.", "decoder.up_blocks.")) for k in sd)
    ):
        return "a Hunyuan-family VAE"
    return None


def detect(sd: dict[str, torch.Tensor], part_hint: str | None = None) -> Detected:
    """Family, layout and canonical tensors of a VAE state dict (wrappers peeled).

    ``part_hint`` ('encoder'/'decoder') is only needed for a bare madebyollin part whose role the
    keys cannot show. Raises LayoutError naming the first unrecognised keys.
    """
    sd, wrapper = peel_wrappers(sd)
    foreign = _foreign_family(sd)
    if foreign:
        raise LayoutError(f"this is {foreign}, not a VAE VAE Lab can load here")

    keys = set(sd)
    if _is_stage_a(sd):
        return _stage_a(sd, wrapper)
    if any(
        k.startswith(("encoder.down_blocks.", "decoder.up_blocks.", "encoder.mid_block.", "decoder.mid_block."))
        for k in keys
    ):
        return _kl(ldm_from_diffusers(sd), "diffusers", wrapper)
    if any(k.startswith(("encoder.down.", "decoder.up.", "decoder.mid.", "encoder.mid.")) for k in keys):
        return _kl(sd, "LDM", wrapper)
    if any(k.startswith(("taesd_encoder.", "taesd_decoder.")) for k in keys):
        det = _tiny(tiny_from_comfy(sd), "ComfyUI combined TAESD", wrapper, sd)
        if "vae_scale" in sd:
            det.latent_scale, det.latent_shift = float(sd["vae_scale"]), float(sd.get("vae_shift", torch.tensor(0.0)))
        return det
    if any(k.startswith(("encoder.layers.", "decoder.layers.")) for k in keys):
        return _tiny(tiny_from_diffusers(sd), "diffusers AutoencoderTiny", wrapper, sd)
    if any(re.match(r"(encoder|decoder)\.\d+\.", k) for k in keys):
        return _tiny(
            {k: v for k, v in sd.items() if re.match(r"(encoder|decoder)\.\d+\.", k)}, "VAE Lab tiny", wrapper, sd
        )
    part = tiny_part_of(sd) or (part_hint if sd and all(re.match(r"\d+\.", k) for k in sd) else None)
    if part:
        return _tiny({f"{part}.{k}": v for k, v in sd.items()}, f"madebyollin {part} file", wrapper, sd)
    raise LayoutError(
        f"unknown layout: no kl-f8, TAESD-family or Stable Cascade stage A keys found; first keys: {_first_keys(sd)}"
    )


def _first_keys(keys, n: int = 6) -> str:
    keys = sorted(keys)
    return (
        ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")
        if keys
        else "(none: the file is empty)"
    )


#: Training leftovers in LDM-style checkpoints: the loss (LPIPS + discriminator) and LDM's EMA copy.
KL_TRAINING_PREFIXES = ("loss.", "model_ema.")


def _kl(sd: dict[str, torch.Tensor], layout: str, wrapper: str) -> Detected:
    notes = []
    leftovers = [k for k in sd if k.startswith(KL_TRAINING_PREFIXES)]
    if leftovers:
        sd = {k: v for k, v in sd.items() if not k.startswith(KL_TRAINING_PREFIXES)}
        notes.append(f"ignored {len(leftovers)} training-only tensors (loss./model_ema.); the model weights were used")
    known = re.compile(r"(encoder|decoder)\.(conv_in|conv_out|norm_out|mid|down|up)\.|(post_)?quant_conv\.")
    unknown = [k for k in sd if not known.match(k)]
    if unknown:
        raise LayoutError(f"{layout}-layout kl VAE with unrecognised keys: {_first_keys(unknown)}")
    has_decoder = "decoder.conv_in.weight" in sd
    has_encoder = "encoder.conv_in.weight" in sd
    if has_decoder:
        channels = sd["decoder.conv_in.weight"].shape[1]
    elif "encoder.conv_out.weight" in sd:
        channels = sd["encoder.conv_out.weight"].shape[0] // 2
    else:
        raise LayoutError(f"kl VAE without decoder.conv_in or encoder.conv_out; first keys: {_first_keys(sd)}")
    return Detected(KL, layout, sd, int(channels), has_encoder, has_decoder, wrapper, notes=notes)


def _tiny(sd: dict[str, torch.Tensor], layout: str, wrapper: str, source: dict) -> Detected:
    has_decoder = "decoder.1.weight" in sd
    has_encoder = "encoder.0.weight" in sd
    if has_decoder:
        channels = sd["decoder.1.weight"].shape[1]
    elif has_encoder:
        last = max(int(k.split(".")[1]) for k in sd if k.startswith("encoder."))
        channels = sd[f"encoder.{last}.weight"].shape[0]
    else:
        raise LayoutError(f"{layout}: no TAESD encoder or decoder found; first keys: {_first_keys(source)}")
    det = Detected(
        TINY,
        layout,
        sd,
        int(channels),
        has_encoder,
        has_decoder,
        wrapper,
        midblock_groupnorm=any(".pool." in k for k in sd),
    )
    tiny_key = re.compile(r"((taesd_)?(encoder|decoder)\.(layers\.)?)?\d+\.|vae_(scale|shift)$")
    ignored = [k for k in source if not tiny_key.match(k)]
    if ignored:
        det.notes.append(f"ignored {len(ignored)} keys that are not TAESD weights: {_first_keys(ignored, 3)}")
    return det


def _stage_a(sd: dict[str, torch.Tensor], wrapper: str) -> Detected:
    layout = "diffusers PaellaVQModel" if "vquantizer.embedding.weight" in sd else "original"
    sd = {("vquantizer.codebook.weight" if k == "vquantizer.embedding.weight" else k): v for k, v in sd.items()}
    unknown = [k for k in sd if not k.startswith(STAGE_A_PREFIXES)]
    if unknown:
        raise LayoutError(f"{layout} stage A with unrecognised keys: {_first_keys(unknown)}")
    has_decoder = "up_blocks.0.0.weight" in sd
    has_encoder = "in_block.1.weight" in sd
    channels = sd["up_blocks.0.0.weight"].shape[1] if has_decoder else sd["vquantizer.codebook.weight"].shape[1]
    for key in [k for k in sd if k.endswith(".running_mean")]:  # a counter some exports leave out
        sd.setdefault(key.replace("running_mean", "num_batches_tracked"), torch.tensor(0, dtype=torch.long))
    return Detected(STAGE_A, layout, sd, int(channels), has_encoder, has_decoder, wrapper)


def stage_a_to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {("vquantizer.embedding.weight" if k == "vquantizer.codebook.weight" else k): v for k, v in sd.items()}


# ----------------------------------------------------------------------------------------------
# parts


def is_decoder_key(family: str, key: str) -> bool:
    """Whether a canonical key belongs to the decoding half (what a decoder finetune changes)."""
    if family == STAGE_A:
        return key.startswith(("up_blocks.", "out_block."))
    return key.startswith("decoder.") or (family == KL and key.startswith("post_quant_conv."))


def split_parts(det: Detected) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(encoder half, decoder half) of canonical tensors."""
    dec = {k: v for k, v in det.tensors.items() if is_decoder_key(det.family, k)}
    enc = {k: v for k, v in det.tensors.items() if not is_decoder_key(det.family, k)}
    return enc, dec
