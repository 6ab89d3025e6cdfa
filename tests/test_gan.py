import pytest
import torch
from torch import nn

from training import gan


class LinearCritic(nn.Module):
    """D(x) = <w, x> + c: its input gradient is w everywhere."""

    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(w.clone())

    def forward(self, x):
        return (x * self.w).flatten(1).sum(1) + 0.3


def test_gradient_penalty_is_zero_for_unit_gradient_linear_critic():
    w = torch.randn(3, 8, 8)
    critic = LinearCritic(w / w.norm())
    real, fake = torch.rand(4, 3, 8, 8), torch.rand(4, 3, 8, 8)
    assert float(gan.gradient_penalty(critic, real, fake).detach()) == pytest.approx(0.0, abs=1e-10)


def test_gradient_penalty_value_for_a_steeper_critic():
    w = torch.randn(3, 8, 8)
    critic = LinearCritic(3 * w / w.norm())  # gradient norm 3 -> 10 * (3 - 1)^2
    assert float(
        gan.gradient_penalty(critic, torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)).detach()
    ) == pytest.approx(40.0, rel=1e-5)


def test_gradient_penalty_trains_the_critic():
    critic = LinearCritic(torch.full((3, 4, 4), 1.0))
    gan.gradient_penalty(critic, torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 4)).backward()
    assert critic.w.grad is not None and critic.w.grad.abs().sum() > 0


def test_r1_penalty_of_linear_critic():
    w = torch.randn(3, 4, 4)
    critic = LinearCritic(w)
    assert float(gan.r1_penalty(critic, torch.rand(5, 3, 4, 4), gamma=2.0).detach()) == pytest.approx(
        float(w.pow(2).sum()), rel=1e-5
    )


def test_adaptive_weight_is_the_norm_ratio():
    """Hand-built: rec = sum(3 * W), gan = sum(W * G) -> grads 3*ones and G at W."""
    W = nn.Parameter(torch.ones(2, 2))
    G = torch.tensor([[1.0, 2.0], [2.0, 4.0]])
    rec = (3 * W).sum()
    g = (W * G).sum()
    expected = 0.5 * (3 * 2.0) / (G.norm().item() + 1e-4)  # ||3*ones(2,2)|| = 6
    got = gan.adaptive_gan_weight(rec, g, W, disc_weight=0.5)
    assert float(got) == pytest.approx(expected, rel=1e-6)
    assert not got.requires_grad


def test_adaptive_weight_is_clamped():
    W = nn.Parameter(torch.ones(3))
    got = gan.adaptive_gan_weight((W * 1e9).sum(), (W * 0).sum() + 0 * W.sum(), W, disc_weight=1.0)
    assert float(got) == 1e4


@pytest.mark.parametrize("norm", gan.NORMS)
def test_patch_discriminator_shape_and_norms(norm):
    d = gan.PatchDiscriminator(norm=norm)
    assert d(torch.rand(2, 3, 256, 256)).shape == (2, 1, 30, 30)
    kinds = {type(m).__name__ for m in d.modules()}
    assert {"batch": "BatchNorm2d", "layer": "ChannelLayerNorm", "none": "Conv2d"}[norm] in kinds


def test_layer_norm_discriminator_is_per_sample():
    """Gradient penalties assume a sample's logits do not depend on the rest of the batch."""
    d = gan.PatchDiscriminator(norm="layer").eval()
    x = torch.rand(3, 3, 64, 64)
    assert torch.allclose(d(x)[:1], d(x[:1]), atol=1e-5)


def test_channel_layer_norm_normalises_over_channels():
    norm = gan.ChannelLayerNorm(8)
    y = norm(torch.randn(2, 8, 5, 5) * 4 + 3)
    assert torch.allclose(y.mean(1), torch.zeros(2, 5, 5), atol=1e-5)
    assert torch.allclose(y.var(1, unbiased=False), torch.ones(2, 5, 5), atol=1e-3)


def test_loss_values_on_known_logits():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    assert float(gan.hinge_discriminator_loss(real, fake)) == pytest.approx((0 + 0.5) / 2 + (0 + 1) / 2)
    softplus = torch.nn.functional.softplus
    assert float(gan.softplus_discriminator_loss(real, fake)) == pytest.approx(
        float(softplus(-real).mean() + softplus(fake).mean())
    )
    assert float(gan.wasserstein_discriminator_loss(real, fake, drift=0.1)) == pytest.approx(
        -1.0 - 1.25 + 0.1 * (4 + 0.25) / 2
    )
    assert float(gan.generator_loss(fake, "hinge")) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="GAN loss"):
        gan.generator_loss(fake, "lsgan")
