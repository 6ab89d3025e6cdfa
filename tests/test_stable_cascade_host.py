"""Host tier: Stable Cascade stage A and Stable Cascade Decode against core's own nodes inside real ComfyUI code
(tests/host_scripts/stable_cascade_equality.py, run by ComfyUI's Python), on random weights in the real layouts:
a stage-B-lite checkpoint with its stage A, the stage A file, and an effnet encoder (cached per machine)."""

from __future__ import annotations

import json

import pytest
from comfy_host import cascade_files, run_host_script


@pytest.fixture(scope="module")
def report(comfy_host, tmp_path_factory):
    files = cascade_files(comfy_host)
    result = run_host_script(
        comfy_host,
        "stable_cascade_equality.py",
        str(tmp_path_factory.mktemp("models")),
        files["stable_cascade_stage_b.safetensors"],
        files["stage_a.safetensors"],
        files["effnet_encoder.safetensors"],
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert result.returncode == 0 and lines, result.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT ") :])


def test_stage_a_from_its_file_and_from_a_stage_b_checkpoint_equals_core(report):
    for case in (
        "ours from stage_a file",
        "ours from stage-B checkpoint",
        "core checkpoint vae",
        "ours decoder-only + base_vae",
    ):
        row = report["results"][case]
        assert row["decode"] == 0.0 and row["encode"] == 0.0 and row["type"] == "StageA", (case, row)
    assert report["choices"] == [
        "vae/stage_a.safetensors",
        "vae_decoders/stage_a_decoder.safetensors",
        "checkpoints/stable_cascade_stage_b.safetensors",
    ]
    assert "read only the vae. part" in report["info"] and "decoder 15.71 M" in report["info"]


def test_decode_equals_cores_four_node_chain_with_the_same_seed(report):
    row = report["results"]["decode vs core chain"]
    assert row["finite"] and row["spread"] > 0.01  # a real picture of noise, not a constant
    # identical ops on identical inputs; oneDNN may still pick another kernel path between two calls (1e-6 seen)
    assert row["image"] <= 1e-5 and row["shape"] == [1, 256, 256, 3]
    assert row["auto_size_image"] <= 1e-5  # width/height 0: 6 x 42 = 252 -> 256, the size the empty latent was made for


def test_reconstruct_equals_cores_encode_then_chain(report):
    row = report["results"]["reconstruct vs core chain"]
    assert row["finite"] and row["image"] <= 1e-5 and row["stage_c"] <= 1e-5 and row["shape"] == [1, 256, 320, 3]


def test_refusals_name_the_input_and_the_fix(report):
    refusals = report["refusals"]
    assert "needs effnet connected" in refusals["reconstruct without effnet"]
    assert "needs the stage_c input connected" in refusals["latent mode without stage_c"]
    assert (
        "'vae' is a StageC_coder, not stage A; load it with Load Stable Cascade Stage A"
        in refusals["effnet as the stage A vae"]
    )
    assert "a stage-C latent has 16 channels" in refusals["stage B latent as stage_c"]
    assert (
        "stage_a.safetensors: this is a Stable Cascade stage A (f4 VQGAN) file, not a kl-f8 VAE; load it with Load "
        "Stable Cascade Stage A" in refusals["stage A in Load VAE Decoder"]
    )
    assert (
        "stage_a_decoder.safetensors: this file holds only a decoder" in refusals["decoder-only stage A without base"]
    )
