"""Host tier: the pack inside a real ComfyUI (CPU). Skipped unless COMFYUI_DIR names a ComfyUI checkout."""
from __future__ import annotations

import glob
import json
import os

import colour
import numpy as np
import pytest
from comfy_host import PACK_NAME, ROOT, comfyui_dir, ui_to_api
from PIL import Image
from test_pack import node_schemas

pytestmark = pytest.mark.skipif(comfyui_dir() is None, reason="host tier: set COMFYUI_DIR to a ComfyUI checkout with a venv")

WORKFLOWS = sorted(glob.glob(os.path.join(ROOT, "example_workflows", "*.json")))


@pytest.fixture(scope="module")
def server(comfy_server):
    return comfy_server


@pytest.fixture(scope="module")
def object_info(server):
    return server.get("/object_info")


def test_every_node_loaded_with_a_complete_schema(server, object_info):
    expected = {schema["node_id"] for schema in node_schemas()}
    loaded = {name for name, info in object_info.items() if info["category"].startswith("VAE Lab")}
    assert loaded == expected, f"missing: {expected - loaded}\n{server.log()[-3000:]}"
    for name in loaded:
        info = object_info[name]
        assert info["category"] == "VAE Lab" and info["description"].strip()
        for section in ("required", "optional"):
            for input_name, spec in info["input"].get(section, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{name}.{input_name} has no tooltip"
    failed = [line for line in server.log().splitlines() if "IMPORT FAILED" in line and PACK_NAME in line]
    assert not failed, failed


def test_web_extension_is_served(server):
    body = server.get(f"/extensions/{PACK_NAME}/vae_lab.js")
    assert b"registerExtension" in body


def test_every_example_workflow_is_listed(server):
    listed = server.get("/workflow_templates").get(PACK_NAME, [])
    assert sorted(listed) == sorted(os.path.splitext(os.path.basename(p))[0] for p in WORKFLOWS)


def _example_and_palette_image(base, colors):
    """What LoadImage + ImageQuantize(colors, none) produce, recomputed with Pillow as the core node does."""
    original = np.asarray(Image.open(os.path.join(base, "input", "example.png")).convert("RGB"), dtype=np.float32) / 255.0
    as_bytes = (original * 255).astype(np.uint8)  # torch's float->uint8 truncates, as numpy does
    image = Image.fromarray(as_bytes, mode="RGB")
    quantized = image.quantize(palette=image.quantize(colors=colors), dither=Image.Dither.NONE)
    return original, np.asarray(quantized.convert("RGB"), dtype=np.float32) / 255.0


def check_oklab_loss_palette(entry, prompt, server):
    outputs = entry["outputs"]
    node_id = next(k for k, v in prompt.items() if v["class_type"] == "VAELab_OklabLoss")
    values = outputs[node_id]["vae_lab"][0]
    assert "mean ΔE" in outputs[node_id]["text"][0]
    quantize = next(v for v in prompt.values() if v["class_type"] == "ImageQuantize")["inputs"]
    assert quantize["dither"] == "none"
    original, quantized = _example_and_palette_image(server.base, quantize["colors"])
    lab_q = colour.convert(quantized.astype(np.float64), "sRGB", "Oklab")
    lab_o = colour.convert(original.astype(np.float64), "sRGB", "Oklab")
    d = lab_q - lab_o
    inputs = prompt[node_id]["inputs"]
    mix, scale = inputs["mse_mix"], inputs["mse_scale"]
    w = np.array([inputs["weight_L"], inputs["weight_a"], inputs["weight_b"]])
    per_channel = ((1 - mix) * np.abs(d) + mix * d**2 / scale).reshape(-1, 3).mean(0)
    expected_loss = float((per_channel * w).sum() / w.sum())
    expected_delta_e = float(np.sqrt((d**2).sum(-1)).mean())
    assert values["loss"] == pytest.approx(expected_loss, rel=5e-3)
    assert values["mean_delta_e"] == pytest.approx(expected_delta_e, rel=5e-3)
    assert values["mean_delta_e"] > 0.005  # fewer colours than the image has: visibly off
    heatmaps = [o for o in outputs.values() if o.get("images")]
    assert heatmaps, "the heatmap preview was not written"


def _preview(server, entry, node_id) -> np.ndarray:
    image = entry["outputs"][node_id]["images"][0]
    path = os.path.join(server.base, image["type"], image["subfolder"], image["filename"])
    return np.asarray(Image.open(path).convert("RGB"))


def _node(prompt, class_type) -> str:
    return next(k for k, v in prompt.items() if v["class_type"] == class_type)


def check_load_tiny_autoencoder_taef2(entry, prompt, server):
    """The decoded preview is TAEF2's reconstruction as training.taesd computes it (which matches madebyollin's
    own taesd.py, see test_taesd); the Oklab Loss numbers agree with colour-science on that image."""
    import torch

    from training.taesd import load_tiny_autoencoder

    loader = _node(prompt, "VAELab_LoadTinyAutoencoder")
    values = entry["outputs"][loader]["vae_lab"][0]
    assert values["variant"] == "taef2" and values["midblock_groupnorm"] and values["latent_channels"] == 32
    assert "running VAE Lab's module" in values["built"][-1]
    original = np.asarray(Image.open(os.path.join(server.base, "input", "example.png")).convert("RGB"), dtype=np.float32) / 255
    taef2_dir = os.path.join(ROOT, "assets", "taef2")
    model = load_tiny_autoencoder(os.path.join(taef2_dir, "taef2_encoder.pth"), os.path.join(taef2_dir, "taef2_decoder.pth")).eval()
    with torch.no_grad():
        x = torch.from_numpy(original).permute(2, 0, 1)[None]
        expected = model.decode(model.encode(x)).clamp(0, 1)[0].permute(1, 2, 0).numpy()
    preview = _preview(server, entry, _node(prompt, "PreviewImage"))
    assert np.abs(preview.astype(int) - (expected * 255).astype(int)).max() <= 1
    lab = colour.convert(expected.astype(np.float64), "sRGB", "Oklab") - colour.convert(original.astype(np.float64), "sRGB", "Oklab")
    reported = entry["outputs"][_node(prompt, "VAELab_OklabLoss")]["vae_lab"][0]
    assert reported["mean_delta_e"] == pytest.approx(float(np.sqrt((lab**2).sum(-1)).mean()), rel=1e-2)


def prepare_load_vae_decoder_sdxl(server):
    """A full-size SDXL-layout VAE with random weights under the name the workflow uses (no real weights here)."""
    from safetensors.torch import save_file

    from training.klf8 import KlAutoencoder

    os.makedirs(os.path.join(server.base, "models", "vae"), exist_ok=True)
    path = os.path.join(server.base, "models", "vae", "sdxl_vae.safetensors")
    if not os.path.exists(path):
        import torch

        torch.manual_seed(0)
        weights = {k: v.half().contiguous() for k, v in KlAutoencoder().state_dict().items()}
        save_file(weights, path, metadata={"modelspec.title": "random weights in the SDXL VAE layout"})


def check_load_vae_decoder_sdxl(entry, prompt, server):
    """Our VAE decodes exactly what core VAELoader's VAE decodes from the same file."""
    loader = _node(prompt, "VAELab_LoadVAEDecoder")
    values = entry["outputs"][loader]["vae_lab"][0]
    assert values["latent_channels"] == 4 and values["dtype"] == "fp16" and values["layout"] == "LDM"
    assert "random weights in the SDXL VAE layout" in entry["outputs"][loader]["text"][0]
    core = {**prompt, loader: {"class_type": "VAELoader", "inputs": {"vae_name": prompt[loader]["inputs"]["vae_name"]}}}
    core_entry = server.run_prompt(core)
    preview = _node(prompt, "PreviewImage")
    assert np.array_equal(_preview(server, entry, preview), _preview(server, core_entry, preview))


CHECKS = {
    "oklab_loss_palette": check_oklab_loss_palette,
    "load_tiny_autoencoder_taef2": check_load_tiny_autoencoder_taef2,
    "load_vae_decoder_sdxl": check_load_vae_decoder_sdxl,
}
#: Files a workflow needs that only a user's download can supply; tests put random weights in their place.
PREPARE = {"load_vae_decoder_sdxl": prepare_load_vae_decoder_sdxl}


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: os.path.basename(p))
def test_example_workflow_runs_and_gives_the_right_numbers(server, object_info, path):
    name = os.path.splitext(os.path.basename(path))[0]
    assert name in CHECKS, f"{name}: every example workflow needs an independent check in CHECKS"
    if name in PREPARE:
        PREPARE[name](server)
    with open(path) as f:
        prompt = ui_to_api(json.load(f), object_info)
    entry = server.run_prompt(prompt)
    CHECKS[name](entry, prompt, server)


def test_oklab_loss_names_the_input_and_the_fix_on_a_size_mismatch(server):
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
        "2": {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "bilinear", "width": 96, "height": 64, "crop": "disabled"}},
        "3": {"class_type": "VAELab_OklabLoss", "inputs": {"image": ["2", 0], "reference": ["1", 0], "mse_mix": 0.5, "weight_L": 1.0,
                                                          "weight_a": 2.0, "weight_b": 2.0, "mse_scale": 0.01, "heatmap_max": 0.1}},
    }
    error = server.run_prompt(prompt, expect_error=True)
    assert error["node_type"] == "VAELab_OklabLoss"
    assert "image is 96x64 but reference is 768x768" in error["exception_message"] and "resize or crop" in error["exception_message"]
