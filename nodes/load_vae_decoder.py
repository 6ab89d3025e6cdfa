from __future__ import annotations

from comfy_api.latest import io

from ..training.layouts import KL
from ..training.vae_files import VaeFileError, describe_weights, open_vae_file
from .common import CATEGORY, LOADER_OF_FAMILY, summary_ui
from .common import file_stamps as _file_stamps
from .host import DECODERS_FOLDER
from .host_vae import assemble

NO_BASE = "(none)"
ENCODER_CHOICES = ["from this file", "from base"]


FOLDERS = ("vae", DECODERS_FOLDER)


def _vae_files() -> list[str]:
    """models/vae (+ output/vae) and the decoder-only folder models|output/vae_decoders."""
    import folder_paths

    names = []
    for kind in FOLDERS:
        if kind in folder_paths.folder_names_and_paths:
            names += [n for n in folder_paths.get_filename_list(kind) if n not in names]
    return names


def _vae_path(name: str) -> str | None:
    import folder_paths

    for kind in FOLDERS:
        if kind in folder_paths.folder_names_and_paths and (path := folder_paths.get_full_path(kind, name)):
            return path
    return None


def _vae_path_or_raise(name: str) -> str:
    path = _vae_path(name)
    if path is None:
        raise FileNotFoundError(
            f"Load VAE Decoder: {name!r} is not in models/vae or models/vae_decoders any more; "
            "refresh (press R) and pick again"
        )
    return path


def _licence(metadata: dict[str, str]) -> str | None:
    return next((v for k, v in metadata.items() if "licen" in k.lower()), None)


class LoadVAEDecoder(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        files = _vae_files()
        return io.Schema(
            node_id="VAELab_LoadVAEDecoder",
            display_name="Load VAE Decoder",
            category=CATEGORY,
            description=(
                "Loads a kl-f8 VAE or VAE decoder (SD 1.x/2.x finetunes such as Furception or ft-MSE, SDXL, "
                "SD3, FLUX.1) from models/vae in any common layout (LDM or diffusers keys, a whole checkpoint's "
                "VAE, fp16/bf16/fp32) and says what it loaded. A decoder-only file takes its encoder from a base "
                "VAE. The result plugs into any VAE input."
            ),
            inputs=[
                io.Combo.Input(
                    "vae_name",
                    options=files,
                    tooltip="A file in models/vae: a full VAE, a decoder-only finetune, or a whole SD checkpoint "
                    "(its VAE is taken). .safetensors preferred; .pt/.pth/.ckpt/.bin load only as plain "
                    "tensors (pickled code is refused).",
                ),
                io.Combo.Input(
                    "encoder",
                    options=ENCODER_CHOICES,
                    default=ENCODER_CHOICES[0],
                    tooltip="'from this file' uses the file's own encoder (a decoder-only file always uses the "
                    "base's). 'from base' pairs this decoder with the base's encoder, so several "
                    "decoders can be compared on identical latents.",
                ),
                io.Combo.Input(
                    "base_file",
                    options=[NO_BASE] + files,
                    default=NO_BASE,
                    tooltip="A full kl VAE from models/vae that supplies the encoder for a decoder-only file "
                    "(e.g. the VAE the decoder was finetuned from). Leave at (none) when base_vae is "
                    "connected or the file has its own encoder.",
                ),
                io.Vae.Input(
                    "base_vae",
                    optional=True,
                    tooltip="Any loaded VAE of the same latent space that supplies the encoder (instead of "
                    "base_file), e.g. from Load Checkpoint or Load VAE.",
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
                    tooltip="What was loaded: family, latent channels, parameters, dtype, "
                    "where the encoder came from, and the file's metadata.",
                ),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, vae_name, encoder, base_file, base_vae=None):
        """Reload when a chosen file changes on disk (e.g. a finetune saved again under the same name)."""
        return _file_stamps([_vae_path(name) for name in (vae_name, base_file) if name != NO_BASE])

    @classmethod
    def execute(cls, vae_name, encoder, base_file, base_vae=None) -> io.NodeOutput:
        if base_file != NO_BASE and base_vae is not None:
            raise ValueError(
                "Load VAE Decoder: both base_file and base_vae are set; set base_file to (none) or disconnect base_vae"
            )
        decoder = open_vae_file(_vae_path_or_raise(vae_name))
        if decoder.family != KL:
            raise VaeFileError(
                f"{vae_name}: this is a {decoder.detected.family_name} file, not a kl-f8 VAE; "
                f"load it with {LOADER_OF_FAMILY[decoder.family]}"
            )
        lines = describe_weights(decoder)
        base = None
        if base_file != NO_BASE:
            base = open_vae_file(_vae_path_or_raise(base_file))
            if base.family != KL:
                raise VaeFileError(
                    f"base_file {base_file}: a {base.detected.family_name} file; base_file takes a kl VAE. "
                    "For another family's encoder, load it and connect it as base_vae"
                )
            lines += describe_weights(base)
        vae, notes = assemble(decoder, base_vae=base_vae, base=base, use_base_encoder=encoder == "from base")
        lines += ["VAE: " + "; ".join(notes)]
        vae.vae_lab_source = {"file": vae_name, "path": _vae_path(vae_name), "licence": _licence(decoder.metadata)}
        info = "\n".join(lines)
        values = {
            "family": decoder.detected.family_name,
            "layout": decoder.detected.layout,
            "latent_channels": decoder.detected.latent_channels,
            "decoder_parameters": decoder.parameter_count(True),
            "encoder_parameters": decoder.parameter_count(False),
            "dtype": decoder.dtype,
            "parts": decoder.detected.parts,
            "built": notes,
            "metadata": decoder.metadata,
        }
        return io.NodeOutput(vae, info, ui=summary_ui(info, values))
