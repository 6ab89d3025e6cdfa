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


CHECKS = {"oklab_loss_palette": check_oklab_loss_palette}


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: os.path.basename(p))
def test_example_workflow_runs_and_gives_the_right_numbers(server, object_info, path):
    name = os.path.splitext(os.path.basename(path))[0]
    assert name in CHECKS, f"{name}: every example workflow needs an independent check in CHECKS"
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
