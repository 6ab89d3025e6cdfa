"""rFID (opt-in, through pytorch-fid): the FID Inception is built from a weights file the user supplies, read with
weights_only=True (never downloaded); here a random-weight file in the real layout stands in for
pt_inception-2015-12-05-6726825d.pth."""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
import torch
from scipy import linalg
from test_finetune import photos

from training import rfid

pytest.importorskip("pytorch_fid")


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    from pytorch_fid import inception as fid_inception

    with (
        mock.patch.object(fid_inception, "load_state_dict_from_url", lambda *a, **k: {}),
        mock.patch("torchvision.models.inception.Inception3.load_state_dict", lambda self, *a, **k: None),
    ):
        torch.manual_seed(0)
        net = fid_inception.fid_inception_v3()  # the real FID layout, random weights
    path = tmp_path_factory.mktemp("inception") / rfid.WEIGHTS_FILE
    torch.save(net.state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def crops():
    arrays = photos(("astronaut.png", "coffee.png", "grass.png", "chelsea.png"))
    tiles = [
        torch.from_numpy(a[y : y + 128, x : x + 128]).permute(2, 0, 1) for a in arrays for y, x in ((0, 0), (128, 128))
    ]
    return torch.stack(tiles)


def test_rfid_is_zero_for_identical_sets_grows_with_damage_and_matches_the_closed_form(weights_file, crops):
    model = rfid.inception(weights_file)
    noisy = (crops + 0.3 * torch.randn(crops.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    values, warning = rfid.rfid_per_decoder(model, crops, {"same": crops, "noisy": noisy})  # each costs a 2048² sqrtm
    # random weights give small features, so compare scale-free: identical sets sit at rounding level
    assert values["noisy"] > 0 and abs(values["same"]) < 1e-3 * values["noisy"]
    assert "biased and noisy" in warning and str(crops.shape[0]) in warning
    # independently: ‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2 (Σ₁Σ₂)^½) with scipy on the same features
    a, b = rfid.features(model, crops), rfid.features(model, noisy)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with np.errstate(all="ignore"):
        root = linalg.sqrtm(s1 @ s2).real  # 8 images: singular covariances, as in pytorch-fid's own computation
    expected = float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * root))
    assert values["noisy"] == pytest.approx(expected, rel=1e-3)


def test_missing_weights_and_code_pickles_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    assert rfid.find_weights([str(tmp_path)]) is None

    class Payload:
        def __reduce__(self):
            return (exec, ("raise SystemExit('pickle code ran')",))

    torch.save({"w": torch.zeros(1), "x": Payload()}, tmp_path / rfid.WEIGHTS_FILE)
    assert rfid.find_weights([str(tmp_path)]) == str(tmp_path / rfid.WEIGHTS_FILE)
    from training.files import WeightFileError

    with pytest.raises(WeightFileError, match="refused"):
        rfid.inception(str(tmp_path / rfid.WEIGHTS_FILE))
    with pytest.raises(ValueError, match="at least 2 images"):
        rfid.rfid_per_decoder(torch.nn.Identity(), torch.zeros(1, 3, 8, 8), {})
