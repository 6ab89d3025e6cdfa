"""The one place that builds or takes apart a ComfyUI ``VAE`` (``comfy.sd.VAE``).

Checked canonical weights (``training.vae_files``) become a VAE every core node accepts:

- natively, through the host's own constructor, whenever the host can build the architecture and
  its module then holds *exactly* our tensors (checked key by key, since the host loads with
  ``strict=False`` and only logs leftovers at debug level);
- otherwise (TAEF2's mid-block GroupNorm on a host without it, hybrids of two families) by letting
  the host build the nearest VAE it knows -- which sets its ratios and memory estimates -- and putting
  our module in as ``first_stage_model`` with a fresh patcher.

Our modules' state-dict keys contain none of the host's detection keys (``taesd_decoder.1.weight``,
``decoder.conv_in.weight``...), so if core VAESave writes such a VAE, core VAELoader refuses the file
as "invalid" instead of silently dropping the branch it does not know; VAE Lab's loaders read it back.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..training import key_maps, layouts
from ..training.klf8 import config_from_state_dict
from ..training.layouts import KL, STAGE_A, TINY
from ..training.vae_files import (
    Pairing,
    VaeFileError,
    VaeWeights,
    build_autoencoder,
    pair_with_base,
    weights_from_state_dict,
)

#: kl architectures ComfyUI 0.3.64 builds from ``decoder.conv_in.weight`` (anything else it mis-builds).
HOST_KL_CONFIGS = {((1, 2, 4, 4), 128, 2), ((1, 2, 4), 128, 2)}
HOST_KL_CHANNELS = (4, 16)


class HostConvention(nn.Module):
    """A ``training`` autoencoder (images in [0, 1]) speaking the host's convention: pixels in
    [-1, 1] in and out, raw latents."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode((pixels + 1) / 2)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.model.decode(latents) * 2 - 1


class HybridAutoencoder(nn.Module):
    """Encoder of one VAE, decoder of another, sharing one latent space (e.g. SD's encoder with a
    TAESD decoder). Both sides speak the host's convention."""

    def __init__(self, encoder_side: nn.Module, decoder_side: nn.Module):
        super().__init__()
        self.encoder_side = encoder_side
        self.decoder_side = decoder_side

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.encoder_side.encode(pixels)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder_side.decode(latents)


def weights_of(vae) -> dict[str, torch.Tensor]:
    """The VAE's current tensors (its module's state dict)."""
    return vae.get_sd()


def _host_vae(state_dict: dict[str, torch.Tensor]):
    import comfy.sd

    vae = comfy.sd.VAE(sd=state_dict)
    vae.throw_exception_if_invalid()
    return vae


def _holds_exactly(module: nn.Module, state_dict: dict[str, torch.Tensor]) -> bool:
    own = module.state_dict()
    return set(own) == set(state_dict) and all(own[k].shape == v.shape for k, v in state_dict.items())


def _with_module(shell, module: nn.Module):
    """A copy of ``shell`` (ratios, dtype, device, memory estimates) running ``module``."""
    import comfy.model_management
    import comfy.model_patcher

    vae = copy.copy(shell)
    vae.first_stage_model = module.eval().requires_grad_(False).to(shell.vae_dtype)
    vae.patcher = comfy.model_patcher.ModelPatcher(
        vae.first_stage_model, load_device=shell.device, offload_device=comfy.model_management.vae_offload_device()
    )
    return vae


def check_host_can_build_kl(tensors: dict[str, torch.Tensor], source: str) -> None:
    cfg = config_from_state_dict(tensors)
    if cfg.z_channels not in HOST_KL_CHANNELS or (cfg.ch_mult, cfg.ch, cfg.num_res_blocks) not in HOST_KL_CONFIGS:
        raise VaeFileError(
            f"{source}: a kl VAE with {cfg.z_channels} latent channels, ch {cfg.ch}, ch_mult {list(cfg.ch_mult)}: "
            "ComfyUI builds only the SD/SDXL (4-channel) and SD3/FLUX.1 (16-channel) kl-f8 and the x4 upscaler's "
            "kl-f4, so it cannot run this file"
        )


def native_vae(family: str, tensors: dict[str, torch.Tensor], source: str):
    """A kl or stage A VAE built by the host itself, checked to hold exactly ``tensors``."""
    if family == KL:
        check_host_can_build_kl(tensors, source)
    vae = _host_vae(tensors)
    if not _holds_exactly(vae.first_stage_model, tensors):
        raise VaeFileError(
            f"{source}: ComfyUI built a VAE whose tensors differ from the file's; "
            "please report this file's layout to VAE Lab"
        )
    return vae


def tiny_vae(tensors: dict[str, torch.Tensor], latent_scale: float, latent_shift: float):
    """The host's own TAESD when it holds exactly these tensors (TAEF2 on a host that knows it,
    every older variant); else the host's TAESD shell running our module."""
    host_sd = key_maps.comfy_from_tiny(tensors, latent_scale, latent_shift)
    vae = _host_vae(host_sd)
    if _holds_exactly(vae.first_stage_model, host_sd):
        return vae, "built by ComfyUI"
    model = build_autoencoder(TINY, tensors, latent_scale, latent_shift)
    return _with_module(
        vae, HostConvention(model)
    ), "ComfyUI's TAESD VAE running VAE Lab's module (the host lacks this variant)"


def full_vae(family: str, tensors: dict[str, torch.Tensor], latent_scale: float, latent_shift: float, source: str):
    """(VAE, how it was built) for a complete set of canonical tensors of one family."""
    if family in (KL, STAGE_A):
        return native_vae(family, tensors, source), "built by ComfyUI"
    return tiny_vae(tensors, latent_scale, latent_shift)


def _encoder_side(base_vae) -> nn.Module:
    """A private copy of the base's module (sharing it would let two patchers move one set of
    weights between devices), with its decoding half dropped."""
    module = copy.deepcopy(base_vae.first_stage_model)
    for name in ("decoder", "post_quant_conv", "taesd_decoder", "decoder_side"):
        if isinstance(getattr(module, name, None), nn.Module):
            setattr(module, name, None)
    return module


def vae_from_pairing(pairing: Pairing, latent_scale: float = 1.0, latent_shift: float = 0.0, base_vae=None):
    """(VAE, how it was built) for a decoder file and, where needed, its base.

    ``base_vae`` is the host VAE the encoder comes from in a hybrid (a base given as a file is
    built natively first by the caller).
    """
    decoder = pairing.decoder
    if pairing.merged_tensors is not None:
        return full_vae(decoder.family, pairing.merged_tensors, latent_scale, latent_shift, decoder.source)
    if base_vae is None:
        raise VaeFileError(f"{decoder.source}: a hybrid needs the base as a ComfyUI VAE")
    if decoder.family == STAGE_A:
        raise VaeFileError(
            f"{decoder.source}: a Stable Cascade stage A decoder pairs only with a stage A encoder; "
            "connect a stage A VAE as the base"
        )
    _, decoder_half = layouts.split_parts(decoder.detected)
    if decoder.family == KL:
        check_host_can_build_kl(decoder_half, decoder.source)
        ratio = config_from_state_dict(decoder_half).downscale
    else:
        ratio = 8
    if base_vae.spacial_compression_encode() != ratio:
        raise VaeFileError(
            f"{decoder.source}: upsamples {ratio}x but the base encoder downsamples "
            f"{base_vae.spacial_compression_encode()}x: different latent spaces"
        )
    decoder_side = HostConvention(build_autoencoder(decoder.family, decoder_half, latent_scale, latent_shift))
    vae = _with_module(base_vae, HybridAutoencoder(_encoder_side(base_vae), decoder_side))
    vae.upscale_ratio = ratio
    return vae, "hybrid: the base's encoder module with VAE Lab's decoder module"


def base_weights(base_vae) -> VaeWeights | None:
    """The base VAE's weights in canonical form, or None for a family this pack cannot read (it can
    still lend its encoder to a hybrid)."""
    try:
        return weights_from_state_dict(weights_of(base_vae), "base_vae")
    except VaeFileError:
        return None


def assemble(
    decoder: VaeWeights,
    *,
    base_vae=None,
    base: VaeWeights | None = None,
    use_base_encoder: bool = False,
    latent_scale: float = 1.0,
    latent_shift: float = 0.0,
) -> tuple[object, list[str]]:
    """(VAE, what was done) for a decoder file plus an optional base (a connected VAE or a file)."""
    base_latent_channels = None
    allow_merge = True
    if base_vae is not None:
        base = base_weights(base_vae)
        base_latent_channels = base_vae.latent_channels
        if base is not None and base.family == TINY:
            # one module holds one latent scale: merge two TAESD halves only when they agree on it
            allow_merge = base.detected.latent_scale is not None and (
                abs(base.detected.latent_scale - latent_scale) < 1e-6
                and abs(base.detected.latent_shift - latent_shift) < 1e-6
            )
    pairing = pair_with_base(decoder, base, base_latent_channels, use_base_encoder, allow_merge)
    vae, how = vae_from_pairing(pairing, latent_scale, latent_shift, base_vae)
    return vae, pairing.notes + [how]


# ----------------------------------------------------------------------------------------------
# taking a VAE apart for training, and putting it back together


def weights_or_refusal(vae, purpose: str) -> VaeWeights:
    """The VAE's canonical weights, or an error that names its family and what ``purpose`` accepts."""
    try:
        return weights_from_state_dict(weights_of(vae), "the connected VAE")
    except VaeFileError as exc:
        raise VaeFileError(
            f"{purpose} works on kl-f8 (SD/SDXL/SD3/FLUX.1), TAESD-family and Stable Cascade stage A VAEs: {exc}"
        ) from exc


def latent_scale_shift(vae, weights: VaeWeights) -> tuple[float, float]:
    """The latent scale/shift a TAESD-family VAE applies (1, 0 for kl-f8)."""
    if weights.family != TINY:
        return 1.0, 0.0
    if weights.detected.latent_scale is not None:
        return weights.detected.latent_scale, weights.detected.latent_shift
    for module in vae.first_stage_model.modules():
        if hasattr(module, "latent_scale") and hasattr(module, "latent_shift"):
            return float(module.latent_scale), float(module.latent_shift)
    return 1.0, 0.0


def trainable_decoder(vae, purpose: str = "Decoder finetuning"):
    """(our decoder-only module holding a copy of the VAE's decoding half, family, scale, shift).
    The VAE itself is never touched."""
    weights = weights_or_refusal(vae, purpose)
    _, decoder_half = layouts.split_parts(weights.detected)
    scale, shift = latent_scale_shift(vae, weights)
    with torch.inference_mode(False):
        model = build_autoencoder(
            weights.family, {k: v.detach().clone() for k, v in decoder_half.items()}, scale, shift
        )
    return model, weights.family, scale, shift


def host_encoder(vae):
    """images01 (B, 3, H, W) -> raw latents through the VAE's own (frozen) encoder, as VAEEncode does."""

    def encode(images01: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            latents = vae.encode(images01.detach().movedim(1, -1).cpu())
        return latents.clone()  # a normal tensor: training happens outside inference mode

    return encode


def vae_with_decoder(
    vae, family: str, decoder_tensors: dict[str, torch.Tensor], latent_scale: float = 1.0, latent_shift: float = 0.0
):
    """A new VAE: ``vae``'s encoder with ``decoder_tensors`` (canonical keys) as its decoding half."""
    weights = weights_or_refusal(vae, "Replacing a decoder")
    if weights.family == family and weights.detected.has_encoder:
        encoder_half, _ = layouts.split_parts(weights.detected)
        merged = {**encoder_half, **decoder_tensors}
        return full_vae(family, merged, latent_scale, latent_shift, "the finetuned VAE")[0]
    if family == STAGE_A:
        raise VaeFileError("a stage A decoder needs a stage A VAE's encoder")
    decoder_side = HostConvention(build_autoencoder(family, decoder_tensors, latent_scale, latent_shift))
    return _with_module(vae, HybridAutoencoder(_encoder_side(vae), decoder_side))


def host_builds(vae) -> bool:
    """Whether the VAE runs ComfyUI's own module (so core Load VAE can rebuild it from its weights)."""
    return not isinstance(vae.first_stage_model, (HostConvention, HybridAutoencoder))
