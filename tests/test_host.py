"""Host tier: the pack inside a real ComfyUI (CPU), on every release tools/hosts.sh found."""

from __future__ import annotations

import glob
import json
import os

import colour
import numpy as np
import pytest
from comfy_host import PACK_NAME, ROOT, cascade_files, newest_release, ui_to_api
from PIL import Image
from test_pack import node_schemas

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
    original = (
        np.asarray(Image.open(os.path.join(base, "input", "example.png")).convert("RGB"), dtype=np.float32) / 255.0
    )
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
    original = (
        np.asarray(Image.open(os.path.join(server.base, "input", "example.png")).convert("RGB"), dtype=np.float32) / 255
    )
    taef2_dir = os.path.join(ROOT, "assets", "taef2")
    model = load_tiny_autoencoder(
        os.path.join(taef2_dir, "taef2_encoder.pth"), os.path.join(taef2_dir, "taef2_decoder.pth")
    ).eval()
    with torch.no_grad():
        x = torch.from_numpy(original).permute(2, 0, 1)[None]
        expected = model.decode(model.encode(x)).clamp(0, 1)[0].permute(1, 2, 0).numpy()
    preview = _preview(server, entry, _node(prompt, "PreviewImage"))
    assert np.abs(preview.astype(int) - (expected * 255).astype(int)).max() <= 1
    lab = colour.convert(expected.astype(np.float64), "sRGB", "Oklab") - colour.convert(
        original.astype(np.float64), "sRGB", "Oklab"
    )
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


def _taef2():
    from training.taesd import load_tiny_autoencoder

    taef2_dir = os.path.join(ROOT, "assets", "taef2")
    return load_tiny_autoencoder(
        os.path.join(taef2_dir, "taef2_encoder.pth"), os.path.join(taef2_dir, "taef2_decoder.pth")
    ).eval()


def check_finetune_decoder_on_folder(entry, prompt, server):
    """The finetuned VAE decodes example.png differently from the base, the numbers are on the node, and the saved
    madebyollin pair holds exactly the decoder that decoded the preview; Load Tiny Autoencoder lists it at once."""
    import torch
    from safetensors.torch import load_file

    from training.taesd import TinyAutoencoder

    tune = _node(prompt, "VAELab_DecoderFinetuneSteps")
    values = entry["outputs"][tune]["vae_lab"][0]
    assert values["step"] == prompt[tune]["inputs"]["steps"] and values["recipe"] == "furception-nolpips"
    assert "LPIPS" in values["fallback_note"]  # no LPIPS weights on the test host: the fallback is said
    assert values["held_out"]["psnr"] > 20 and values["base"]["psnr"] > 20
    assert "held-out" in entry["outputs"][tune]["text"][0]
    files = entry["outputs"][_node(prompt, "VAELab_SaveFinetunedVAE")]["vae_lab"][0]["files"]
    assert [os.path.basename(f).rsplit("_", 1)[-1] for f in files] == ["encoder.safetensors", "decoder.safetensors"]
    encoder, decoder = (load_file(f) for f in files)
    tuned = TinyAutoencoder.from_canonical(
        {**{"encoder." + k: v for k, v in encoder.items()}, **{"decoder." + k: v for k, v in decoder.items()}}
    ).eval()
    base = _taef2()
    original = (
        np.asarray(Image.open(os.path.join(server.base, "input", "example.png")).convert("RGB"), dtype=np.float32) / 255
    )
    x = torch.from_numpy(original).permute(2, 0, 1)[None]
    with torch.no_grad():
        latents = base.encode(x)
        expected = tuned.decode(latents).clamp(0, 1)[0].permute(1, 2, 0).numpy()
        before = base.decode(latents).clamp(0, 1)[0].permute(1, 2, 0).numpy()
    decoded_preview = next(
        k
        for k, v in prompt.items()
        if v["class_type"] == "PreviewImage" and prompt[v["inputs"]["images"][0]]["class_type"] == "VAEDecode"
    )
    preview = _preview(server, entry, decoded_preview).astype(int)
    assert np.abs(preview - (expected * 255).astype(int)).max() <= 1
    assert np.abs(preview - (before * 255).astype(int)).max() > 3  # the decoder did change
    stem = os.path.basename(files[1])[: -len("_decoder.safetensors")]
    spec = server.get("/object_info/VAELab_LoadTinyAutoencoder")["VAELab_LoadTinyAutoencoder"]["input"]["required"][
        "name"
    ]
    options = spec[0] if isinstance(spec[0], list) else spec[1]["options"]  # V3 combos: ["COMBO", {"options": [...]}]
    assert stem in options


def check_continue_training(entry, prompt, server):
    """Two chained nodes (10 + 10 steps) give exactly what one node of their summed steps gives."""
    nodes = [k for k, v in prompt.items() if v["class_type"] == "VAELab_DecoderFinetuneSteps"]
    second = next(k for k in nodes if "training_state" in prompt[k]["inputs"])
    first = prompt[second]["inputs"]["training_state"][0]
    total = prompt[first]["inputs"]["steps"] + prompt[second]["inputs"]["steps"]
    assert entry["outputs"][second]["vae_lab"][0]["step"] == total
    single = json.loads(json.dumps(prompt))
    single[second]["inputs"].pop("training_state")
    single[second]["inputs"]["vae"] = prompt[first]["inputs"]["vae"]
    single[second]["inputs"]["steps"] = total
    single_entry = server.run_prompt(single)
    preview = next(
        k
        for k, v in prompt.items()
        if v["class_type"] == "PreviewImage" and prompt[v["inputs"]["images"][0]]["class_type"] == "VAEDecode"
    )
    assert np.array_equal(_preview(server, entry, preview), _preview(server, single_entry, preview))
    assert (
        single_entry["outputs"][second]["vae_lab"][0]["held_out"] == entry["outputs"][second]["vae_lab"][0]["held_out"]
    )


def prepare_stable_cascade(server):
    """Random-weight Stable Cascade files (cached per machine) under the release names the workflows use."""
    for name, path in cascade_files(server.host).items():
        folder = os.path.join(server.base, "models", "checkpoints" if "stage_b" in name else "vae")
        os.makedirs(folder, exist_ok=True)
        if not os.path.exists(os.path.join(folder, name)):
            os.symlink(path, os.path.join(folder, name))


def check_stable_cascade_reconstruct(entry, prompt, server):
    """Reconstruct mode gives a 256 px picture and numbers; the same graph in latent mode fed by core's
    StableCascade_StageC_VAEEncode gives the identical image (same seed, same stage-B size)."""
    loader = _node(prompt, "VAELab_LoadStageA")
    assert "read only the vae. part of stable_cascade_stage_b.safetensors" in entry["outputs"][loader]["text"][0]
    decode = _node(prompt, "VAELab_StableCascadeDecode")
    preview = next(
        k for k, v in prompt.items() if v["class_type"] == "PreviewImage" and v["inputs"]["images"][0] == decode
    )
    image = _preview(server, entry, preview)
    assert image.shape == (256, 256, 3) and image.std() > 1
    assert np.isfinite(entry["outputs"][_node(prompt, "VAELab_OklabLoss")]["vae_lab"][0]["mean_delta_e"])
    latent_mode = json.loads(json.dumps(prompt))
    inputs = latent_mode[decode]["inputs"]
    latent_mode["90"] = {
        "class_type": "StableCascade_StageC_VAEEncode",
        "inputs": {"image": inputs.pop("image"), "vae": inputs.pop("effnet"), "compression": 42},
    }
    inputs.update(source="stage_c latent", stage_c=["90", 0])
    again = _preview(server, server.run_prompt(latent_mode, timeout=900), preview)
    assert np.abs(again.astype(int) - image.astype(int)).max() <= 1  # 8-bit rounding of ~1e-6 kernel-path noise


def check_stable_cascade_finetune_stage_a(entry, prompt, server):
    """Stage A's decoder trained in the graph; the saved full file is listed by core Load VAE at once and decodes
    exactly as the graph's finetuned VAE did, and differently from the base."""
    tune = _node(prompt, "VAELab_DecoderFinetuneSteps")
    values = entry["outputs"][tune]["vae_lab"][0]
    assert (
        values["step"] == prompt[tune]["inputs"]["steps"]
        and "Stable Cascade stage A" in entry["outputs"][tune]["text"][0]
    )
    (full,) = entry["outputs"][_node(prompt, "VAELab_SaveFinetunedVAE")]["vae_lab"][0]["files"]
    assert os.path.dirname(full).endswith(os.path.join("output", "vae"))
    listed = server.get("/object_info/VAELoader")["VAELoader"]["input"]["required"]["vae_name"][0]
    assert os.path.basename(full) in listed
    encode, decode = _node(prompt, "VAEEncode"), _node(prompt, "VAEDecode")
    core = {k: prompt[k] for k in ("1", prompt[encode]["inputs"]["vae"][0], encode)}
    core.update(
        {
            "91": {"class_type": "VAELoader", "inputs": {"vae_name": os.path.basename(full)}},
            decode: {"class_type": "VAEDecode", "inputs": {"samples": [encode, 0], "vae": ["91", 0]}},
            "92": {"class_type": "PreviewImage", "inputs": {"images": [decode, 0]}},
            "93": {
                "class_type": "VAEDecode",
                "inputs": {"samples": [encode, 0], "vae": prompt[encode]["inputs"]["vae"]},
            },
            "94": {"class_type": "PreviewImage", "inputs": {"images": ["93", 0]}},
        }
    )
    core_entry = server.run_prompt(core, timeout=900)
    preview = next(
        k for k, v in prompt.items() if v["class_type"] == "PreviewImage" and v["inputs"]["images"][0] == decode
    )
    finetuned = _preview(server, entry, preview)
    assert np.array_equal(finetuned, _preview(server, core_entry, "92"))
    assert not np.array_equal(finetuned, _preview(server, core_entry, "94"))


def _with_previews(prompt, sources: dict[str, list]) -> dict:
    """The prompt plus a PreviewImage of each (node, slot) in ``sources`` (id -> [node, slot])."""
    extended = json.loads(json.dumps(prompt))
    for node_id, source in sources.items():
        extended[node_id] = {"class_type": "PreviewImage", "inputs": {"images": source}}
    return extended


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    from skimage.metrics import peak_signal_noise_ratio

    return float(peak_signal_noise_ratio(a.astype(np.float64) / 255, b.astype(np.float64) / 255, data_range=1))


def check_compare_decoders_on_my_images(entry, prompt, server):
    """Both modes list the three VAEs; TAEF2's PSNR in the table equals TAEF2 run outside ComfyUI on the saved
    reference; the saved A/B images agree with scikit-image within 8-bit truncation; finetunes keep TAEF2's encoder,
    so shared-encoder numbers equal the autoencoder ones; the A/B slider images were written."""
    nodes = {
        prompt[k]["inputs"]["mode"]: k for k, v in prompt.items() if v["class_type"] == "VAELab_CompareReconstructions"
    }
    data = {mode: entry["outputs"][k]["vae_lab"][0] for mode, k in nodes.items()}
    for values in data.values():
        assert list(values["decoders"]) == ["taef2", "finetuned ema", "finetuned raw"] and values["images"] == 1
        assert values["unavailable"].get("lpips_alex", "").startswith("no weights")  # no LPIPS files on the test host
    auto, shared = data["autoencoders"]["decoders"], data["shared encoder"]["decoders"]
    for label in auto:
        assert auto[label]["per_image"]["psnr"] == pytest.approx(shared[label]["per_image"]["psnr"], abs=1e-4)
    node = nodes["autoencoders"]
    scale = prompt[node]["inputs"]["images"]
    extended = _with_previews(prompt, {"90": scale, "91": [node, 5], "92": [node, 6]})
    again = server.run_prompt(extended, timeout=900)
    reference, side_a, side_b = (_preview(server, again, k) for k in ("90", "91", "92"))
    # ImageScale's Lanczos works on 8-bit pictures, so the saved reference is exact: TAEF2 outside ComfyUI
    # (training.taesd) on it must give the table's number
    import torch

    from training import metrics as lab_metrics

    x = torch.from_numpy(reference.astype(np.float32) / 255).permute(2, 0, 1)[None]
    with torch.no_grad():
        model = _taef2()
        expected = float(lab_metrics.psnr(model.decode(model.encode(x)), x))
    assert auto["taef2"]["per_image"]["psnr"][0] == pytest.approx(expected, abs=0.01)
    # the saved side images are truncated to 8 bits by PreviewImage (~0.1-0.2 dB lower), yet rank the same way
    assert _psnr(reference, side_a) == pytest.approx(auto["taef2"]["per_image"]["psnr"][0], abs=0.3)
    assert _psnr(reference, side_b) == pytest.approx(auto["finetuned ema"]["per_image"]["psnr"][0], abs=0.3)
    pair = entry["outputs"][node]["vae_lab_ab"][0]
    assert pair["labels"] == ["taef2", "finetuned ema"]
    tiled = json.loads(json.dumps(prompt))  # tiled encode/decode (192 px tiles) stays close to the whole-image numbers
    tiled[node]["inputs"].update(tiled=True, tile_size=192)
    tiled_values = server.run_prompt(tiled, timeout=900)["outputs"][node]["vae_lab"][0]["decoders"]
    for label in auto:
        # 4 overlapping tiles on a 256 px image cost TAEF2 ~0.7 dB at the seams: close, not equal
        assert tiled_values[label]["per_image"]["psnr"][0] == pytest.approx(
            auto[label]["per_image"]["psnr"][0], abs=1.0
        )
    with_rfid = json.loads(json.dumps(prompt))
    with_rfid[node]["inputs"]["rfid"] = True  # opt-in: without the Inception file it says which file and where
    error = server.run_prompt(with_rfid, timeout=900, expect_error=True)
    assert (
        "pt_inception-2015-12-05-6726825d.pth" in error["exception_message"]
        and "inception" in error["exception_message"]
    )
    assert os.path.isfile(os.path.join(server.base, "temp", pair["a"]["filename"]))


def check_compare_decoders_on_a_latent(entry, prompt, server):
    """The numbers for TAEF2's own decode agree with training.taesd decoding the same latent from the saved input."""
    import torch

    from training import compare as lab_compare

    node = _node(prompt, "VAELab_CompareLatent")
    values = entry["outputs"][node]["vae_lab"][0]
    assert list(values) == ["taef2", "finetuned"] and "delta_e_vs_first" in values["finetuned"]
    scale = prompt[_node(prompt, "VAEEncode")]["inputs"]["pixels"]
    again = server.run_prompt(_with_previews(prompt, {"90": scale}), timeout=900)
    pixels = torch.from_numpy(_preview(server, again, "90").astype(np.float32) / 255).permute(2, 0, 1)[None]
    with torch.no_grad():
        model = _taef2()
        expected = lab_compare.decode_statistics(model.decode(model.encode(pixels)))
    for key in ("mean_L", "mean_chroma", "contrast_L"):  # 8-bit input here vs float in the graph: small tolerance
        assert values["taef2"][key][0] == pytest.approx(float(expected[key][0]), abs=3e-3), key
    assert values["taef2"]["detail_energy"][0] == pytest.approx(float(expected["detail_energy"][0]), rel=0.05)
    assert values["finetuned"]["delta_e_vs_first"][0] > 0


def check_merge_two_finetunes(entry, prompt, server):
    """The saved merge is the element-wise mean of the two parents, saved from the same graph."""
    from safetensors.torch import load_file

    merge = _node(prompt, "VAELab_MergeVAEs")
    assert "0.500·finetune A + 0.500·finetune B" in entry["outputs"][merge]["text"][0]
    parents = [
        prompt[prompt[merge]["inputs"]["vae_list"][0]]["inputs"]["vae"],
        prompt[prompt[prompt[merge]["inputs"]["vae_list"][0]]["inputs"]["vae_list"][0]]["inputs"]["vae"],
    ]
    extended = json.loads(json.dumps(prompt))
    for n, source in enumerate(parents):
        extended[f"9{n}"] = {
            "class_type": "VAELab_SaveFinetunedVAE",
            "inputs": {"vae": source, "filename_prefix": f"vae/parent{n}", "decoder_only_too": False},
        }
    again = server.run_prompt(extended, timeout=900)
    merged_files = entry["outputs"][_node(prompt, "VAELab_SaveFinetunedVAE")]["vae_lab"][0]["files"]
    decoders = [
        load_file(
            next(f for f in again["outputs"][f"9{n}"]["vae_lab"][0]["files"] if f.endswith("_decoder.safetensors"))
        )
        for n in range(2)
    ]
    merged = load_file(next(f for f in merged_files if f.endswith("_decoder.safetensors")))
    b, a = decoders  # parents[0] is the list's last entry (finetune B)
    assert set(merged) == set(a)
    for key in merged:
        expected = (a[key].double() + b[key].double()) / 2
        assert float((merged[key].double() - expected).abs().max()) < 1e-6, key
    assert any(float((a[k] - b[k]).abs().max()) > 1e-6 for k in a)  # two different finetunes


def check_posthoc_ema(entry, prompt, server):
    """The table covers every requested length (the chosen one marked) with finite numbers, and the post-hoc VAE
    decodes differently from the base."""
    node = _node(prompt, "VAELab_PostHocEMA")
    values = entry["outputs"][node]["vae_lab"][0]
    assert values["snapshots"] >= 4
    rows = values["table"]
    assert set(rows) == {"σ_rel 0.05", "σ_rel 0.1", "σ_rel 0.15 (chosen)", "σ_rel 0.2"}
    assert all(np.isfinite(r["psnr"]) and r["psnr"] > 20 for r in rows.values()), rows
    assert len({round(r["psnr"], 6) for r in rows.values()}) > 1  # the lengths really differ
    decode = _node(prompt, "VAEDecode")
    base = json.loads(json.dumps(prompt))
    base[decode]["inputs"]["vae"] = prompt[node]["inputs"]["vae"]
    preview = _node(prompt, "PreviewImage")
    assert not np.array_equal(
        _preview(server, entry, preview), _preview(server, server.run_prompt(base, timeout=900), preview)
    )


def _job_status(server, name):
    return json.loads(open(os.path.join(server.base, "output", "vae_lab_jobs", name, "status.json")).read())


def _wait_for_job(server, name, timeout=600):
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            status = _job_status(server, name)
        except (OSError, ValueError):
            status = {}
        if status.get("state") in ("done", "failed"):
            return status
        time.sleep(1)
    raise AssertionError(f"job {name} did not finish in {timeout}s: {status}")


def check_background_finetune_job(entry, prompt, server):
    """The node returns while the job trains in its own process; another workflow runs meanwhile; the job finishes
    with its checkpoints, and the running job's worker is not ComfyUI's process."""
    start = _node(prompt, "VAELab_StartFinetuneJob")
    values = entry["outputs"][start]["vae_lab"][0]
    name = prompt[start]["inputs"]["job_name"]
    assert values["job"] == name and values["pid"] != server.process.pid
    other = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
    }
    server.run_prompt(other, timeout=60)  # the queue is free while the job trains
    status = _wait_for_job(server, name)
    assert status["state"] == "done" and status["step"] == prompt[start]["inputs"]["total_steps"], status
    error = server.run_prompt(prompt, timeout=60, expect_error=True)  # the same name again: refused, nothing lost
    assert "exists already" in error["exception_message"]


def prepare_load_finetune_job(server):
    """The job load_finetune_job.json reads: made by the start workflow when an earlier test has not made it."""
    path = os.path.join(ROOT, "example_workflows", "background_finetune_job.json")
    if not os.path.exists(os.path.join(server.base, "output", "vae_lab_jobs", "taef2_background", "job.json")):
        with open(path) as f:
            server.run_prompt(ui_to_api(json.load(f), server.get("/object_info")), timeout=120)
    _wait_for_job(server, "taef2_background")


def check_load_finetune_job(entry, prompt, server):
    """The loaded VAE decodes example.png exactly as the job's newest EMA checkpoint does outside ComfyUI."""
    import torch

    from training import jobs as lab_jobs

    load = _node(prompt, "VAELab_LoadFinetuneJob")
    folder = os.path.join(server.base, "output", "vae_lab_jobs", "taef2_background")
    total = lab_jobs.load_spec(folder).total_steps  # 40 as the start workflow says (10 where it ran lighter)
    assert f"done at step {total} / {total}" in entry["outputs"][load]["text"][0]
    state = lab_jobs.latest_checkpoint(folder)
    model = _taef2()
    model.load_state_dict({**model.state_dict(), **state["ema"]["shadow"]})
    original = (
        np.asarray(Image.open(os.path.join(server.base, "input", "example.png")).convert("RGB"), dtype=np.float32) / 255
    )
    x = torch.from_numpy(original).permute(2, 0, 1)[None]
    with torch.no_grad():
        expected = model.decode(_taef2().encode(x)).clamp(0, 1)[0].permute(1, 2, 0).numpy()
    preview = _preview(server, entry, _node(prompt, "PreviewImage")).astype(int)
    assert np.abs(preview - (expected * 255).astype(int)).max() <= 1


CHECKS = {
    "oklab_loss_palette": check_oklab_loss_palette,
    "load_tiny_autoencoder_taef2": check_load_tiny_autoencoder_taef2,
    "load_vae_decoder_sdxl": check_load_vae_decoder_sdxl,
    "finetune_decoder_on_folder": check_finetune_decoder_on_folder,
    "continue_training": check_continue_training,
    "stable_cascade_reconstruct": check_stable_cascade_reconstruct,
    "stable_cascade_finetune_stage_a": check_stable_cascade_finetune_stage_a,
    "compare_decoders_on_my_images": check_compare_decoders_on_my_images,
    "compare_decoders_on_a_latent": check_compare_decoders_on_a_latent,
    "merge_two_finetunes": check_merge_two_finetunes,
    "posthoc_ema": check_posthoc_ema,
    "background_finetune_job": check_background_finetune_job,
    "load_finetune_job": check_load_finetune_job,
}
#: Files a workflow needs that only a user's download can supply; tests put random weights in their place.
PREPARE = {
    "load_vae_decoder_sdxl": prepare_load_vae_decoder_sdxl,
    "load_finetune_job": prepare_load_finetune_job,
    "stable_cascade_reconstruct": prepare_stable_cascade,
    "stable_cascade_finetune_stage_a": prepare_stable_cascade,
}


def fewer_steps(prompt: dict) -> dict:
    """A quarter of every VAE Lab node's steps (at least 2) and crops of at most 64 px. A node that keeps post-hoc EMA
    snapshots keeps its steps: 12 steps leave too few snapshots, and one EMA length was rebuilt at 11 dB."""
    lighter = json.loads(json.dumps(prompt))
    for node in lighter.values():
        if not node["class_type"].startswith("VAELab_"):
            continue
        values = node["inputs"]
        for key in ("steps", "total_steps", "checkpoint_interval"):
            if isinstance(values.get(key), int) and not values.get("posthoc_ema"):
                values[key] = max(2, values[key] // 4)
        if isinstance(values.get("crop_size"), int):
            values["crop_size"] = min(values["crop_size"], 64)
    return lighter


def smaller_image(prompt: dict) -> dict:
    """Every loaded image scaled to 256 px before anything uses it."""
    lighter = json.loads(json.dumps(prompt))
    for node_id, node in list(lighter.items()):
        if node["class_type"] == "LoadImage":
            scaled = f"{node_id}_256"
            for other in lighter.values():
                for key, value in other["inputs"].items():
                    if value == [node_id, 0]:
                        other["inputs"][key] = [scaled, 0]
            lighter[scaled] = {
                "class_type": "ImageScale",
                "inputs": {
                    "image": [node_id, 0],
                    "upscale_method": "area",
                    "width": 256,
                    "height": 256,
                    "crop": "center",
                },
            }
    return lighter


#: Workflows that dominate the host tier's time. On every release but the newest found they run lighter (the same
#: nodes and checks at a third of the cost or less), which keeps the whole suite inside CI's budget; the newest release
#: runs every workflow unchanged.
LIGHTER = {
    "background_finetune_job": fewer_steps,
    "compare_decoders_on_my_images": fewer_steps,
    "continue_training": fewer_steps,
    "finetune_decoder_on_folder": fewer_steps,
    "load_vae_decoder_sdxl": smaller_image,
    "merge_two_finetunes": fewer_steps,
    "posthoc_ema": fewer_steps,
    "stable_cascade_finetune_stage_a": fewer_steps,
}


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: os.path.basename(p))
def test_example_workflow_runs_and_gives_the_right_numbers(server, object_info, path):
    name = os.path.splitext(os.path.basename(path))[0]
    assert name in CHECKS, f"{name}: every example workflow needs an independent check in CHECKS"
    server.forget_cached_outputs()  # as in a fresh ComfyUI: no node of an earlier test's prompt is reused
    if name in PREPARE:
        PREPARE[name](server)
    with open(path) as f:
        prompt = ui_to_api(json.load(f), object_info)
    if name in LIGHTER and server.host.release != newest_release():
        prompt = LIGHTER[name](prompt)
    entry = server.run_prompt(prompt)
    CHECKS[name](entry, prompt, server)


def test_oklab_loss_names_the_input_and_the_fix_on_a_size_mismatch(server):
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
        "2": {
            "class_type": "ImageScale",
            "inputs": {"image": ["1", 0], "upscale_method": "bilinear", "width": 96, "height": 64, "crop": "disabled"},
        },
        "3": {
            "class_type": "VAELab_OklabLoss",
            "inputs": {
                "image": ["2", 0],
                "reference": ["1", 0],
                "mse_mix": 0.5,
                "weight_L": 1.0,
                "weight_a": 2.0,
                "weight_b": 2.0,
                "mse_scale": 0.01,
                "heatmap_max": 0.1,
            },
        },
    }
    error = server.run_prompt(prompt, expect_error=True)
    assert error["node_type"] == "VAELab_OklabLoss"
    assert (
        "image is 96x64 but reference is 768x768" in error["exception_message"]
        and "resize or crop" in error["exception_message"]
    )


def test_a_finetuned_kl_vae_is_saved_listed_by_core_and_decodes_like_the_graph(server):
    """Full-size kl-f8 (random weights): one step, saved with a decoder-only copy; core Load VAE lists the full file
    without a restart and decodes exactly as the finetuned VAE did; the input VAE is unchanged; metadata is complete."""
    from safetensors import safe_open

    prepare_load_vae_decoder_sdxl(server)
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
        "2": {
            "class_type": "ImageScale",
            "inputs": {"image": ["1", 0], "upscale_method": "area", "width": 128, "height": 128, "crop": "disabled"},
        },
        "3": {
            "class_type": "VAELab_LoadVAEDecoder",
            "inputs": {"vae_name": "sdxl_vae.safetensors", "encoder": "from this file", "base_file": "(none)"},
        },
        "4": {
            "class_type": "VAELab_DecoderFinetuneSteps",
            "inputs": {
                "vae": ["3", 0],
                "images": ["2", 0],
                "folder": "",
                "recipe": "furception",
                "steps": 1,
                "batch_size": 1,
                "crop_size": 64,
                "learning_rate": 0.0,
                "seed": 0,
                "held_out_fraction": 0.0,
                "output_weights": "raw",
                "gradient_checkpointing": True,
            },
        },
        "5": {
            "class_type": "VAELab_SaveFinetunedVAE",
            "inputs": {"vae": ["4", 0], "filename_prefix": "vae/kl_test", "decoder_only_too": True},
        },
        "6": {"class_type": "VAEEncode", "inputs": {"pixels": ["2", 0], "vae": ["3", 0]}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["4", 0]}},
        "8": {"class_type": "PreviewImage", "inputs": {"images": ["7", 0]}},
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["3", 0]}},
        "10": {"class_type": "PreviewImage", "inputs": {"images": ["9", 0]}},
    }
    entry = server.run_prompt(prompt, timeout=900)
    files = entry["outputs"]["5"]["vae_lab"][0]["files"]
    full, decoder_only = files
    assert os.path.dirname(full).endswith(os.path.join("output", "vae")) and "vae_decoders" in decoder_only
    listed = server.get("/object_info/VAELoader")["VAELoader"]["input"]["required"]["vae_name"][0]
    assert os.path.basename(full) in listed and os.path.basename(decoder_only) not in listed
    with safe_open(full, "pt") as f:
        meta = f.metadata()
    assert meta["vae_lab.base_file"] == "sdxl_vae.safetensors" and len(meta["vae_lab.base_sha256"]) == 64
    assert json.loads(meta["vae_lab.recipe"])["name"] == "furception-nolpips" and meta["vae_lab.steps"] == "1"
    core = {
        "1": prompt["1"],
        "2": prompt["2"],
        "3": prompt["3"],
        "6": prompt["6"],
        "11": {"class_type": "VAELoader", "inputs": {"vae_name": os.path.basename(full)}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["11", 0]}},
        "8": {"class_type": "PreviewImage", "inputs": {"images": ["7", 0]}},
    }
    core_entry = server.run_prompt(core, timeout=900)
    finetuned = _preview(server, entry, "8")
    assert np.array_equal(finetuned, _preview(server, core_entry, "8"))
    assert not np.array_equal(finetuned, _preview(server, entry, "10"))  # the decoder changed
    # ... and the input VAE did not: the cached VAE object node 3 handed to the finetune still decodes like a fresh core
    # load (VAEDecodeTiled: a node that has not run before, so nothing comes from the output cache)
    tiled = {"tile_size": 512, "overlap": 64, "temporal_size": 64, "temporal_overlap": 8}
    after = {k: prompt[k] for k in ("1", "2", "3", "6")}
    after.update(
        {
            "20": {"class_type": "VAEDecodeTiled", "inputs": {"samples": ["6", 0], "vae": ["3", 0], **tiled}},
            "21": {"class_type": "PreviewImage", "inputs": {"images": ["20", 0]}},
            "22": {"class_type": "VAELoader", "inputs": {"vae_name": "sdxl_vae.safetensors"}},
            "23": {"class_type": "VAEDecodeTiled", "inputs": {"samples": ["6", 0], "vae": ["22", 0], **tiled}},
            "24": {"class_type": "PreviewImage", "inputs": {"images": ["23", 0]}},
        }
    )
    after_entry = server.run_prompt(after, timeout=900)
    assert np.array_equal(_preview(server, after_entry, "21"), _preview(server, after_entry, "24"))
