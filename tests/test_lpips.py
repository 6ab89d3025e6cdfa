import os

import lpips
import pytest
import torch

from training import perceptual
from training.metrics import reconstruction_metrics


@pytest.fixture()
def isolated_search(tmp_path, monkeypatch):
    """No real TORCH_HOME, no extra search folders: only what the test puts there."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(perceptual, "SEARCH_DIRS", [])
    return tmp_path


def _reference_and_backbone_file(net, folder):
    """The lpips package's own model with a random backbone, and that backbone saved the way torchvision
    ships it (``features.<i>.*``), so ours can load identical weights from a file."""
    torch.manual_seed(0)
    reference = lpips.LPIPS(net=net, pnet_rand=True, verbose=False).eval()
    features = {}
    for slice_name, layers in reference.net.named_children():
        for index, layer in layers.named_children():
            for name, value in layer.state_dict().items():
                features[f"features.{index}.{name}"] = value.clone()
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, perceptual.BACKBONES[net].filename)
    torch.save(features, path)
    return reference, path


@pytest.mark.parametrize("net", ["vgg", "alex"])
def test_parity_with_lpips_package(net, isolated_search, photo_crops):
    reference, path = _reference_and_backbone_file(net, isolated_search / "weights")
    ours = perceptual.Lpips(net, backbone_path=path)
    a, b = photo_crops[:2], photo_crops[2:4]
    with torch.no_grad():
        expected = reference(a, b, normalize=True).flatten()  # lpips maps [0,1] -> [-1,1] itself here
        got = ours(a, b)
    assert torch.allclose(got, expected, atol=1e-6)
    assert (got > 0).all()


def test_search_order_explicit_then_registered_then_torch_home(isolated_search):
    _, in_torch_home = _reference_and_backbone_file("alex", perceptual.torch_hub_checkpoints_dir())
    assert perceptual.find_backbone_file("alex") == in_torch_home
    _, registered = _reference_and_backbone_file("alex", isolated_search / "models_lpips")
    perceptual.SEARCH_DIRS.append(str(isolated_search / "models_lpips"))
    assert perceptual.find_backbone_file("alex") == registered
    _, explicit = _reference_and_backbone_file("alex", isolated_search / "explicit")
    assert perceptual.find_backbone_file("alex", explicit) == explicit


def test_missing_backbone_is_a_clear_error_never_a_random_network(isolated_search):
    with pytest.raises(perceptual.LpipsWeightsMissing) as info:
        perceptual.Lpips("vgg")
    message = str(info.value)
    assert "vgg16-397923af.pth" in message and perceptual.torch_hub_checkpoints_dir() in message
    with pytest.raises(perceptual.LpipsWeightsMissing, match="does not exist"):
        perceptual.Lpips("vgg", backbone_path=str(isolated_search / "nope.pth"))


def test_metrics_report_lpips_as_unavailable(isolated_search, photo_crops):
    assert perceptual.lpips_if_available("alex") is None
    values = reconstruction_metrics(photo_crops[:1], photo_crops[:1], {"alex": perceptual.lpips_if_available("alex")})
    assert "lpips_alex" not in values


def test_gradients_reach_the_input_not_the_network(isolated_search, photo_crops):
    _, path = _reference_and_backbone_file("alex", isolated_search / "w")
    model = perceptual.Lpips("alex", backbone_path=path)
    x = photo_crops[:1].clone().requires_grad_(True)
    model(x, photo_crops[1:2]).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is None for p in model.parameters())
