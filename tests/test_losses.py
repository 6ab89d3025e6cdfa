import colour
import numpy as np
import pytest
import torch

from training.losses import oklab_loss


def _colour_science_loss(out, ref, mix, weights, scale):
    """The documented formula, computed from colour-science's Oklab."""
    lab_out = colour.convert(out.permute(0, 2, 3, 1).double().numpy(), "sRGB", "Oklab")
    lab_ref = colour.convert(ref.permute(0, 2, 3, 1).double().numpy(), "sRGB", "Oklab")
    d = lab_out - lab_ref
    per_channel = ((1 - mix) * np.abs(d) + mix * d**2 / scale).mean(axis=(0, 1, 2))
    w = np.array(weights)
    return float((per_channel * w).sum() / w.sum())


@pytest.mark.parametrize("mix, weights", [(0.0, (1, 2, 2)), (0.5, (1, 2, 2)), (1.0, (1, 1, 1)), (0.3, (0, 1, 0))])
def test_matches_independent_computation(mix, weights):
    g = torch.Generator().manual_seed(1)
    ref = torch.rand(2, 3, 16, 16, generator=g) * 0.9 + 0.1
    out = (ref + 0.05 * torch.randn(2, 3, 16, 16, generator=g)).clamp(0.1, 1)
    ours = float(oklab_loss(out, ref, mix, weights, 0.01))
    assert ours == pytest.approx(_colour_science_loss(out, ref, mix, weights, 0.01), rel=2e-2)


def test_zero_for_identical_images_and_positive_otherwise():
    x = torch.rand(1, 3, 8, 8)
    assert float(oklab_loss(x, x)) == 0.0
    assert float(oklab_loss(x, (x + 0.1).clamp(0, 1))) > 0


def test_channel_weights_are_normalised():
    ref = torch.rand(1, 3, 8, 8)
    out = (ref + 0.05).clamp(0, 1)
    assert float(oklab_loss(out, ref, channel_weights=(1, 1, 1))) == pytest.approx(
        float(oklab_loss(out, ref, channel_weights=(3, 3, 3)))
    )


def test_defaults_keep_chroma_from_being_swamped(photo_crops, taef2):
    """On a real decoder's errors, the default a/b weights give chroma a real share of the loss."""
    with torch.no_grad():
        out = taef2.decode(taef2.encode(photo_crops)).clamp(0, 1)
    only_l = float(oklab_loss(out, photo_crops, channel_weights=(1, 0, 0)))
    ab = 2 * float(oklab_loss(out, photo_crops, channel_weights=(0, 1, 1)))  # sum of the a and b terms
    unweighted_share = ab / (only_l + ab)
    default_share = 2 * ab / (only_l + 2 * ab)
    assert default_share > 0.3 and default_share > 1.4 * unweighted_share


def test_bad_arguments_are_named():
    x = torch.rand(1, 3, 4, 4)
    with pytest.raises(ValueError, match="mse_mix"):
        oklab_loss(x, x, mse_mix=1.5)
    with pytest.raises(ValueError, match="channel_weights"):
        oklab_loss(x, x, channel_weights=(0, 0, 0))
    with pytest.raises(ValueError, match="differ in shape"):
        oklab_loss(x, torch.rand(1, 3, 4, 5))


def test_gradient_flows_to_output():
    ref = torch.rand(1, 3, 8, 8)
    out = torch.rand(1, 3, 8, 8, requires_grad=True)
    oklab_loss(out, ref).backward()
    assert torch.isfinite(out.grad).all() and out.grad.abs().sum() > 0
