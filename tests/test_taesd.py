import os

import pytest
import torch

from training import metrics
from training.files import WeightFileError, load_state_dict_file
from training.taesd import TinyAutoencoder, tiny_layout_of

TAEF2 = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "taef2")


def test_taef2_files_load_strictly_into_the_midblock_groupnorm_layout():
    enc = load_state_dict_file(os.path.join(TAEF2, "taef2_encoder.pth"))
    dec = load_state_dict_file(os.path.join(TAEF2, "taef2_decoder.pth"))
    assert tiny_layout_of(enc, "encoder") == (32, True) and tiny_layout_of(dec, "decoder") == (32, True)
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
