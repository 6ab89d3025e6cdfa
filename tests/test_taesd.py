import os

import numpy as np
import pytest
import torch

from training import metrics
from training.files import WeightFileError, load_state_dict_file
from training.layouts import detect
from training.taesd import (
    TinyAutoencoder,
    group_tiny_files,
    load_tiny_autoencoder,
    variant_from_name,
)

TAEF2 = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "taef2")


def test_taef2_files_load_strictly_into_the_midblock_groupnorm_layout():
    enc = load_state_dict_file(os.path.join(TAEF2, "taef2_encoder.pth"))
    dec = load_state_dict_file(os.path.join(TAEF2, "taef2_decoder.pth"))
    for sd, part in ((enc, "encoder"), (dec, "decoder")):
        found = detect(sd)
        assert (found.latent_channels, found.midblock_groupnorm, found.parts) == (32, True, f"{part} only")
    model = TinyAutoencoder(32, midblock_groupnorm=True)
    model.encoder.load_state_dict(enc, strict=True)
    model.decoder.load_state_dict(dec, strict=True)
    plain = TinyAutoencoder(4)
    assert {k for k in plain.decoder.state_dict()} < {k for k in model.decoder.state_dict()}


def test_taef2_reconstructs_real_photos(taef2, photo_crops):
    """Pretrained weights in the right layout reconstruct; a layout mistake would land near 10-15 dB."""
    with torch.no_grad():
        z = taef2.encode(photo_crops)
        out = taef2.decode(z)
    assert z.shape == (4, 32, 16, 16)
    assert float(metrics.psnr(out, photo_crops).mean()) > 26


# madebyollin's own taesd.py (github.com/madebyollin/taesd, commit 5cccb12, "Add support for FLUX.2 VAE") run once
# on the bundled TAEF2 files and the bundled images: TAESD(encoder_path, decoder_path) ->
# decoder(encoder(x)).clamp(0, 1) on each image's central 256x256 crop (RGB, /255), PSNR by scikit-image. Reproduce with
# `python tools/reference_taesd_psnr.py --taesd-py <checkout>/taesd.py`.
MADEBYOLLIN_TAEF2_PSNR = {
    "astronaut.png": 29.6399,
    "chelsea.png": 30.5361,
    "coffee.png": 31.5000,
    "grass.png": 23.8154,
    "hubble_deep_field.jpg": 30.4078,
    "ihc.png": 31.6009,
    "retina.jpg": 35.1665,
    "rocket.jpg": 32.6896,
}


def test_taef2_matches_madebyollins_reference_psnr_on_bundled_images():
    from PIL import Image
    from skimage.metrics import peak_signal_noise_ratio

    from training.data import to_tensor

    model = load_tiny_autoencoder(
        os.path.join(TAEF2, "taef2_encoder.pth"), os.path.join(TAEF2, "taef2_decoder.pth")
    ).eval()
    images = os.path.join(os.path.dirname(TAEF2), "images")
    for name, reference in MADEBYOLLIN_TAEF2_PSNR.items():
        # the reference's inputs exactly: no ICC conversion (rocket.jpg carries a profile that load_image01 applies)
        pixels = np.asarray(Image.open(os.path.join(images, name)).convert("RGB"), dtype=np.float32) / 255
        top, left = (pixels.shape[0] - 256) // 2, (pixels.shape[1] - 256) // 2
        crop = to_tensor(pixels[top : top + 256, left : left + 256])
        with torch.no_grad():
            out = model.decode(model.encode(crop)).clamp(0, 1)
        ours = peak_signal_noise_ratio(crop.double().numpy(), out.double().numpy(), data_range=1.0)
        assert abs(ours - reference) < 0.01, (name, ours, reference)


def test_file_names_pair_up_the_way_madebyollin_names_them():
    pairs, singles = group_tiny_files(
        [
            "taesdxl_encoder.pth",
            "taesdxl_decoder.pth",
            "taef1_decoder.safetensors",
            "my_ft_decoder.safetensors",
            "my_ft_encoder.safetensors",
            "diffusers_tiny.safetensors",
        ]
    )
    assert pairs == {
        "my_ft": ("my_ft_encoder.safetensors", "my_ft_decoder.safetensors"),
        "taesdxl": ("taesdxl_encoder.pth", "taesdxl_decoder.pth"),
    }
    assert singles == ["diffusers_tiny.safetensors", "taef1_decoder.safetensors"]
    assert variant_from_name("taesdxl_decoder.pth").name == "taesdxl"
    assert variant_from_name("taesd_decoder.pth").name == "taesd"
    assert variant_from_name("TAEF2_decoder.pth").latent_shift == 0.0
    assert variant_from_name("my_ft_decoder.pth") is None


def test_weight_files_refuse_code_and_name_the_file(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    torch.save({"x": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(WeightFileError, match="evil.pth: refused"):
        load_state_dict_file(tmp_path / "evil.pth")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(WeightFileError, match="empty"):
        load_state_dict_file(tmp_path / "empty.safetensors")
    good = open(os.path.join(TAEF2, "taef2_decoder.pth"), "rb").read()
    (tmp_path / "cut.pth").write_bytes(good[: len(good) // 3])
    with pytest.raises(WeightFileError, match="cut.pth: not a readable torch file"):
        load_state_dict_file(tmp_path / "cut.pth")
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(WeightFileError, match="bad.safetensors"):
        load_state_dict_file(tmp_path / "bad.safetensors")
