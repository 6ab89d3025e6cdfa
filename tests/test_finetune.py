"""The trainer (host-free): every family trains, only the decoder moves, runs are reproducible and can be split,
state and caches behave, nothing non-finite escapes."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from training import decoders, finetune, klf8, losses, posthoc, recipes, stage_a, taesd
from training.latent_cache import LatentCache
from training.run import TrainingRun

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TAEF2_DIR = os.path.join(ROOT, "assets", "taef2")


def taef2_model():
    return taesd.load_tiny_autoencoder(
        os.path.join(TAEF2_DIR, "taef2_encoder.pth"), os.path.join(TAEF2_DIR, "taef2_decoder.pth")
    ).eval()


def photos(names=("astronaut.png", "coffee.png")):
    from training.data import load_image01

    return [load_image01(os.path.join(ROOT, "assets", "images", n)) for n in names]


def run_of(
    model,
    recipe_name="furception-nolpips",
    steps=1,
    batch=1,
    crop=64,
    state=None,
    seed=0,
    images=None,
    held_names=(),
    pool=4,
    **overrides,
):
    """A TrainingRun (the loop every caller shares) of ``steps`` steps; returns its trainer."""
    recipe = recipes.recipe_with(recipes.RECIPES[recipe_name], **overrides)
    config = finetune.FinetuneConfig(batch_size=batch, crop_size=crop, seed=seed, crops_per_image=pool)
    images = images if images is not None else photos()
    with TrainingRun(
        model,
        recipe,
        config,
        images,
        model.encode,
        held_out_images=photos(held_names) if held_names else (),
        held_out_names=held_names,
        state=state,
    ) as training:
        training.run(steps)
    return training.trainer


@pytest.mark.parametrize("family", ["kl-4ch", "kl-16ch", "taef2", "stage-a"])
def test_each_family_trains_only_its_decoder(family):
    torch.manual_seed(0)
    if family == "taef2":
        model = taef2_model()
    elif family == "stage-a":
        model = stage_a.StageAAutoencoder().eval()  # full size, random weights
        with torch.no_grad():  # a fresh block's gates (gammas) are 0, which would hide its weights from the gradient
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    else:
        cfg = klf8.KlConfig() if family == "kl-4ch" else klf8.KlConfig(z_channels=16, quant_convs=False)
        model = klf8.KlAutoencoder(cfg).eval()  # full size, the real config, random weights
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run = run_of(model, gan_start=0)  # the whole recipe: pixel + detail + critic at the adaptive weight
    logs = run.history[-1]
    assert np.isfinite(logs["loss"]) and not logs.get("skipped")
    assert (
        np.isfinite(logs["gan"]) and logs["gan_weight"] > 0 and np.isfinite(logs["critic"]) and np.isfinite(logs["gp"])
    )
    after = model.state_dict()
    trainable = decoders.decoder_parameters(model)
    assert trainable and all(
        k.startswith(("decoder.", "post_quant_conv.", "up_blocks.", "out_block.")) for k in trainable
    )
    if family == "stage-a":
        assert sum(p.numel() for p in trainable.values()) == 15_706_842  # up_blocks + out_block of the release
    if family == "kl-4ch":
        assert "post_quant_conv.weight" in trainable
    unchanged = [k for k in trainable if torch.equal(after[k], before[k])]
    assert not unchanged, f"trainable parameters that did not move: {unchanged[:5]}"
    frozen = [k for k in before if k not in trainable]
    assert frozen and all(torch.equal(after[k], before[k]) for k in frozen), "the encoder changed"


def test_a_split_run_equals_one_run_and_reruns_are_identical():
    # the critic joins at step 2 (trained from step 1), so the split crosses every schedule change
    whole = run_of(taef2_model(), steps=4, batch=2, gan_start=2, critic_warmup_steps=1)
    first = run_of(taef2_model(), steps=2, batch=2, gan_start=2, critic_warmup_steps=1)
    state = first.state_dict()
    frozen_state = {k: v.clone() for k, v in state["decoder"].items()}
    second = run_of(taef2_model(), steps=2, batch=2, state=state, gan_start=2, critic_warmup_steps=1)
    assert all(torch.equal(state["decoder"][k], frozen_state[k]) for k in frozen_state), "the input state was mutated"
    for use_ema in (False, True):
        a, b = whole.decoder_tensors(use_ema), second.decoder_tensors(use_ema)
        assert all(torch.equal(a[k], b[k]) for k in a), f"split run differs (ema={use_ema})"
    again = run_of(taef2_model(), steps=4, batch=2, gan_start=2, critic_warmup_steps=1)
    a, b = whole.decoder_tensors(), again.decoder_tensors()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert second.step == 4 and second.images_seen == 8 and len(second.history) == 4


def test_state_from_another_decoder_is_refused():
    state = run_of(taef2_model(), steps=1).state_dict()
    small = taesd.TinyAutoencoder(4)
    with pytest.raises(finetune.FinetuneError, match="different decoder"):
        run_of(small, steps=1, state=state)
    with pytest.raises(finetune.FinetuneError, match="version 99"):
        run_of(taef2_model(), steps=1, state={**state, "version": 99})


def test_non_finite_steps_are_skipped_and_never_reach_the_weights():
    model = taef2_model()
    before = {k: v.clone() for k, v in decoders.decoder_parameters(model).items()}

    def poisoned(images01):
        return model.encode(images01) * float("nan")

    cache = LatentCache(photos(), 64, 2, 0, poisoned)
    run = finetune.DecoderFinetune(
        model, recipes.RECIPES["furception-nolpips"], finetune.FinetuneConfig(batch_size=1, crop_size=64), cache, None
    )
    for _ in range(2):
        run.train_step()
    cache.close()
    assert run.skipped_steps == 2 and all(h.get("skipped") for h in run.history)
    assert all(torch.equal(p, before[k]) for k, p in decoders.decoder_parameters(model).items())
    with torch.no_grad():
        next(iter(decoders.decoder_parameters(model).values())).fill_(float("nan"))
    with pytest.raises(finetune.FinetuneError, match="non-finite"):
        run.decoder_tensors(use_ema=False)


def test_latent_cache_encodes_each_crop_once_spills_to_disk_and_cleans_up(tmp_path):
    model = taef2_model()
    calls = []

    def encode(images01):
        calls.append(images01.shape[0])
        return model.encode(images01)

    cache = LatentCache(photos(), 64, 8, 3, encode, max_bytes=200_000, spill_dir=str(tmp_path))
    first = [cache.item(i) for i in range(len(cache))]
    assert cache.encoded_crops == len(cache) == 16 and sum(calls) == 16
    assert cache.bytes_in_memory <= 200_000 + 8 * (32 * 8 * 8 + 3 * 64 * 64) * 4
    spilled = list(tmp_path.iterdir())
    assert spilled and any(p.is_dir() for p in spilled)
    again = [cache.item(i) for i in range(len(cache))]  # read back from disk, not re-encoded
    assert sum(calls) == 16
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    with torch.no_grad():
        direct = model.encode(first[5][1][None])[0]
    torch.testing.assert_close(first[5][0], direct, atol=1e-5, rtol=0)
    cache.close()
    assert not any(p.is_dir() for p in tmp_path.iterdir())


def test_recipes_fall_back_visibly_without_lpips():
    recipe, note = recipes.resolve_recipe("furception", lpips_available=False)
    assert recipe.name == "furception-nolpips" and "LPIPS" in note and "models/lpips" in note
    assert recipes.resolve_recipe("furception", lpips_available=True) == (recipes.RECIPES["furception"], None)
    with pytest.raises(ValueError, match="ft-mse.*vgg16-397923af.pth"):
        recipes.resolve_recipe("ft-mse", lpips_available=False)
    with pytest.raises(recipes.RecipeError, match="unknown recipe field"):
        recipes.recipe_with(recipes.RECIPES["ft-ema"], learning_rate=1)


def test_pixel_blur_is_the_plain_loss_of_the_output_seen_through_the_fixed_blur():
    from scipy.ndimage import correlate1d

    torch.manual_seed(0)
    out, target = torch.rand(2, 3, 24, 20), torch.rand(2, 3, 24, 20)
    taps = np.array([1, 4, 6, 4, 1]) / 16  # reflect padding without repeating the edge = scipy's "mirror"
    blurred = correlate1d(correlate1d(out.double().numpy(), taps, axis=2, mode="mirror"), taps, axis=3, mode="mirror")
    for space in ("rgb", "oklab"):
        plain = recipes.recipe_with(recipes.RECIPES["furception-nolpips"], pixel_space=space, pixel_blur=0.0)
        seen = torch.from_numpy(0.7 * out.double().numpy() + 0.3 * blurred).float()
        expected = losses.pixel_loss(seen, target, plain, 10)
        got = losses.pixel_loss(out, target, recipes.recipe_with(plain, pixel_blur=0.3), 10)
        assert float(got) == pytest.approx(float(expected), rel=1e-5)
    with pytest.raises(ValueError, match="pixel_blur must be in"):
        recipes.recipe_with(recipes.RECIPES["ft-mse"], pixel_blur=1.0)


def test_base_decay_pulls_each_step_toward_the_starting_weights_and_survives_a_split():
    plain = run_of(taef2_model(), steps=1, base_decay=0.0)
    model = taef2_model()
    start = {k: p.detach().clone() for k, p in decoders.decoder_parameters(model).items()}
    pulled = run_of(model, steps=1, base_decay=2000.0)
    weight = pulled.lr_at(0) * 2000.0  # step 0's learning rate (warm-up) x base_decay
    assert 0 < weight < 1
    for k, p in pulled.params.items():  # the same Adam step from the same start, then lerp toward the start
        expected = plain.params[k].detach() + weight * (start[k] - plain.params[k].detach())
        assert torch.allclose(p.detach(), expected, rtol=0, atol=1e-7), k
    state = pulled.state_dict()
    assert all(torch.equal(state["anchor"][k], start[k]) for k in start)
    # continued on a VAE whose decoder is not the start (e.g. the first run's output): the pull is still toward the
    # start
    other = taef2_model()
    with torch.no_grad():
        for p in decoders.decoder_parameters(other).values():
            p.add_(0.01)
    continued = run_of(other, steps=2, state=state, base_decay=2000.0)
    whole = run_of(taef2_model(), steps=3, base_decay=2000.0)  # 1 + 2
    assert all(torch.equal(continued.anchor[k], start[k]) for k in start)
    assert all(
        torch.equal(a, b) for a, b in zip(continued.decoder_tensors().values(), whole.decoder_tensors().values())
    )
    with pytest.raises(ValueError, match="base_decay must be"):
        recipes.recipe_with(recipes.RECIPES["ft-mse"], base_decay=-1.0)


def test_default_recipe_gains_on_other_domains_without_blurring():
    """The calibration runs' trap (docs/recipes.md), measured: a pixel loss alone wins held-out PSNR by blurring
    (detail ratio ~0.66 on TAEF2). The default no-LPIPS recipe must win PSNR and ΔE on images of other domains and keep
    the detail."""
    from training import metrics

    held_names = ["hubble_deep_field.jpg", "ihc.png", "retina.jpg"]
    train = photos(("astronaut.png", "chelsea.png", "coffee.png", "grass.png", "rocket.jpg"))
    results = {}
    for label, blur in (("default", recipes.RECIPES["furception-nolpips"].pixel_blur), ("no blur", 0.0)):
        model = taef2_model()
        run = run_of(model, steps=40, batch=8, crop=128, images=train, held_names=held_names, pool=16, pixel_blur=blur)
        held = run.held_out  # base: the decoder before training, measured when the run was set up
        tuned = metrics.reconstruction_metrics(run.decode_with(held.latents, use_ema=True), held.images01)
        results[label] = {
            k: (run.base_evaluation[k], float(tuned[k].mean())) for k in ("psnr", "delta_e", "detail_ratio")
        }
    default, control = results["default"], results["no blur"]
    assert default["psnr"][1] - default["psnr"][0] > 0.3, results  # measured +0.6 dB
    assert default["delta_e"][1] < 0.96 * default["delta_e"][0], results  # measured -7 %
    assert 0.9 < default["detail_ratio"][1] < 1.1, results  # base 1.04
    assert control["detail_ratio"][1] < 0.8, results  # the trap is real on this data (measured 0.66) ...
    assert control["psnr"][1] > default["psnr"][1], results  # ... and is where the extra PSNR came from


def test_schedules_are_functions_of_the_step():
    recipe = recipes.RECIPES["furception-nolpips"]
    assert losses.mse_mix_at(recipe, 0) == pytest.approx(recipe.mse_mix_start)
    assert losses.mse_mix_at(recipe, recipe.mse_mix_steps) == pytest.approx(recipe.mse_mix_end)
    assert losses.mse_mix_at(recipe, 10**9) == pytest.approx(recipe.mse_mix_end)


def test_posthoc_snapshots_stay_bounded_and_spread():
    param = torch.nn.Parameter(torch.zeros(3))
    snaps = posthoc.PowerEmaSnapshots({"w": param}, max_snapshots=4, interval=2)
    for t in range(1, 101):
        with torch.no_grad():
            param.fill_(float(t))
        snaps.update(t)
    steps = sorted({s["step"] for s in snaps.snapshots})
    assert (
        2 <= len(steps) <= 4 and len(snaps.snapshots) == 2 * len(steps) and steps[-1] >= 64
    )  # evenly thinned, both EMAs
    assert all(s["tensors"]["w"].dtype == torch.float16 for s in snaps.snapshots)
    # sigma_rel 0.05 -> gamma ~ 16.97, 0.10 -> ~ 6.94 (EDM2, Table/eq. 3)
    assert snaps.gammas == pytest.approx([16.97, 6.94], abs=0.02)


def test_gradient_checkpointing_gives_the_same_step():
    plain = run_of(taef2_model(), steps=1, batch=1)
    model = taef2_model()
    recipe = recipes.RECIPES["furception-nolpips"]
    config = finetune.FinetuneConfig(batch_size=1, crop_size=64, crops_per_image=4, gradient_checkpointing=True)
    with LatentCache(photos(), 64, 4, 0, model.encode) as cache:
        checkpointed = finetune.DecoderFinetune(model, recipe, config, cache, None)
        checkpointed.train_step()
    a, b = plain.decoder_tensors(False), checkpointed.decoder_tensors(False)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert set(model.state_dict()) == set(taef2_model().state_dict())  # names unchanged by the patching


def test_lpips_recipes_train_through_the_lpips_package(tmp_path):
    """ft-mse's LPIPS branch end to end, with a random VGG16 backbone in torchvision's file layout standing in
    for the real weights (which cannot be downloaded here)."""
    import torchvision

    from training import perceptual

    torch.manual_seed(0)
    path = tmp_path / "vgg16-397923af.pth"
    torch.save(torchvision.models.vgg16(weights=None).state_dict(), path)
    lpips = perceptual.Lpips("vgg", backbone_path=str(path))
    model = taef2_model()
    before = {k: v.clone() for k, v in decoders.decoder_parameters(model).items()}
    config = finetune.FinetuneConfig(batch_size=1, crop_size=64, crops_per_image=2)
    with LatentCache(photos(), 64, 2, 0, model.encode) as cache:
        run = finetune.DecoderFinetune(model, recipes.RECIPES["ft-mse"], config, cache, None, lpips)
        run.train_step()
    assert np.isfinite(run.history[-1]["lpips"]) and run.history[-1]["lpips"] > 0
    assert all(not torch.equal(p, before[k]) for k, p in decoders.decoder_parameters(model).items())
    with pytest.raises(finetune.FinetuneError, match="needs an LPIPS module"):
        finetune.DecoderFinetune(taef2_model(), recipes.RECIPES["ft-ema"], config, cache, None, None)
