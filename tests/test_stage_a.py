"""Stable Cascade stage A: our module against diffusers' PaellaVQModel (the independent implementation the
diffusers Stable Cascade pipeline decodes with) on full-size random weights, every source layout, the lazy read
from a stage-B checkpoint, and the refusals."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file
from test_layouts import _jitter, diffusers

from training import layouts
from training.layouts import STAGE_A
from training.stage_a import StageAAutoencoder, config_from_state_dict
from training.vae_files import (
    VaeFileError,
    build_autoencoder,
    open_vae_file,
    pair_with_base,
    weights_from_state_dict,
)


@pytest.fixture(scope="module")
def paella():
    """(diffusers model, its state dict): the release's architecture, 18.4 M parameters, random weights."""
    import importlib

    # diffusers itself is imported by test_layouts (behind its guard); the pipeline's VQGAN lives in a submodule
    paella_vq = importlib.import_module("diffusers.pipelines.deprecated.wuerstchen.modeling_paella_vq_model")
    torch.manual_seed(7)
    model = _jitter(paella_vq.PaellaVQModel(), 7)
    bn = model.down_blocks[-1][1]
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    assert isinstance(model, diffusers.ModelMixin)
    return model, {k: v.clone() for k, v in model.state_dict().items()}


def release_layout(diffusers_sd):
    """The Stable Cascade release's (and ComfyUI's) keys: only the codebook's name differs."""
    return {
        ("vquantizer.codebook.weight" if k == "vquantizer.embedding.weight" else k): v for k, v in diffusers_sd.items()
    }


def test_both_layouts_encode_decode_and_quantize_like_diffusers(paella, tmp_path):
    model, sd = paella
    images = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want_latents = model.encode(images).latents
        want_images = model.decode(want_latents).sample
        want_quantized = model.vquantizer(want_latents)[0]
    for name, tensors in (("diffusers.safetensors", sd), ("stage_a.safetensors", release_layout(sd))):
        save_file(tensors, tmp_path / name)
        weights = open_vae_file(tmp_path / name)
        assert weights.family == STAGE_A and weights.detected.parts == "encoder + decoder"
        assert weights.detected.latent_channels == 4
        ours = build_autoencoder(weights.family, weights.tensors).eval()
        with torch.no_grad():
            latents = ours.encode(images)
            assert latents.shape == (2, 4, 16, 24)
            torch.testing.assert_close(latents, want_latents, rtol=0, atol=1e-5)
            torch.testing.assert_close(ours.decode(latents), want_images, rtol=0, atol=1e-5)
            torch.testing.assert_close(ours.quantize(latents), want_quantized, rtol=0, atol=1e-6)
    assert set(layouts.stage_a_to_diffusers(weights.tensors)) == set(sd)


def test_config_is_read_from_the_tensors(paella):
    _, sd = paella
    full = config_from_state_dict(release_layout(sd))
    assert (full.c_hidden, full.levels, full.bottleneck_blocks, full.latent_channels, full.codebook_size) == (
        384,
        2,
        12,
        4,
        8192,
    )
    decoder_only = {k: v for k, v in release_layout(sd).items() if k.startswith(("up_blocks.", "out_block."))}
    assert config_from_state_dict(decoder_only) == full
    small = StageAAutoencoder(
        type(full)(c_hidden=128, levels=3, bottleneck_blocks=2, latent_channels=8, codebook_size=16)
    )
    assert config_from_state_dict(small.state_dict()) == small.config


def stage_b_checkpoint(path, stage_a_sd, poison_unet: bool):
    """A file laid out like a stage-B checkpoint: ``model.diffusion_model.*`` (here a few large stand-in tensors,
    not a real U-Net) next to stage A under ``vae.``. With ``poison_unet`` the U-Net bytes are overwritten with NaN
    patterns after writing, which a loader reading only the stage A part never sees."""
    unet = {
        "model.diffusion_model.clf.1.weight": torch.ones(64, 1280, 1, 1),
        "model.diffusion_model.down_blocks.0.0.depthwise.weight": torch.ones(4096, 4096),
    }
    save_file({**unet, **{f"vae.{k}": v for k, v in stage_a_sd.items()}}, path)
    if poison_unet:
        raw = bytearray(path.read_bytes())
        (size,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + size])
        for key in unet:
            start, end = header[key]["data_offsets"]
            raw[8 + size + start : 8 + size + end] = b"\xff" * (end - start)
        path.write_bytes(bytes(raw))


def test_stage_a_is_read_from_a_stage_b_checkpoint_without_touching_the_unet(paella, tmp_path):
    _, sd = paella
    release = release_layout(sd)
    save_file(release, tmp_path / "stage_a.safetensors")
    stage_b_checkpoint(tmp_path / "stage_b.safetensors", release, poison_unet=True)
    alone = open_vae_file(tmp_path / "stage_a.safetensors")
    inside = open_vae_file(tmp_path / "stage_b.safetensors")
    assert inside.detected.wrapper == "vae." and inside.family == STAGE_A
    assert set(inside.tensors) == set(alone.tensors)
    assert all(torch.equal(inside.tensors[k], alone.tensors[k]) for k in alone.tensors)


def test_truncated_wrong_and_partial_files_get_clear_messages(paella, tmp_path):
    _, sd = paella
    release = release_layout(sd)
    save_file(release, tmp_path / "stage_a.safetensors")
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "stage_a.safetensors").read_bytes()[:4096])
    with pytest.raises(VaeFileError, match="cut.safetensors: not a readable safetensors file.*Download it again"):
        open_vae_file(tmp_path / "cut.safetensors")
    no_block = {k: v for k, v in release.items() if not k.startswith("up_blocks.5.")}
    with pytest.raises(
        VaeFileError, match=r"partial: original Stable Cascade stage A .*missing 7 tensors \(up_blocks.5.channelwise"
    ):
        weights_from_state_dict(no_block, "partial")
    wrong = dict(release, **{"out_block.0.weight": torch.zeros(12, 96, 1, 1)})
    with pytest.raises(
        VaeFileError, match=r"wrong: .*out_block.0.weight is \(12, 96, 1, 1\), expected \(12, 192, 1, 1\)"
    ):
        weights_from_state_dict(wrong, "wrong")
    stage_b = {
        "clf.1.weight": torch.zeros(4),
        "clip_mapper.weight": torch.zeros(4),
        "up_blocks.0.0.gammas": torch.zeros(6),
    }
    with pytest.raises(VaeFileError, match="unet.safetensors: this is a Stable Cascade stage B or C diffusion model"):
        weights_from_state_dict(stage_b, "unet.safetensors")
    prefixed = {f"model.diffusion_model.{k}": v for k, v in stage_b.items()}
    with pytest.raises(VaeFileError, match="ckpt.safetensors: this is a Stable Cascade stage B or C.*vae. part"):
        weights_from_state_dict(prefixed, "ckpt.safetensors")


def test_release_files_without_batchnorm_counters_still_load(paella):
    _, sd = paella
    trimmed = {k: v for k, v in release_layout(sd).items() if not k.endswith("num_batches_tracked")}
    weights = weights_from_state_dict(trimmed, "trimmed")
    assert any(k.endswith("num_batches_tracked") for k in weights.tensors)
    build_autoencoder(STAGE_A, weights.tensors)


def test_a_decoder_only_finetune_pairs_only_with_a_stage_a_base(paella):
    _, sd = paella
    release = release_layout(sd)
    decoder = weights_from_state_dict({k: v for k, v in release.items() if layouts.is_decoder_key(STAGE_A, k)}, "dec")
    assert decoder.detected.parts == "decoder only"
    with pytest.raises(VaeFileError, match="dec: this file holds only a decoder .*stage A.*Connect a base_vae"):
        pair_with_base(decoder, None)
    base = weights_from_state_dict(release, "stage_a.safetensors")
    pairing = pair_with_base(decoder, base)
    assert set(pairing.merged_tensors) == set(release)
    kl_like = weights_from_state_dict(_kl_full(), "sd_vae")  # also 4 latent channels
    with pytest.raises(VaeFileError, match="a stage A decoder pairs only with a stage A encoder"):
        pair_with_base(decoder, kl_like)


def _kl_full():
    from training.klf8 import KlAutoencoder

    with torch.device("meta"):
        sd = KlAutoencoder().state_dict()
    return {k: torch.zeros(v.shape) for k, v in sd.items()}
