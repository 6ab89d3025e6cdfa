"""Host tier, run by ComfyUI's own Python (see tests/test_loaders_host.py): VAE Lab's loaders against
core VAELoader inside the real ComfyUI code, on full-size random weights written in the real layouts.

Prints one JSON object: for every case, the largest absolute difference between our VAE and the
reference in core VAEDecode, VAEEncode and VAEDecodeTiled; and the messages of the refusals.
Usage: python loader_equality.py <comfyui dir> <scratch dir>
"""

from __future__ import annotations

import json
import os
import sys

COMFY, SCRATCH = sys.argv[1], sys.argv[2]
from host_boot import PACK, boot

boot(COMFY)
import folder_paths
import torch
from safetensors.torch import save_file
from vae_lab.nodes.load_tiny_autoencoder import LoadTinyAutoencoder
from vae_lab.nodes.load_vae_decoder import LoadVAEDecoder
from vae_lab.training import key_maps, klf8, taesd

import nodes

for folder in ("vae", "vae_approx"):
    os.makedirs(os.path.join(SCRATCH, folder), exist_ok=True)
    folder_paths.add_model_folder_path(folder, os.path.join(SCRATCH, folder), is_default=True)


def jittered(model, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.02)
    return model.eval()


def save(folder, name, tensors, metadata=None):
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(SCRATCH, folder, name), metadata=metadata)


torch.manual_seed(0)
kl4 = jittered(klf8.KlAutoencoder(klf8.KlConfig()), 1).state_dict()
kl16 = jittered(klf8.KlAutoencoder(klf8.KlConfig(z_channels=16, quant_convs=False)), 2).state_dict()
tiny4 = jittered(taesd.TinyAutoencoder(4), 3).state_dict()
save("vae", "kl4_ldm.safetensors", kl4, {"modelspec.license": "CC BY-NC-SA 4.0", "version": "1.0"})
save("vae", "kl4_diffusers.safetensors", {k: v.half() for k, v in key_maps.diffusers_from_ldm(kl4).items()})
save("vae", "kl16_ldm.safetensors", {k: v.to(torch.bfloat16) for k, v in kl16.items()})
save("vae", "kl4_decoder_only.safetensors", {k: v for k, v in kl4.items() if k.startswith("decoder.")})
save("vae_approx", "misplaced_kl_decoder.safetensors", {k: v for k, v in kl4.items() if k.startswith("decoder.")})
torch.save(
    {"state_dict": {"first_stage_model." + k: v for k, v in kl4.items()}},
    os.path.join(SCRATCH, "vae", "whole_checkpoint.ckpt"),
)
save(
    "vae_approx",
    "taesd_encoder.safetensors",
    {k[len("encoder.") :]: v for k, v in tiny4.items() if k.startswith("encoder.")},
)
save(
    "vae_approx",
    "taesd_decoder.safetensors",
    {k[len("decoder.") :]: v for k, v in tiny4.items() if k.startswith("decoder.")},
)
save(
    "vae_approx",
    "tiny4lone_decoder.safetensors",
    {k[len("decoder.") :]: v for k, v in tiny4.items() if k.startswith("decoder.")},
)
save("vae", "taesd_combined.safetensors", key_maps.comfy_from_tiny(tiny4, 0.18215, 0.0))
save("vae_approx", "taesd_diffusers.safetensors", key_maps.diffusers_from_tiny(tiny4))
kl_f4 = jittered(klf8.KlAutoencoder(klf8.KlConfig(ch_mult=(1, 2, 4))), 4).state_dict()
save("vae", "x4_upscaler_vae.safetensors", kl_f4)

core_loader = nodes.VAELoader()
results, refusals = {}, {}


def core(name):
    return core_loader.load_vae(name)[0]


def decode(vae, z):
    return nodes.VAEDecode().decode(vae, {"samples": z})[0]


def encode(vae, pixels):
    return nodes.VAEEncode().encode(vae, pixels)[0]["samples"]


def decode_tiled(vae, z):
    return nodes.VAEDecodeTiled().decode(vae, {"samples": z}, tile_size=64, overlap=32)[0]


def compare(case, ours, reference, channels, encode_too=True):
    z = torch.randn(1, channels, 16, 16, generator=torch.Generator().manual_seed(7))
    pixels = torch.rand(1, 96, 96, 3, generator=torch.Generator().manual_seed(8))
    row = {
        "decode": (decode(ours, z) - decode(reference, z)).abs().max().item(),
        "decode_tiled": (decode_tiled(ours, z) - decode_tiled(reference, z)).abs().max().item(),
        "type": type(ours.first_stage_model).__name__,
    }
    if encode_too:
        row["encode"] = (encode(ours, pixels) - encode(reference, pixels)).abs().max().item()
    results[case] = row


def refused(case, fn):
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the message is what is checked
        refusals[case] = f"{type(exc).__name__}: {exc}"
    else:
        refusals[case] = None


def ours_kl(name, **kw):
    return LoadVAEDecoder.execute(
        vae_name=name, encoder=kw.pop("encoder", "from this file"), base_file=kw.pop("base_file", "(none)"), **kw
    )


def ours_tiny(name, **kw):
    return LoadTinyAutoencoder.execute(
        name=name, latent_space=kw.pop("latent_space", "auto"), encoder=kw.pop("encoder", "from this file"), **kw
    )


with torch.inference_mode():
    out = ours_kl("kl4_ldm.safetensors")
    info = out.result[1]
    compare("kl4 LDM", out.result[0], core("kl4_ldm.safetensors"), 4)
    compare("kl4 diffusers fp16", ours_kl("kl4_diffusers.safetensors").result[0], core("kl4_diffusers.safetensors"), 4)
    compare("kl16 LDM bf16", ours_kl("kl16_ldm.safetensors").result[0], core("kl16_ldm.safetensors"), 16)
    compare("kl4 whole checkpoint .ckpt", ours_kl("whole_checkpoint.ckpt").result[0], core("kl4_ldm.safetensors"), 4)
    compare(
        "kl4 decoder-only + base_file",
        ours_kl("kl4_decoder_only.safetensors", base_file="kl4_ldm.safetensors").result[0],
        core("kl4_ldm.safetensors"),
        4,
    )
    compare(
        "kl4 decoder-only + base_vae",
        ours_kl("kl4_decoder_only.safetensors", base_vae=core("kl4_ldm.safetensors")).result[0],
        core("kl4_ldm.safetensors"),
        4,
    )
    compare("taesd pair", ours_tiny("taesd").result[0], core("taesd"), 4)
    compare(
        "taesd combined file", ours_tiny("taesd_combined.safetensors").result[0], core("taesd_combined.safetensors"), 4
    )
    compare("taesd diffusers AutoencoderTiny", ours_tiny("taesd_diffusers.safetensors").result[0], core("taesd"), 4)
    compare(
        "x4 upscaler kl-f4", ours_kl("x4_upscaler_vae.safetensors").result[0], core("x4_upscaler_vae.safetensors"), 4
    )

    # hybrid: the kl4 encoder with a lone TAESD decoder; reference: core taesd for decoding, core kl4 for encoding
    hybrid = ours_tiny(
        "tiny4lone_decoder.safetensors", latent_space="SD 1.x/2.x (taesd)", base_vae=core("kl4_ldm.safetensors")
    ).result[0]
    compare("hybrid decode (vs core taesd)", hybrid, core("taesd"), 4, encode_too=False)
    pixels = torch.rand(1, 96, 96, 3, generator=torch.Generator().manual_seed(8))
    results["hybrid encode (vs core kl4)"] = {
        "encode": (encode(hybrid, pixels) - encode(core("kl4_ldm.safetensors"), pixels)).abs().max().item()
    }

    # hybrid the other way: a kl decoder (VAE Lab's kl module) on the TAESD encoder
    kl_on_tiny = ours_kl("kl4_ldm.safetensors", encoder="from base", base_vae=core("taesd")).result[0]
    compare("hybrid kl decoder (vs core kl4)", kl_on_tiny, core("kl4_ldm.safetensors"), 4, encode_too=False)
    results["hybrid kl decoder encode (vs core taesd)"] = {
        "encode": (encode(kl_on_tiny, pixels) - encode(core("taesd"), pixels)).abs().max().item()
    }

    # TAEF2: no core reference can load it; the reference is madebyollin's math in training.taesd
    taef2_out = ours_tiny("taef2 (bundled)")
    taef2 = taef2_out.result[0]
    module = taesd.load_tiny_autoencoder(
        os.path.join(PACK, "assets", "taef2", "taef2_encoder.pth"),
        os.path.join(PACK, "assets", "taef2", "taef2_decoder.pth"),
    ).eval()
    z = torch.randn(1, 32, 16, 16, generator=torch.Generator().manual_seed(7))
    pixels = torch.rand(1, 96, 96, 3, generator=torch.Generator().manual_seed(8))
    results["taef2 bundled (vs training.taesd)"] = {
        "decode": (decode(taef2, z) - module.decode(z).clamp(0, 1).movedim(1, -1)).abs().max().item(),
        "encode": (encode(taef2, pixels) - module.encode(pixels.movedim(-1, 1))).abs().max().item(),
        "decode_tiled_runs": list(decode_tiled(taef2, z).shape),
        "type": type(taef2.first_stage_model).__name__,
    }
    # what core VAELoader makes of a TAEF2 VAE written by core VAESave: refused as invalid, never mis-loaded
    save("vae", "taef2_vaesave.safetensors", taef2.get_sd())
    refused("core VAELoader on saved taef2", lambda: core("taef2_vaesave.safetensors"))
    reloaded = ours_tiny("taef2_vaesave.safetensors").result[0]
    results["taef2 saved by VAESave, reloaded by us"] = {
        "decode": (decode(reloaded, z) - decode(taef2, z)).abs().max().item()
    }

    refused("decoder-only without base", lambda: ours_kl("kl4_decoder_only.safetensors"))
    refused("tiny file in Load VAE Decoder", lambda: ours_kl("taesd_combined.safetensors"))
    refused("kl file in Load Tiny Autoencoder", lambda: ours_tiny("misplaced_kl_decoder.safetensors"))
    refused(
        "16ch base for 4ch decoder", lambda: ours_kl("kl4_decoder_only.safetensors", base_file="kl16_ldm.safetensors")
    )
    refused(
        "both bases", lambda: ours_kl("kl4_decoder_only.safetensors", base_file="kl4_ldm.safetensors", base_vae=taef2)
    )

print(
    "RESULT "
    + json.dumps(
        {
            "results": results,
            "refusals": refusals,
            "info": info,
            "taef2_info": taef2_out.result[1],
            "tiny_choices": LoadTinyAutoencoder.define_schema().inputs[0].options,
        }
    )
)
