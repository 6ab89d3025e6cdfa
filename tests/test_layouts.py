"""The key mapper and family detector against diffusers (the independent implementation of both the
kl-f8 AutoencoderKL and the TAESD AutoencoderTiny), on full-size random weights in the real layouts."""

from __future__ import annotations

import sys

import pytest
import torch
from safetensors.torch import save_file

from training import key_maps
from training.klf8 import KlAutoencoder
from training.layouts import KL, TINY
from training.taesd import TinyAutoencoder
from training.vae_files import (
    VaeFileError,
    describe_weights,
    open_vae_file,
    pair_with_base,
    weights_from_state_dict,
)


def _import_diffusers():
    """diffusers (a test requirement: the independent implementation). colour-science leaves a placeholder
    ``matplotlib`` module without a spec when matplotlib is absent, and diffusers' optional-dependency probe
    (``importlib.util.find_spec``) fails on it: hide the placeholder while diffusers imports."""
    placeholder = sys.modules.get("matplotlib")
    if placeholder is not None and getattr(placeholder, "__spec__", None) is None:
        del sys.modules["matplotlib"]
    try:
        import diffusers
    finally:
        if placeholder is not None:
            sys.modules["matplotlib"] = placeholder
    return diffusers


diffusers = _import_diffusers()


def _jitter(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random init leaves norms at 1/0; perturb every tensor so a swapped key cannot hide."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.02)
    return model.eval()


def diffusers_kl(latent_channels: int, quant_convs: bool, seed: int = 0):
    torch.manual_seed(seed)
    model = diffusers.AutoencoderKL(
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[128, 256, 512, 512],
        layers_per_block=2,
        latent_channels=latent_channels,
        use_quant_conv=quant_convs,
        use_post_quant_conv=quant_convs,
    )
    return _jitter(model, seed)


@pytest.fixture(scope="module", params=[(4, True), (16, False)], ids=["sd-sdxl-4ch", "sd3-flux-16ch"])
def kl_pair(request):
    """(diffusers model, its state dict): full-size kl-f8, 83.7 M parameters."""
    model = diffusers_kl(*request.param)
    return model, {k: v.clone() for k, v in model.state_dict().items()}


def test_kl_layouts_round_trip_exactly(kl_pair):
    _, diffusers_sd = kl_pair
    ldm = key_maps.ldm_from_diffusers(diffusers_sd)
    assert len(ldm) == len(diffusers_sd)
    assert "decoder.up.3.upsample.conv.weight" in ldm and "decoder.up.0.block.2.conv2.weight" in ldm
    assert ldm["decoder.mid.attn_1.q.weight"].ndim == 4
    back = key_maps.diffusers_from_ldm(ldm)
    assert set(back) == set(diffusers_sd)
    assert all(torch.equal(back[k], diffusers_sd[k]) for k in diffusers_sd)
    again = key_maps.ldm_from_diffusers(back)
    assert all(torch.equal(again[k], ldm[k]) for k in ldm)


def test_diffusers_and_ldm_files_of_the_same_weights_decode_like_diffusers(kl_pair, tmp_path):
    model, diffusers_sd = kl_pair
    ldm = key_maps.ldm_from_diffusers(diffusers_sd)
    save_file({k: v.contiguous() for k, v in diffusers_sd.items()}, tmp_path / "diffusion_pytorch_model.safetensors")
    save_file({k: v.contiguous() for k, v in ldm.items()}, tmp_path / "ldm.safetensors")
    from_diffusers = open_vae_file(tmp_path / "diffusion_pytorch_model.safetensors")
    from_ldm = open_vae_file(tmp_path / "ldm.safetensors")
    assert (from_diffusers.detected.layout, from_ldm.detected.layout) == ("diffusers", "LDM")
    assert from_diffusers.family == from_ldm.family == KL
    latents = torch.randn(2, model.config.latent_channels, 8, 8, generator=torch.Generator().manual_seed(1))
    pixels = torch.rand(1, 3, 48, 48, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = (model.decode(latents).sample + 1) / 2
        reference_latents = model.encode(pixels * 2 - 1).latent_dist.mean
        for weights in (from_diffusers, from_ldm):
            ours = KlAutoencoder.from_state_dict(weights.tensors).eval()
            torch.testing.assert_close(ours.decode(latents), reference, atol=2e-5, rtol=0)
            torch.testing.assert_close(ours.encode(pixels), reference_latents, atol=2e-5, rtol=0)


def test_legacy_diffusers_attention_names_map_too(kl_pair):
    _, diffusers_sd = kl_pair
    legacy = {
        k.replace("to_q.", "query.")
        .replace("to_k.", "key.")
        .replace("to_v.", "value.")
        .replace("to_out.0.", "proj_attn."): v
        for k, v in diffusers_sd.items()
    }
    assert set(key_maps.ldm_from_diffusers(legacy)) == set(key_maps.ldm_from_diffusers(diffusers_sd))


def test_whole_checkpoints_nested_and_prefixed_files_yield_the_vae(kl_pair, tmp_path):
    _, diffusers_sd = kl_pair
    ldm = key_maps.ldm_from_diffusers(diffusers_sd)
    checkpoint = {"first_stage_model." + k: v.half() for k, v in ldm.items()}
    checkpoint["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(320, 4, 3, 3)
    checkpoint["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    torch.save({"state_dict": checkpoint, "global_step": 840000}, tmp_path / "sd15_checkpoint.ckpt")
    found = open_vae_file(tmp_path / "sd15_checkpoint.ckpt")
    assert found.detected.wrapper == "first_stage_model." and found.dtype == "fp16"
    assert set(found.tensors) == set(ldm)
    save_file(
        {"vae." + k: v.to(torch.bfloat16).contiguous() for k, v in diffusers_sd.items()},
        tmp_path / "prefixed.safetensors",
    )
    found = open_vae_file(tmp_path / "prefixed.safetensors")
    assert found.detected.wrapper == "vae." and found.detected.layout == "diffusers" and found.dtype == "bf16"


def test_ldm_training_checkpoints_drop_loss_and_ema_copies(kl_pair):
    _, diffusers_sd = kl_pair
    ldm = key_maps.ldm_from_diffusers(diffusers_sd)
    noisy = {**ldm, "loss.logvar": torch.zeros(()), "loss.discriminator.main.0.weight": torch.zeros(64, 3, 4, 4)}
    found = weights_from_state_dict(noisy, "vae-ft-mse-840000.ckpt")
    assert set(found.tensors) == set(ldm)
    assert any("training-only" in note for note in found.detected.notes)


def test_decoder_only_file_needs_and_gets_a_base(kl_pair):
    _, diffusers_sd = kl_pair
    ldm = key_maps.ldm_from_diffusers(diffusers_sd)
    channels = ldm["decoder.conv_in.weight"].shape[1]
    decoder_only = weights_from_state_dict(
        {k: v for k, v in ldm.items() if k.startswith("decoder.")}, "furception_decoder.safetensors"
    )
    assert decoder_only.detected.parts == "decoder only"
    with pytest.raises(VaeFileError, match=r"furception_decoder.safetensors: this file holds only a decoder.*base_vae"):
        pair_with_base(decoder_only, None)
    base = weights_from_state_dict(ldm, "base.safetensors")
    pairing = pair_with_base(decoder_only, base)
    assert set(pairing.merged_tensors) == set(ldm)
    if "post_quant_conv.weight" in ldm:
        assert "post_quant_conv from base.safetensors" in pairing.notes
    other = weights_from_state_dict(
        key_maps.ldm_from_diffusers(diffusers_kl(20 - channels, channels != 4, seed=3).state_dict()),
        "other.safetensors",
    )
    with pytest.raises(
        VaeFileError, match=rf"takes {channels}-channel latents but other.safetensors makes {20 - channels}-channel"
    ):
        pair_with_base(decoder_only, other)


def test_shape_mismatches_are_named_precisely(kl_pair):
    _, diffusers_sd = kl_pair
    ldm = dict(key_maps.ldm_from_diffusers(diffusers_sd))
    ldm["decoder.up.1.block.0.conv1.weight"] = ldm["decoder.up.1.block.0.conv1.weight"][:, :, :1, :1]
    with pytest.raises(
        VaeFileError,
        match=r"broken.safetensors: .*decoder\.up\.1\.block\.0\.conv1\.weight is \(256, 512, 1, 1\), "
        r"expected \(256, 512, 3, 3\)",
    ):
        weights_from_state_dict(ldm, "broken.safetensors")
    del ldm["decoder.up.1.block.0.conv1.weight"]
    with pytest.raises(VaeFileError, match=r"missing 1 tensors \(decoder\.up\.1\.block\.0\.conv1\.weight\)"):
        weights_from_state_dict(ldm, "broken.safetensors")


def test_quantized_and_foreign_files_are_refused_by_name(tmp_path):
    with pytest.raises(VaeFileError, match=r"q.safetensors: holds float8_e4m3fn tensors.*fp32, fp16 or bf16"):
        weights_from_state_dict({"decoder.1.weight": torch.zeros(64, 4, 3, 3).to(torch.float8_e4m3fn)}, "q.safetensors")
    with pytest.raises(
        VaeFileError, match="stage_b.safetensors: this is a Stable Cascade stage B or C diffusion model"
    ):
        weights_from_state_dict(
            {"clf.1.weight": torch.zeros(4), "up_blocks.0.0.weight": torch.zeros(4)}, "stage_b.safetensors"
        )
    with pytest.raises(VaeFileError, match="effnet.safetensors: this is Stable Cascade stage C EfficientNet encoder"):
        weights_from_state_dict({"backbone.1.0.block.0.1.num_batches_tracked": torch.zeros(())}, "effnet.safetensors")
    with pytest.raises(VaeFileError, match="svd.safetensors: this is Stable Video Diffusion"):
        weights_from_state_dict(
            {"decoder.mid.block_1.mix_factor": torch.zeros(1), "decoder.conv_in.weight": torch.zeros(512, 4, 3, 3)},
            "svd.safetensors",
        )
    with pytest.raises(
        VaeFileError, match=r"lora.safetensors: unknown layout.*first keys: lora_unet_a.alpha, lora_unet_b.alpha"
    ):
        weights_from_state_dict(
            {"lora_unet_a.alpha": torch.zeros(()), "lora_unet_b.alpha": torch.zeros(())}, "lora.safetensors"
        )
    with pytest.raises(
        VaeFileError, match=r"odd.safetensors: LDM-layout kl VAE with unrecognised keys: decoder.extra_branch.weight"
    ):
        weights_from_state_dict(
            {"decoder.mid.block_1.norm1.weight": torch.zeros(512), "decoder.extra_branch.weight": torch.zeros(1)},
            "odd.safetensors",
        )
    good = tmp_path / "good.safetensors"
    save_file({"decoder.conv_in.weight": torch.zeros(512, 4, 3, 3)}, good)
    (tmp_path / "cut.safetensors").write_bytes(good.read_bytes()[:200])
    with pytest.raises(VaeFileError, match="cut.safetensors: not a readable safetensors file"):
        open_vae_file(tmp_path / "cut.safetensors")


def test_pickled_code_in_a_vae_checkpoint_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (exec, ("raise SystemExit('pickle code ran')",))

    torch.save(
        {"state_dict": {"decoder.conv_in.weight": torch.zeros(1)}, "callback": Payload()}, tmp_path / "evil.ckpt"
    )
    with pytest.raises(VaeFileError, match="evil.ckpt: refused"):
        open_vae_file(tmp_path / "evil.ckpt")


# ----------------------------------------------------------------------------------------------
# TAESD family


def diffusers_tiny(latent_channels: int = 4):
    torch.manual_seed(5)
    return _jitter(diffusers.AutoencoderTiny(latent_channels=latent_channels), 5)


def test_diffusers_autoencoder_tiny_maps_onto_madebyollin_indices_and_decodes_alike():
    model = diffusers_tiny(4)
    found = weights_from_state_dict(model.state_dict(), "diffusion_pytorch_model.safetensors")
    assert (found.family, found.detected.layout, found.detected.parts) == (
        TINY,
        "diffusers AutoencoderTiny",
        "encoder + decoder",
    )
    assert "decoder.1.weight" in found.tensors and "decoder.0.weight" not in found.tensors
    ours = TinyAutoencoder.from_canonical(found.tensors).eval()
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours.decode(latents) * 2 - 1, model.decoder(latents), atol=1e-5, rtol=0)
        torch.testing.assert_close(ours.encode(pixels), model.encoder(pixels * 2 - 1), atol=1e-5, rtol=0)
    back = key_maps.diffusers_from_tiny(found.tensors)
    assert set(back) == set(model.state_dict())


def test_comfy_combined_taesd_round_trips_with_its_scale(taef2_weights):
    combined = key_maps.comfy_from_tiny(taef2_weights, 0.3611, 0.1159)
    found = weights_from_state_dict(combined, "taef1_vaesave_00001_.safetensors")
    assert found.detected.layout == "ComfyUI combined TAESD"
    assert (found.detected.latent_scale, found.detected.latent_shift) == pytest.approx((0.3611, 0.1159))
    assert all(torch.equal(found.tensors[k], v) for k, v in taef2_weights.items())
    wrapped = weights_from_state_dict(
        {"model." + k: v for k, v in taef2_weights.items()}, "saved_by_vaesave.safetensors"
    )
    assert wrapped.detected.wrapper == "model." and wrapped.detected.midblock_groupnorm


def test_tiny_decoder_with_a_different_latent_space_is_refused(taef2_weights):
    decoder = weights_from_state_dict(
        {k: v for k, v in taef2_weights.items() if k.startswith("decoder.")}, "taef2_decoder.pth"
    )
    sd_base = weights_from_state_dict(diffusers_tiny(4).state_dict(), "taesd.safetensors")
    with pytest.raises(VaeFileError, match="takes 32-channel latents but taesd.safetensors makes 4-channel"):
        pair_with_base(decoder, sd_base)


def test_taesana_layout_is_refused_by_name():
    f32_decoder_start = {"decoder.1.weight": torch.zeros(256, 32, 3, 3), "decoder.1.bias": torch.zeros(256)}
    with pytest.raises(VaeFileError, match="TAESANA"):
        weights_from_state_dict(f32_decoder_start, "taesana_decoder.pth")


def test_description_shows_licence_and_version_first():
    tiny = diffusers_tiny(4).state_dict()
    meta = {"z_notes": "x" * 500, "modelspec.license": "CC BY-NC-SA 4.0", "version": "1.0", "format": "pt"}
    lines = describe_weights(weights_from_state_dict(tiny, "furception.safetensors", meta))
    text = "\n".join(lines)
    assert text.index("license: CC BY-NC-SA 4.0") < text.index("format: pt") and "version: 1.0" in text
    assert max(len(line) for line in lines) < 200  # long values are shortened


@pytest.fixture(scope="module")
def taef2_weights():
    import os

    from training.vae_files import join_files

    root = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "taef2")
    joined = join_files(
        open_vae_file(os.path.join(root, "taef2_decoder.pth")),
        open_vae_file(os.path.join(root, "taef2_encoder.pth")),
        "taef2",
    )
    return joined.tensors
