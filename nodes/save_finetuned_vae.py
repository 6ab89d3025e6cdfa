from __future__ import annotations

import json
import os

from comfy_api.latest import io

from ..training import key_maps, layouts
from ..training.files import save_safetensors_atomic, sha256_of_file
from ..training.layouts import KL, STAGE_A
from .common import CATEGORY, VERSION, summary_ui
from .host_vae import host_builds, latent_scale_shift, weights_or_refusal
from .training_inputs import TrainingState


def _metadata(vae, weights, training_state, scale: float, shift: float) -> dict[str, str]:
    meta = {
        "vae_lab.version": VERSION,
        "vae_lab.family": weights.detected.family_name,
        "vae_lab.latent_channels": str(weights.detected.latent_channels),
    }
    if weights.family == layouts.TINY:
        meta["vae_lab.latent_scale"], meta["vae_lab.latent_shift"] = f"{scale:g}", f"{shift:g}"
    source = getattr(vae, "vae_lab_source", None) or {}
    if source.get("path") and os.path.isfile(source["path"]):
        meta["vae_lab.base_file"] = source.get("file", os.path.basename(source["path"]))
        meta["vae_lab.base_sha256"] = sha256_of_file(source["path"])
    elif source.get("file"):
        meta["vae_lab.base_file"] = source["file"]
    else:
        meta["vae_lab.base_file"] = "unknown (a VAE not loaded by VAE Lab)"
    if source.get("licence"):
        meta["vae_lab.base_licence"] = f"{source['licence']} (the base's licence may bind this derivative)"
    training = dict(getattr(vae, "vae_lab_training", None) or {})
    if training_state is not None:
        training.setdefault("recipe", training_state["recipe"])
        training.setdefault("steps", training_state["step"])
        training.setdefault("images_seen", training_state["images_seen"])
        if training_state.get("evaluations"):
            training.setdefault("held_out", training_state["evaluations"][-1])
            training.setdefault("base_held_out", training_state.get("base_evaluation"))
    if training:
        meta["vae_lab.recipe"] = json.dumps(training.get("recipe"))
        meta["vae_lab.steps"] = str(training.get("steps"))
        meta["vae_lab.images_seen"] = str(training.get("images_seen"))
        meta["vae_lab.output_weights"] = str(training.get("output_weights", "ema"))
        if training.get("held_out"):
            meta["vae_lab.held_out_metrics"] = json.dumps(
                {"base": training.get("base_held_out"), "finetuned": training["held_out"]}
            )
    return meta


def _next_path(folder: str, stem: str, suffix: str) -> str:
    """``<stem>_00001_<suffix>``, the first number not yet taken (as core's savers count)."""
    counter = 1
    while os.path.exists(os.path.join(folder, f"{stem}_{counter:05}_{suffix}")):
        counter += 1
    return os.path.join(folder, f"{stem}_{counter:05}_{suffix}")


def _decoder_only_path(output_dir: str, family: str, filename_prefix: str) -> str:
    """Decoder-only files go where core Load VAE does not look (it would pair them with an uninitialised
    encoder without a word): output/vae_decoders for kl, output/vae_approx (madebyollin's naming) for TAESD."""
    import folder_paths

    kind = "vae_decoders" if family in (KL, STAGE_A) else "vae_approx"
    folder, stem, *_ = folder_paths.get_save_image_path(
        os.path.basename(filename_prefix), os.path.join(output_dir, kind)
    )
    return _next_path(folder, stem, "decoder.safetensors")


class SaveFinetunedVAE(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VAELab_SaveFinetunedVAE",
            display_name="Save Finetuned VAE",
            category=CATEGORY,
            description=(
                "Saves a VAE (e.g. from Decoder Finetune Steps) as a full VAE safetensors in output/vae, which core "
                "Load VAE and VAE Lab's loaders list at once, with metadata: base file and hash, family, recipe and "
                "settings, steps, images seen, held-out metrics, VAE Lab version. TAEF2 (which core cannot build) is "
                "saved as a madebyollin encoder/decoder pair in output/vae_approx for Load Tiny Autoencoder."
            ),
            is_output_node=True,
            inputs=[
                io.Vae.Input("vae", tooltip="The VAE to save: its encoder and (finetuned) decoder."),
                io.String.Input(
                    "filename_prefix",
                    default="vae/vae_lab_finetuned",
                    tooltip="Path under the output folder, as in core Save VAE; a counter is appended. "
                    "Names cannot leave the output folder.",
                ),
                io.Boolean.Input(
                    "decoder_only_too",
                    default=False,
                    tooltip="Also write a small decoder-only file to output/vae_decoders (TAESD: output/vae_approx), "
                    "where core Load VAE does not look; Load VAE Decoder pairs it with a base.",
                ),
                TrainingState.Input(
                    "training_state",
                    optional=True,
                    tooltip="Optional: the training_state of the run, for the metadata when the VAE came "
                    "through other nodes.",
                ),
            ],
            outputs=[io.String.Output("files", display_name="files", tooltip="The files written (full paths).")],
        )

    @classmethod
    def execute(cls, vae, filename_prefix, decoder_only_too, training_state=None) -> io.NodeOutput:
        import folder_paths

        weights = weights_or_refusal(vae, "Save Finetuned VAE")
        scale, shift = latent_scale_shift(vae, weights)
        metadata = _metadata(vae, weights, training_state, scale, shift)
        output_dir = folder_paths.get_output_directory()
        full_folder, stem, _counter, _subfolder, _prefix = folder_paths.get_save_image_path(filename_prefix, output_dir)
        encoder_half, decoder_half = layouts.split_parts(weights.detected)
        written = []
        if not weights.detected.has_encoder:
            # a hybrid (encoder of another family): the decoder is what can be saved in its own layout
            metadata["vae_lab.note"] = "decoder only: its encoder came from another VAE (a hybrid)"
            written.append(
                save_safetensors_atomic(
                    _decoder_file_tensors(weights.family, decoder_half),
                    _decoder_only_path(output_dir, weights.family, filename_prefix),
                    metadata,
                )
            )
        elif weights.family in (KL, STAGE_A) or host_builds(vae):
            tensors = (
                weights.tensors
                if weights.family in (KL, STAGE_A)
                else key_maps.comfy_from_tiny(weights.tensors, scale, shift)
            )
            written.append(save_safetensors_atomic(tensors, _next_path(full_folder, stem, ".safetensors"), metadata))
            if decoder_only_too:
                written.append(
                    save_safetensors_atomic(
                        _decoder_file_tensors(weights.family, decoder_half),
                        _decoder_only_path(output_dir, weights.family, filename_prefix),
                        metadata,
                    )
                )
        else:
            # e.g. TAEF2 on a ComfyUI that cannot build it: madebyollin's pair, where Load Tiny Autoencoder lists it
            approx_folder = os.path.join(output_dir, "vae_approx")
            full_approx, stem_approx, *_ = folder_paths.get_save_image_path(
                os.path.basename(filename_prefix), approx_folder
            )
            base = _next_path(full_approx, stem_approx, "decoder.safetensors")[: -len("_decoder.safetensors")]
            variant = (getattr(vae, "vae_lab_source", None) or {}).get("variant")
            if variant:
                metadata["vae_lab.variant"] = variant
            written.append(
                save_safetensors_atomic(
                    {k[len("encoder.") :]: v for k, v in encoder_half.items()}, base + "_encoder.safetensors", metadata
                )
            )
            written.append(
                save_safetensors_atomic(
                    {k[len("decoder.") :]: v for k, v in decoder_half.items()}, base + "_decoder.safetensors", metadata
                )
            )
        text = "wrote " + "\n".join(written)
        return io.NodeOutput(text, ui=summary_ui(text, {"files": written, "metadata": metadata}))


def _decoder_file_tensors(family: str, decoder_half: dict) -> dict:
    if family in (KL, STAGE_A):
        # decoder.* + post_quant_conv.* (up_blocks.* + out_block.*): Load VAE Decoder pairs it with a base
        return decoder_half
    return {k[len("decoder.") :]: v for k, v in decoder_half.items()}  # a madebyollin *_decoder file
