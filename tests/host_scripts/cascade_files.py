"""Host tier, run by ComfyUI's own Python: random-weight Stable Cascade files in the real layouts, made once
per machine (no real weights can be downloaded here). Keys come from ComfyUI's own classes, so the host
detects and loads them as it would the releases. The folder is named by a hash of those classes' layout (every key,
shape and dtype), so releases whose classes agree share one set of files (made once, ~90 s) and a release whose
layout differs gets its own.

    python cascade_files.py <comfyui dir> <cache dir>

Writes into <cache dir> (skipping files already there) and prints their paths as one JSON line:
- stable_cascade_stage_b.safetensors: a stage-B-lite U-Net (``model.diffusion_model.``, bf16, 700 M params)
  with a stage A as its ``vae.`` part, like ComfyUI's packaged stage-B checkpoints;
- stage_a.safetensors: the same stage A on its own (fp32), like the release's file;
- effnet_encoder.safetensors: the stage-C EfficientNet encoder.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

COMFY, CACHE = sys.argv[1], sys.argv[2]
sys.path.insert(0, COMFY)
VERSION = "v2"  # bump when the recipe below changes

import torch
from safetensors.torch import save_file


def random_like(shapes: dict, seed: int, dtype=torch.float32, std: float = 0.02) -> dict:
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for key, (shape, kind) in sorted(shapes.items()):
        if not kind.is_floating_point:
            out[key] = torch.zeros(shape, dtype=kind)
        elif key.endswith(("running_var", "std")):
            out[key] = torch.rand(shape, generator=generator) + 0.5
        else:
            out[key] = (torch.randn(shape, generator=generator) * std).to(dtype)
    return out


def shapes_of(module: torch.nn.Module) -> dict:
    return {k: (tuple(v.shape), v.dtype) for k, v in module.state_dict().items()}


def atomic_save(tensors: dict, path: str, metadata: dict) -> None:
    temporary = path + ".tmp"
    save_file({k: v.contiguous() for k, v in tensors.items()}, temporary, metadata=metadata)
    os.replace(temporary, path)


def main() -> None:
    from comfy.cli_args import args

    args.cpu = True
    import comfy.ops
    from comfy.ldm.cascade.stage_a import StageA
    from comfy.ldm.cascade.stage_b import StageB
    from comfy.ldm.cascade.stage_c_coder import EfficientNetEncoder

    stage_a_shapes = shapes_of(StageA())
    with torch.device("meta"):  # stage B lite, as model_detection recognises it (channelwise width 576)
        unet = StageB(
            c_hidden=[320, 576, 1152, 1152],
            nhead=[-1, 9, 18, 18],
            blocks=[[2, 4, 14, 4], [4, 14, 4, 2]],
            block_repeat=[[1, 1, 1, 1], [2, 2, 2, 2]],
            operations=comfy.ops.disable_weight_init,
        )
    torch.manual_seed(3)
    effnet = EfficientNetEncoder()  # torchvision's own initialisation: a working (untrained) encoder ...
    with torch.no_grad():  # ... except the mapper, a ComfyUI op left uninitialised (torch.empty)
        effnet.mapper[0].weight.normal_(0, 0.02)
    layout = json.dumps(
        [
            sorted((k, list(shape), str(kind)) for k, (shape, kind) in m.items())
            for m in (stage_a_shapes, shapes_of(unet), shapes_of(effnet))
        ]
    )
    folder = os.path.join(CACHE, f"stable_cascade_random_{VERSION}_{hashlib.sha1(layout.encode()).hexdigest()[:12]}")
    os.makedirs(folder, exist_ok=True)
    paths = {
        name: os.path.join(folder, name)
        for name in ("stable_cascade_stage_b.safetensors", "stage_a.safetensors", "effnet_encoder.safetensors")
    }
    note = {"modelspec.title": "random weights in the Stable Cascade layout (VAE Lab tests)"}
    stage_a = random_like(stage_a_shapes, 1)
    stage_a = {k: (v if not k.endswith(".gammas") else torch.full_like(v, 0.1)) for k, v in stage_a.items()}
    if not os.path.exists(paths["stage_a.safetensors"]):
        atomic_save(stage_a, paths["stage_a.safetensors"], note)
    if not os.path.exists(paths["stable_cascade_stage_b.safetensors"]):
        weights = {f"model.diffusion_model.{k}": v for k, v in random_like(shapes_of(unet), 2, torch.bfloat16).items()}
        weights.update({f"vae.{k}": v for k, v in stage_a.items()})
        atomic_save(weights, paths["stable_cascade_stage_b.safetensors"], note)
    if not os.path.exists(paths["effnet_encoder.safetensors"]):
        atomic_save(
            {k: v.detach().clone() for k, v in effnet.state_dict().items()}, paths["effnet_encoder.safetensors"], note
        )
    print(json.dumps(paths))


if __name__ == "__main__":
    main()
