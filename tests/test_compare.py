"""Comparison, merge and post-hoc EMA (host-free), against independent computations: scikit-image for the metrics,
numpy on the saved files for the merge, a directly tracked power-function EMA for post-hoc EMA, and a ranking that
must hold on real images with the real TAEF2."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from test_finetune import photos, run_of, taef2_model

from training import compare, finetune, posthoc, recipes
from training.compare import LatentSpace
from training.latent_cache import LatentCache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def taef2_and_crops():
    """TAEF2, bundled photos as 256x256 centre crops, and their latents."""
    model = taef2_model()
    arrays = photos(("astronaut.png", "coffee.png", "grass.png"))  # (H, W, 3) float arrays in [0, 1]
    images = torch.stack([torch.from_numpy(a[:256, :256]).permute(2, 0, 1) for a in arrays])
    with torch.no_grad():
        latents = model.encode(images)
    return model, images, latents


def perturbed_decoder(model, scale: float, seed: int):
    import copy

    other = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.decoder.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale * p.abs().mean())
    return other


def test_metrics_agree_with_scikit_image_and_the_real_decoder_outranks_a_perturbed_one(taef2_and_crops):
    model, images, latents = taef2_and_crops
    noisy = perturbed_decoder(model, 0.05, 1)
    with torch.no_grad():
        outputs = {"taef2": model.decode(latents), "taef2 perturbed": noisy.decode(latents)}
    result = compare.compare_reconstructions(images, outputs)
    for label, out in outputs.items():
        for i in range(images.shape[0]):
            ours, ref = (
                out[i].clamp(0, 1).permute(1, 2, 0).double().numpy(),
                images[i].permute(1, 2, 0).double().numpy(),
            )
            assert float(result.per_image[label]["psnr"][i]) == pytest.approx(
                peak_signal_noise_ratio(ref, ours, data_range=1), abs=1e-3
            )
            ssim = structural_similarity(
                ref, ours, channel_axis=2, data_range=1, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
            )
            assert float(result.per_image[label]["ssim"][i]) == pytest.approx(ssim, abs=1e-4)
    summary = result.summary()
    good, bad = summary["taef2"], summary["taef2 perturbed"]
    assert good["psnr"]["mean"] > bad["psnr"]["mean"] and good["ssim"]["mean"] > bad["ssim"]["mean"]
    assert good["delta_e"]["mean"] < bad["delta_e"]["mean"]
    assert abs(good["detail_ratio"]["mean"] - 1) < abs(bad["detail_ratio"]["mean"] - 1)
    for metric in ("psnr", "ssim", "delta_e"):
        assert result.ranking(metric)[0] == "taef2"
    assert "| taef2 perturbed |" in result.table() and " ± " in result.table()
    data = result.as_json()
    assert data["images"] == 3 and len(data["decoders"]["taef2"]["per_image"]["psnr"]) == 3


def test_pictures_have_the_promised_layout(taef2_and_crops):
    model, images, latents = taef2_and_crops
    with torch.no_grad():
        outputs = {"a": model.decode(latents), "b": perturbed_decoder(model, 0.2, 2).decode(latents)}
    result = compare.compare_reconstructions(images, outputs)
    grid = compare.labelled_grid(result, max_side=128)
    assert grid.shape[0] == 3 and grid.shape[2] == 3 * 128 + 2 * 4  # reference + 2 decoders, 4 px gaps
    assert grid.shape[1] == 3 * (128 + 18) + 2 * 4  # 3 rows with an 18 px caption each
    heat, vmax = compare.delta_e_heatmaps(result, max_side=128)
    assert heat.shape[2] == 2 * 128 + 4 and vmax > 0
    crops = compare.most_different_regions(result, window=32, zoom=2)
    assert crops.shape[2] == 3 * 64 + 2 * 4
    # the picked window is where the two decoders disagree most: inside it the spread beats the image average
    spread = (outputs["a"].clamp(0, 1) - outputs["b"].clamp(0, 1)).abs().mean(1)
    assert spread.max() > spread.mean()


def test_captions_spell_out_what_the_built_in_font_cannot_draw():
    from PIL import Image, ImageDraw, ImageFont

    from training import visualize

    assert visualize.drawable("ΔE → modèle² × ±") == "dE -> modele2 x ±"
    font = ImageFont.load_default()
    missing = bytes(font.getmask("\ue000"))  # the font's empty box
    assert all(
        bytes(font.getmask(c)) != missing for c in visualize.drawable("ΔE Žluťoučký kůň, Ωmega, 東京 →") if c != " "
    )
    blank = torch.zeros(3, 4, 120)
    drawn = Image.new("RGB", (120, 18), (24, 24, 24))
    ImageDraw.Draw(drawn).text((4, 3), "dE finetuned", fill=(235, 235, 235))
    expected = torch.from_numpy(np.asarray(drawn, dtype=np.float32) / 255).permute(2, 0, 1)
    assert torch.equal(visualize.label(blank, "ΔE finetuned")[:, :18], expected)


def test_crop_to_multiple_matches_comfyui_centre_crop():
    images = torch.arange(2 * 3 * 21 * 35, dtype=torch.float32).reshape(2, 3, 21, 35)
    cropped = compare.crop_to_multiple(images, 8)
    assert cropped.shape == (2, 3, 16, 32)
    assert torch.equal(cropped, images[:, :, 2:18, 1:33])  # offsets (21 % 8) // 2 = 2, (35 % 8) // 2 = 1
    with pytest.raises(ValueError, match="smaller than the VAE's 8x ratio"):
        compare.crop_to_multiple(images[:, :, :5], 8)


def test_decode_statistics_see_clipping_detail_and_colour():
    flat = torch.full((1, 3, 32, 32), 0.5)
    noisy = flat + 0.2 * torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    overshoot = flat.clone()
    overshoot[:, :, :8] = 1.2
    stats = {
        name: compare.decode_statistics(x) for name, x in (("flat", flat), ("noisy", noisy), ("overshoot", overshoot))
    }
    assert float(stats["flat"]["detail_energy"]) == pytest.approx(0, abs=1e-9)
    assert float(stats["noisy"]["detail_energy"]) > 1e-3
    assert float(stats["overshoot"]["out_of_range"]) == pytest.approx(0.25)
    assert float(stats["flat"]["mean_L"]) == pytest.approx(0.59818, abs=1e-4)  # Oklab L of sRGB 50 % grey
    assert float(stats["flat"]["mean_chroma"]) == pytest.approx(0, abs=1e-6)
    table = compare.latent_table(stats)
    assert "| overshoot |" in table and "25.00 %" in table
    both = compare.latent_statistics({"flat": flat, "overshoot": overshoot})
    assert "delta_e_vs_first" not in both["flat"] and float(both["overshoot"]["delta_e_vs_first"]) > 0
    grid = compare.latent_grid({"flat": flat, "overshoot": overshoot}, both)
    assert grid.shape == (3, 32 + 18, 2 * 32 + 4)  # one row, two labelled columns


def trained_decoder(seed: int) -> dict[str, torch.Tensor]:
    run = run_of(
        taef2_model(), steps=2, seed=seed, crop=32, lr=1e-3, warmup_steps=0, base_decay=0.0
    )  # two decoders that really differ
    return run.decoder_tensors(use_ema=False)


def test_half_half_merge_of_two_finetunes_is_the_mean_of_the_files_and_decodes_differently(tmp_path, taef2_and_crops):
    model, _, latents = taef2_and_crops
    first, second = trained_decoder(1), trained_decoder(2)
    assert any(not torch.equal(first[k], second[k]) for k in first)
    save_file(first, tmp_path / "a.safetensors")
    save_file(second, tmp_path / "b.safetensors")
    a, b = load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors")
    weights, warning = compare.normalised_weights([1.0, 1.0])
    assert weights == [0.5, 0.5] and warning is None
    merged = compare.merge_state_dicts([a, b], weights, ["a", "b"])
    for key in a:
        expected = (a[key].numpy().astype(np.float64) + b[key].numpy().astype(np.float64)) / 2
        np.testing.assert_allclose(merged[key].numpy(), expected, rtol=1e-6, atol=1e-7)  # fp32 storage

    def decode(tensors):
        decoder = taef2_model()
        decoder.load_state_dict({**decoder.state_dict(), **tensors})
        with torch.no_grad():
            return decoder.decode(latents[:1])

    out_merged = decode(merged)
    assert not torch.allclose(out_merged, decode(a), atol=1e-4) and not torch.allclose(out_merged, decode(b), atol=1e-4)


def test_merge_refuses_mismatches_and_warns_on_extrapolation():
    a = {"w": torch.ones(2, 2), "n": torch.tensor(3)}
    with pytest.raises(compare.MergeError, match="b does not have a's tensors"):
        compare.merge_state_dicts([a, {"w": torch.ones(2, 2)}], [0.5, 0.5], ["a", "b"])
    with pytest.raises(compare.MergeError, match=r"b: w is \(3, 2\) but \(2, 2\) in a"):
        compare.merge_state_dicts([a, {"w": torch.ones(3, 2), "n": torch.tensor(1)}], [0.5, 0.5], ["a", "b"])
    with pytest.raises(compare.MergeError, match="sum to 0"):
        compare.normalised_weights([1.0, -1.0])
    weights, warning = compare.normalised_weights([1.5, -0.5])
    assert weights == [1.5, -0.5] and "extrapolating" in warning
    merged = compare.merge_state_dicts([a, {"w": torch.zeros(2, 2), "n": torch.tensor(7)}], weights, ["a", "b"])
    assert torch.equal(merged["w"], torch.full((2, 2), 1.5)) and int(merged["n"]) == 3  # counters from the first


def test_posthoc_ema_reproduces_a_directly_tracked_power_ema():
    """Train with snapshots on, and beside it track a power-function EMA of another length (sigma_rel 0.08, not one
    of the two saved) by its textbook update; the reconstruction from snapshots must land close to it."""
    model = taef2_model()
    config = finetune.FinetuneConfig(
        batch_size=1, crop_size=32, crops_per_image=4, posthoc_ema=True, posthoc_snapshots=16
    )
    recipe = recipes.recipe_with(
        recipes.RECIPES["furception-nolpips"], lr=3e-4, warmup_steps=0, base_decay=0.0
    )  # no pull: the EMAs must spread
    gamma = posthoc.sigma_rel_to_gamma(0.08)
    steps = 96
    with LatentCache(photos(), 32, 4, 0, model.encode) as cache:
        run = finetune.DecoderFinetune(model, recipe, config, cache, None)
        tracked = {k: p.detach().double().clone() for k, p in run.params.items()}
        raw_start = {k: v.clone() for k, v in tracked.items()}

        def track(_logs):
            t = run.step
            beta = (1 - 1 / t) ** (gamma + 1) if t > 1 else 0.0
            for k, p in run.params.items():
                tracked[k] = beta * tracked[k] + (1 - beta) * p.detach().double()

        for _ in range(steps):
            run.train_step()
            track(None)
        raw_end = {k: p.detach().double().clone() for k, p in run.params.items()}
        snapshots = run.posthoc.snapshots
    assert {s["step"] for s in snapshots} and max(s["step"] for s in snapshots) == steps
    rebuilt = posthoc.posthoc_ema(snapshots, 0.08, steps)
    error = sum(float((rebuilt[k].double() - tracked[k]).pow(2).sum()) for k in tracked) ** 0.5
    ema_vs_raw = sum(float((raw_end[k] - tracked[k]).pow(2).sum()) for k in tracked) ** 0.5
    moved = sum(float((raw_end[k] - raw_start[k]).pow(2).sum()) for k in tracked) ** 0.5
    assert ema_vs_raw > 0.05 * moved  # the EMA is really behind the raw weights: the test can tell them apart
    assert error < 0.1 * ema_vs_raw, (error, ema_vs_raw)
    with pytest.raises(ValueError, match="between 0.01 and 0.3"):
        posthoc.posthoc_ema(snapshots, 0.5)
    reference = torch.from_numpy(photos(("grass.png",))[0][:64, :64]).permute(2, 0, 1)[None]
    with torch.no_grad():
        latents = model.encode(reference)
    rows = posthoc.posthoc_table(model, snapshots, [0.05, 0.1, 0.05], latents, reference, chosen=0.1)
    assert list(rows) == ["σ_rel 0.05", "σ_rel 0.1 (chosen)"] and rows["σ_rel 0.05"]["psnr"].shape == (1,)
    assert not torch.equal(rows["σ_rel 0.05"]["psnr"], rows["σ_rel 0.1 (chosen)"]["psnr"])


def test_shared_encoder_refuses_other_spaces_and_warns_on_same_shaped_ones():
    sd = LatentSpace(4, 8, compare.space_tag("sd_vae_ft_mse.safetensors"))
    sdxl = LatentSpace(4, 8, compare.space_tag("sdxl_vae.safetensors"))
    flux = LatentSpace(16, 8, compare.space_tag("ae.safetensors"))
    stage_a = LatentSpace(4, 4, compare.space_tag("stage_a.safetensors"))
    assert (sd.tag, sdxl.tag, flux.tag) == ("SD 1.x/2.x", "SDXL", "FLUX.1")
    assert compare.check_shared_encoder(("sdxl", sdxl), [("sdxl ft", sdxl), ("unknown", LatentSpace(4, 8))]) == []
    warnings = compare.check_shared_encoder(("sdxl", sdxl), [("sd ft", sd)])
    assert (
        len(warnings) == 1 and "sd ft looks like SD 1.x/2.x but the shared encoder sdxl looks like SDXL" in warnings[0]
    )
    with pytest.raises(ValueError, match=r"cannot feed flux \(16 channels, 8x, FLUX.1\), cascade \(4 channels, 4x"):
        compare.check_shared_encoder(("sdxl", sdxl), [("flux", flux), ("cascade", stage_a), ("ok", sd)])
