"""Host tier, run by ComfyUI's own Python (see tests/test_stable_cascade_host.py): VAE Lab's Stable Cascade nodes
against core's own nodes inside the real ComfyUI code, on the random-weight files of cascade_files.py.

    python stable_cascade_equality.py <comfyui dir> <scratch dir> <stage-B checkpoint> <stage_a> <effnet>

Prints one JSON line (prefixed RESULT): max-abs differences of each comparison, and the refusals' messages.
"""

from __future__ import annotations

import json
import os
import sys

COMFY, SCRATCH, CHECKPOINT, STAGE_A, EFFNET = sys.argv[1:6]
from host_boot import boot

boot(COMFY)
import folder_paths
import torch
from comfy_extras import nodes_stable_cascade as core_sc
from vae_lab.nodes.host import register_model_folders
from vae_lab.nodes.load_vae_decoder import LoadVAEDecoder
from vae_lab.nodes.stable_cascade import (
    LoadStageA,
    StableCascadeDecode,
    stage_a_choices,
)

import nodes

register_model_folders()
for kind, path in (("checkpoints", CHECKPOINT), ("vae", STAGE_A), ("vae", EFFNET)):
    folder = os.path.join(SCRATCH, kind)
    os.makedirs(folder, exist_ok=True)
    folder_paths.add_model_folder_path(kind, folder, is_default=True)
    link = os.path.join(folder, os.path.basename(path))
    if not os.path.exists(link):
        os.symlink(path, link)
ckpt_name = os.path.basename(CHECKPOINT)
# a decoder-only stage A finetune (here: the decoder half of the same file) in vae_decoders
from safetensors.torch import load_file, save_file

os.makedirs(os.path.join(SCRATCH, "vae_decoders"), exist_ok=True)
folder_paths.add_model_folder_path("vae_decoders", os.path.join(SCRATCH, "vae_decoders"), is_default=True)
save_file(
    {k: v for k, v in load_file(STAGE_A).items() if k.startswith(("up_blocks.", "out_block."))},
    os.path.join(SCRATCH, "vae_decoders", "stage_a_decoder.safetensors"),
)
results, refusals = {}, {}


def diff(a, b) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a.float() - b.float()).abs().max())


def refusal(name, fn):
    try:
        fn()
    except Exception as exc:  # noqa: BLE001  (the message is what is tested)
        refusals[name] = f"{type(exc).__name__}: {exc}"
    else:
        refusals[name] = "(no error)"


model, _clip, ckpt_vae = nodes.CheckpointLoaderSimple().load_checkpoint(ckpt_name)[:3]
core_vae = nodes.VAELoader().load_vae(os.path.basename(STAGE_A))[0]
effnet = nodes.VAELoader().load_vae(os.path.basename(EFFNET))[0]
choices = list(stage_a_choices())
ours_file = LoadStageA.execute(f"vae/{os.path.basename(STAGE_A)}").result[0]
ours_ckpt_output = LoadStageA.execute(f"checkpoints/{ckpt_name}")
ours_ckpt = ours_ckpt_output.result[0]

# stage A: our VAE from either source decodes and encodes like core's from the same file
torch.manual_seed(0)
b_latent = torch.randn(1, 4, 32, 48)
image = torch.rand(1, 128, 192, 3)
reference = core_vae.decode(b_latent)
ours_decoder_only = LoadStageA.execute("vae_decoders/stage_a_decoder.safetensors", base_vae=core_vae).result[0]
for name, vae in (
    ("ours from stage_a file", ours_file),
    ("ours from stage-B checkpoint", ours_ckpt),
    ("core checkpoint vae", ckpt_vae),
    ("ours decoder-only + base_vae", ours_decoder_only),
):
    results[name] = {
        "decode": diff(vae.decode(b_latent), reference),
        "encode": diff(vae.encode(image), core_vae.encode(image)),
        "type": type(vae.first_stage_model).__name__,
    }

# Stable Cascade Decode vs core's chain, same seed: StageB_Conditioning -> KSampler -> VAEDecode
zero = [[torch.zeros(1, 1, 1280), {"pooled_output": torch.zeros(1, 1280)}]]
stage_c = {"samples": torch.randn(1, 16, 6, 6)}
settings = {"seed": 5, "steps": 2, "cfg": 1.1, "sampler_name": "euler_ancestral", "scheduler": "karras"}


def core_chain(c_latent, b_empty):
    positive = core_sc.StableCascade_StageB_Conditioning.execute(zero, c_latent).result[0]
    negative = nodes.ConditioningZeroOut().zero_out(zero)[0]
    sampled = nodes.KSampler().sample(
        model,
        settings["seed"],
        settings["steps"],
        settings["cfg"],
        settings["sampler_name"],
        settings["scheduler"],
        positive,
        negative,
        b_empty,
    )[0]
    return nodes.VAEDecode().decode(ckpt_vae, sampled)[0]


empty_c, empty_b = core_sc.StableCascade_EmptyLatentImage.execute(256, 256, 42, 1).result
want = core_chain(stage_c, empty_b)
got = StableCascadeDecode.execute(
    model, ours_ckpt, "stage_c latent", compression=42, width=256, height=256, stage_c=stage_c, **settings
).result[0]
auto = StableCascadeDecode.execute(
    model, ours_ckpt, "stage_c latent", compression=42, width=0, height=0, stage_c=stage_c, **settings
).result[0]
results["decode vs core chain"] = {
    "image": diff(got, want),
    "auto_size_image": diff(auto, want),
    "shape": list(got.shape),
    "finite": bool(torch.isfinite(got).all()),
    "spread": float(got.std()),
}

# reconstruct: image -> effnet -> stage B -> stage A, vs core's StageC_VAEEncode + the chain
picture = torch.rand(1, 256, 320, 3)
c_enc, b_enc = core_sc.StableCascade_StageC_VAEEncode.execute(picture, effnet, 42).result
want_rec = core_chain(c_enc, b_enc)
rec = StableCascadeDecode.execute(
    model, ours_ckpt, "image (reconstruct)", compression=42, width=0, height=0, image=picture, effnet=effnet, **settings
).result
results["reconstruct vs core chain"] = {
    "image": diff(rec[0], want_rec),
    "stage_c": diff(rec[1]["samples"], c_enc["samples"]),
    "finite": bool(torch.isfinite(rec[0]).all()),
    "shape": list(rec[0].shape),
}

refusal(
    "stage A in Load VAE Decoder",
    lambda: LoadVAEDecoder.execute(vae_name="stage_a.safetensors", encoder="from this file", base_file="(none)"),
)
refusal("decoder-only stage A without base", lambda: LoadStageA.execute("vae_decoders/stage_a_decoder.safetensors"))
refusal(
    "reconstruct without effnet",
    lambda: StableCascadeDecode.execute(
        model, ours_ckpt, "image (reconstruct)", compression=42, width=0, height=0, image=picture, **settings
    ),
)
refusal(
    "latent mode without stage_c",
    lambda: StableCascadeDecode.execute(
        model, ours_ckpt, "stage_c latent", compression=42, width=0, height=0, **settings
    ),
)
refusal(
    "effnet as the stage A vae",
    lambda: StableCascadeDecode.execute(
        model, effnet, "stage_c latent", compression=42, width=0, height=0, stage_c=stage_c, **settings
    ),
)
refusal(
    "stage B latent as stage_c",
    lambda: StableCascadeDecode.execute(
        model, ours_ckpt, "stage_c latent", compression=42, width=0, height=0, stage_c={"samples": b_latent}, **settings
    ),
)

print(
    "RESULT "
    + json.dumps({"results": results, "refusals": refusals, "choices": choices, "info": ours_ckpt_output.result[1]})
)
