from __future__ import annotations

import os

from comfy_api.latest import io

from ..training import taesd
from ..training.layouts import TINY
from ..training.vae_files import (
    VaeFileError,
    describe_weights,
    join_files,
    open_vae_file,
)
from .common import CATEGORY, LOADER_OF_FAMILY, header_keys, summary_ui
from .common import file_stamps as _file_stamps
from .host_vae import assemble

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLED_TAEF2 = "taef2 (bundled)"
BUNDLED_DIR = os.path.join(ROOT, "assets", "taef2")
AUTO = "auto"
LATENT_SPACES = {f"{v.latent_space} ({v.name})": v for v in taesd.VARIANTS.values()}
ENCODER_CHOICES = ["from this file", "from base"]
TINY_KEY_PREFIXES = (
    "taesd_decoder.",
    "taesd_encoder.",
    "decoder.layers.",
    "encoder.layers.",
    "model.decoder.1.",
    "decoder.1.",
)


def _choices() -> dict[str, list[tuple[str, str | None]]]:
    """Combo entry -> [(path, part hint)]: the bundled TAEF2, encoder/decoder pairs and single files in
    models/vae_approx (madebyollin's names), and TAESD-family safetensors in models/vae."""
    import folder_paths

    choices = {
        BUNDLED_TAEF2: [
            (os.path.join(BUNDLED_DIR, "taef2_encoder.pth"), "encoder"),
            (os.path.join(BUNDLED_DIR, "taef2_decoder.pth"), "decoder"),
        ]
    }
    approx = folder_paths.get_filename_list("vae_approx")
    pairs, singles = taesd.group_tiny_files(approx)
    for stem, (enc, dec) in pairs.items():
        choices[stem] = [
            (folder_paths.get_full_path("vae_approx", enc), "encoder"),
            (folder_paths.get_full_path("vae_approx", dec), "decoder"),
        ]
    for name in singles:
        m = taesd.PART_FILE.match(os.path.basename(name))
        choices[name] = [(folder_paths.get_full_path("vae_approx", name), m.group("part") if m else None)]
    for name in folder_paths.get_filename_list("vae"):
        path = folder_paths.get_full_path("vae", name)
        if (
            name not in choices
            and name.lower().endswith(".safetensors")
            and path
            and any(k.startswith(TINY_KEY_PREFIXES) for k in header_keys(path))
        ):
            choices[name] = [(path, None)]
    return choices


def _latent_space(choice: str, latent_space: str, decoder, channels: int) -> taesd.TinyVariant:
    if latent_space != AUTO:
        variant = LATENT_SPACES[latent_space]
    else:
        det = decoder.detected
        recorded = taesd.VARIANTS.get(decoder.metadata.get("vae_lab.variant", ""))  # written by Save Finetuned VAE
        variant = (
            recorded
            or (taesd.variant_from_scale(det.latent_scale, det.latent_shift) if det.latent_scale is not None else None)
            or taesd.variant_from_name(decoder.source)
            or taesd.variant_from_name(choice)
        )
        if variant is None and det.midblock_groupnorm:
            variant = taesd.VARIANTS["taef2"]
        if variant is None:
            if det.latent_scale is not None:  # a combined file with its own scale: trust it
                return taesd.TinyVariant("custom", "from the file", channels, det.latent_scale, det.latent_shift)
            raise VaeFileError(
                f"{choice}: cannot tell which latent space this {channels}-channel decoder is for (the file "
                "name does not say); set latent_space"
            )
    if variant.latent_channels != channels:
        raise VaeFileError(
            f"{choice}: latent_space {variant.latent_space} has {variant.latent_channels} latent channels "
            f"but this decoder takes {channels}; pick the matching latent_space"
        )
    return variant


class LoadTinyAutoencoder(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VAELab_LoadTinyAutoencoder",
            display_name="Load Tiny Autoencoder",
            category=CATEGORY,
            description=(
                "Loads a TAESD-family tiny autoencoder (taesd, taesdxl, taesd3, taef1, taef2) as a ComfyUI VAE: "
                "madebyollin's encoder/decoder pairs from models/vae_approx, a combined file as VAESave writes it, "
                "or diffusers' AutoencoderTiny. The bundled TAEF2 is always offered, including its mid-block "
                "GroupNorm variant that ComfyUI cannot build on its own. A decoder alone can borrow any same-space "
                "VAE's encoder (e.g. SD's encoder with the TAESD decoder)."
            ),
            inputs=[
                io.Combo.Input(
                    "name",
                    options=list(_choices()),
                    default=BUNDLED_TAEF2,
                    tooltip="taef2 (bundled) always works. Pairs appear under their stem (taesdxl) when both "
                    "<stem>_encoder and <stem>_decoder are in models/vae_approx; other files there, and "
                    "TAESD-family safetensors in models/vae, appear by file name.",
                ),
                io.Combo.Input(
                    "latent_space",
                    options=[AUTO] + list(LATENT_SPACES),
                    default=AUTO,
                    tooltip="Whose latents the decoder reads; sets the latent scale/shift. 'auto' reads it from the "
                    "file (vae_scale) or its name (taesdxl_...); set it for files with other names.",
                ),
                io.Combo.Input(
                    "encoder",
                    options=ENCODER_CHOICES,
                    default=ENCODER_CHOICES[0],
                    tooltip="'from this file' uses the tiny encoder when there is one (a lone decoder always uses "
                    "the base's). 'from base' encodes with base_vae, e.g. the full SD VAE's encoder.",
                ),
                io.Vae.Input(
                    "base_vae",
                    optional=True,
                    tooltip="A VAE of the same latent space that supplies the encoder for a lone decoder, or for "
                    "'from base'.",
                ),
            ],
            outputs=[
                io.Vae.Output(
                    "vae",
                    display_name="VAE",
                    tooltip="A ComfyUI VAE for VAE Decode/Encode (Tiled) and every VAE input.",
                ),
                io.String.Output(
                    "info",
                    display_name="info",
                    tooltip="What was loaded: variant, latent scale/shift, parameters, dtype, how the VAE was built.",
                ),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, name, latent_space, encoder, base_vae=None):
        """Reload when a chosen file changes on disk (e.g. a finetune saved again under the same name)."""
        return _file_stamps([path for path, _ in _choices().get(name, [])])

    @classmethod
    def execute(cls, name, latent_space, encoder, base_vae=None) -> io.NodeOutput:
        files = _choices().get(name)
        if files is None:
            raise VaeFileError(
                f"Load Tiny Autoencoder: {name!r} is no longer in models/vae_approx or models/vae; "
                "refresh the node list (press R) and pick again"
            )
        parts = [open_vae_file(path, hint) for path, hint in files]
        for part in parts:
            if part.family != TINY:
                raise VaeFileError(
                    f"{part.source}: this is a {part.detected.family_name} file, not a TAESD-family one; "
                    f"load it with {LOADER_OF_FAMILY[part.family]}"
                )
        decoder = next((p for p in parts if p.detected.has_decoder), None)
        if decoder is None:
            raise VaeFileError(f"{name}: holds only a TAESD encoder; pick a decoder file or an encoder/decoder pair")
        lines = []
        for part in parts:
            lines += describe_weights(part)
        encoder_file = next((p for p in parts if p is not decoder), None)
        if encoder_file is not None:  # a madebyollin pair: one full set of weights
            decoder = join_files(decoder, encoder_file, name)
        variant = _latent_space(name, latent_space, decoder, decoder.detected.latent_channels)
        vae, notes = assemble(
            decoder,
            base_vae=base_vae,
            use_base_encoder=encoder == "from base",
            latent_scale=variant.latent_scale,
            latent_shift=variant.latent_shift,
        )
        vae.vae_lab_source = {"file": name, "path": files[-1][0], "variant": variant.name}
        lines += [
            f"latent space {variant.latent_space}: scale {variant.latent_scale:g}, shift {variant.latent_shift:g}",
            "VAE: " + "; ".join(notes),
        ]
        info = "\n".join(lines)
        values = {
            "variant": variant.name,
            "latent_space": variant.latent_space,
            "latent_channels": decoder.detected.latent_channels,
            "latent_scale": variant.latent_scale,
            "latent_shift": variant.latent_shift,
            "midblock_groupnorm": decoder.detected.midblock_groupnorm,
            "decoder_parameters": decoder.parameter_count(True),
            "encoder_parameters": decoder.parameter_count(False),
            "dtype": decoder.dtype,
            "built": notes,
        }
        return io.NodeOutput(vae, info, ui=summary_ui(info, values))
