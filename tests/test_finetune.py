"""The trainer (host-free): every family trains, only the decoder moves, runs are reproducible and can be split,
state and caches behave, nothing non-finite escapes."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from training import finetune, klf8, recipes, stage_a, taesd
from training.latent_cache import LatentCache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TAEF2_DIR = os.path.join(ROOT, "assets", "taef2")


def taef2_model():
    return taesd.load_tiny_autoencoder(os.path.join(TAEF2_DIR, "taef2_encoder.pth"), os.path.join(TAEF2_DIR, "taef2_decoder.pth")).eval()


def photos(names=("astronaut.png", "coffee.png")):
    from training.data import load_image01

    return [load_image01(os.path.join(ROOT, "assets", "images", n)) for n in names]


def run_of(model, recipe_name="furception-nolpips", steps=1, batch=1, crop=64, state=None, seed=0, images=None, held=None, **overrides):
    recipe = finetune.recipe_with(recipes.RECIPES[recipe_name], **overrides)
    config = finetune.FinetuneConfig(batch_size=batch, crop_size=crop, seed=seed, crops_per_image=4)
    images = images if images is not None else photos()
    cache = LatentCache(images, crop, config.crops_per_image, seed, model.encode)
    run = finetune.DecoderFinetune(model, recipe, config, cache, held, None, state)
    run.run(steps)
    cache.close()
    return run


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
    assert np.isfinite(logs["gan"]) and logs["gan_weight"] > 0 and np.isfinite(logs["critic"]) and np.isfinite(logs["gp"])
    after = model.state_dict()
    trainable = finetune.decoder_parameters(model)
    assert trainable and all(k.startswith(("decoder.", "post_quant_conv.", "up_blocks.", "out_block.")) for k in trainable)
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
    before = {k: v.clone() for k, v in finetune.decoder_parameters(model).items()}

    def poisoned(images01):
        return model.encode(images01) * float("nan")

    cache = LatentCache(photos(), 64, 2, 0, poisoned)
    run = finetune.DecoderFinetune(model, recipes.RECIPES["furception-nolpips"], finetune.FinetuneConfig(batch_size=1, crop_size=64),
                                   cache, None)
    run.run(2)
    cache.close()
    assert run.skipped_steps == 2 and all(h.get("skipped") for h in run.history)
    assert all(torch.equal(p, before[k]) for k, p in finetune.decoder_parameters(model).items())
    with torch.no_grad():
        next(iter(finetune.decoder_parameters(model).values())).fill_(float("nan"))
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
    with pytest.raises(finetune.FinetuneError, match="unknown recipe field"):
        finetune.recipe_with(recipes.RECIPES["ft-ema"], learning_rate=1)


def test_schedules_are_functions_of_the_step():
    recipe = recipes.RECIPES["furception-nolpips"]
    assert finetune.mse_mix_at(recipe, 0) == pytest.approx(recipe.mse_mix_start)
    assert finetune.mse_mix_at(recipe, recipe.mse_mix_steps) == pytest.approx(recipe.mse_mix_end)
    assert finetune.mse_mix_at(recipe, 10**9) == pytest.approx(recipe.mse_mix_end)


def test_posthoc_snapshots_stay_bounded_and_spread():
    param = torch.nn.Parameter(torch.zeros(3))
    snaps = finetune.PowerEmaSnapshots({"w": param}, max_snapshots=4, interval=2)
    for t in range(1, 101):
        with torch.no_grad():
            param.fill_(float(t))
        snaps.update(t)
    steps = sorted({s["step"] for s in snaps.snapshots})
    assert 2 <= len(steps) <= 4 and len(snaps.snapshots) == 2 * len(steps) and steps[-1] >= 64  # evenly thinned, both EMAs
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
        checkpointed.run(1)
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
    before = {k: v.clone() for k, v in finetune.decoder_parameters(model).items()}
    config = finetune.FinetuneConfig(batch_size=1, crop_size=64, crops_per_image=2)
    with LatentCache(photos(), 64, 2, 0, model.encode) as cache:
        run = finetune.DecoderFinetune(model, recipes.RECIPES["ft-mse"], config, cache, None, lpips)
        run.run(1)
    assert np.isfinite(run.history[-1]["lpips"]) and run.history[-1]["lpips"] > 0
    assert all(not torch.equal(p, before[k]) for k, p in finetune.decoder_parameters(model).items())
    with pytest.raises(finetune.FinetuneError, match="needs an LPIPS module"):
        finetune.DecoderFinetune(taef2_model(), recipes.RECIPES["ft-ema"], config, cache, None, None)
