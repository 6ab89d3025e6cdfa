"""Host tier: VAE Lab's loaders against core VAELoader inside real ComfyUI code (tests/host_scripts/loader_equality.py,
run by ComfyUI's own Python), on full-size random weights in every layout core can also load."""

from __future__ import annotations

import json

import pytest
from comfy_host import run_host_script


@pytest.fixture(scope="module")
def report(comfy_host, tmp_path_factory):
    result = run_host_script(comfy_host, "loader_equality.py", str(tmp_path_factory.mktemp("models")))
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert result.returncode == 0 and lines, result.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT ") :])


def test_every_layout_decodes_encodes_and_tiles_like_core(report):
    for case, row in report["results"].items():
        for op, value in row.items():
            if isinstance(value, float):
                assert value <= 1e-5, f"{case}: {op} differs from the reference by {value}"
    assert report["results"]["taesd pair"]["type"] == "TAESD"  # the host's own module where it can build one
    assert report["results"]["taef2 bundled (vs training.taesd)"]["type"] == "HostConvention"
    assert report["results"]["hybrid decode (vs core taesd)"]["type"] == "HybridAutoencoder"
    assert report["results"]["taef2 bundled (vs training.taesd)"]["decode_tiled_runs"] == [1, 128, 128, 3]


def test_refusals_name_the_file_and_the_fix(report):
    refusals = report["refusals"]
    assert "VAE is invalid" in refusals["core VAELoader on saved taef2"]  # refused, not silently mis-loaded
    assert "kl4_decoder_only.safetensors: this file holds only a decoder" in refusals["decoder-only without base"]
    assert "Connect a base_vae" in refusals["decoder-only without base"]
    assert "load it with Load Tiny Autoencoder" in refusals["tiny file in Load VAE Decoder"]
    assert "load it with Load VAE Decoder" in refusals["kl file in Load Tiny Autoencoder"]
    assert "4-channel latents but kl16_ldm.safetensors makes 16-channel" in refusals["16ch base for 4ch decoder"]
    assert "both base_file and base_vae" in refusals["both bases"]


def test_node_text_shows_family_parameters_dtype_and_licence(report):
    info = report["info"]
    assert "kl-f8, 4 latent channels" in info and "fp32" in info and "decoder 49.49 M" in info
    assert "modelspec.license: CC BY-NC-SA 4.0" in info and "version: 1.0" in info
    assert "FLUX.2: scale 1, shift 0" in report["taef2_info"]
    assert report["tiny_choices"][0] == "taef2 (bundled)" and "taesd" in report["tiny_choices"]
    assert "kl4_ldm.safetensors" not in report["tiny_choices"]  # kl files are not offered to the tiny loader
