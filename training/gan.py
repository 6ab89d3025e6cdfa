"""PatchGAN discriminator, GAN losses and the stabilisers the published VAE recipes use.

* ``PatchDiscriminator``: the NLayer PatchGAN of pix2pix / taming / LDM (64-128-256-512 channels, 4x4
  convs, LeakyReLU 0.2; 256² in -> 30x30 logits), with the norm selectable: ``"batch"`` as LDM,
  ``"layer"`` (LayerNorm over channels at each position) as Furception, or ``"none"``. Gradient penalties
  need per-sample norms, so BatchNorm is refused together with them by the trainer.
* Losses: hinge (LDM), softplus / non-saturating (with R1), Wasserstein (with gradient penalty, λ=10).
* ``adaptive_gan_weight``: LDM's balance of the GAN gradient against the reconstruction gradient at the
  decoder's last layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NORMS = ("batch", "layer", "none")


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis of (B, C, H, W), independently at every pixel and sample."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.movedim(1, -1)).movedim(-1, 1)


def _norm_layer(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "layer":
        return ChannelLayerNorm(channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"discriminator norm must be one of {NORMS}, not {kind!r}")


class PatchDiscriminator(nn.Module):
    """NLayer PatchGAN. Input images in [0, 1] are mapped to [-1, 1]; output is (B, 1, h, w) logits."""

    def __init__(self, in_channels: int = 3, width: int = 64, n_layers: int = 3, norm: str = "layer"):
        super().__init__()
        self.norm_kind = norm
        use_bias = norm != "batch"  # a norm with its own shift makes the conv bias redundant
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        channels = width
        for i in range(1, n_layers + 1):
            out_channels = width * min(2**i, 8)
            stride = 2 if i < n_layers else 1
            layers += [
                nn.Conv2d(channels, out_channels, 4, stride=stride, padding=1, bias=use_bias),
                _norm_layer(norm, out_channels),
                nn.LeakyReLU(0.2),
            ]
            channels = out_channels
        layers.append(nn.Conv2d(channels, 1, 4, stride=1, padding=1))
        self.layers = nn.Sequential(*layers)
        self.apply(_init_like_taming)

    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        return self.layers(images01 * 2 - 1)


def _init_like_taming(module: nn.Module) -> None:
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


# --- losses: each takes logits (any shape) and returns a scalar ------------------------------------


def hinge_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()


def softplus_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def wasserstein_discriminator_loss(
    real_logits: torch.Tensor, fake_logits: torch.Tensor, drift: float = 0.0
) -> torch.Tensor:
    """Critic loss E[D(fake)] - E[D(real)], plus the optional drift term ``drift * E[D(real)^2]``."""
    return fake_logits.mean() - real_logits.mean() + drift * real_logits.pow(2).mean()


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor, kind: str) -> torch.Tensor:
    """The critic's loss by name: 'hinge', 'softplus' or 'wasserstein'."""
    losses = {
        "hinge": hinge_discriminator_loss,
        "softplus": softplus_discriminator_loss,
        "wasserstein": wasserstein_discriminator_loss,
    }
    if kind not in losses:
        raise ValueError(f"GAN loss must be hinge, softplus or wasserstein, not {kind!r}")
    return losses[kind](real_logits, fake_logits)


def generator_loss(fake_logits: torch.Tensor, kind: str) -> torch.Tensor:
    """The generator's side: -E[D(fake)] for hinge and Wasserstein, softplus(-D(fake)) for softplus."""
    if kind in ("hinge", "wasserstein"):
        return -fake_logits.mean()
    if kind == "softplus":
        return F.softplus(-fake_logits).mean()
    raise ValueError(f"GAN loss must be hinge, softplus or wasserstein, not {kind!r}")


def _input_gradient_norms(critic: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    inputs = inputs.detach().requires_grad_(True)
    outputs = critic(inputs)
    (grad,) = torch.autograd.grad(outputs.sum(), inputs, create_graph=True)
    return grad.flatten(1).norm(dim=1)


def gradient_penalty(
    critic: nn.Module,
    real: torch.Tensor,
    fake: torch.Tensor,
    weight: float = 10.0,
    generator: torch.Generator | None = None,
    alpha: torch.Tensor | None = None,
) -> torch.Tensor:
    """WGAN-GP (Gulrajani et al. 2017): ``weight * E[(||∇D(x̂)|| - 1)^2]`` at per-sample random mixes x̂.
    ``generator`` (a CPU generator) makes the mixes reproducible; ``alpha`` gives them ((B, 1, 1, 1) in [0, 1])."""
    shape = (real.shape[0], *([1] * (real.ndim - 1)))
    if alpha is not None:
        alpha = alpha.reshape(shape).to(real)
    elif generator is None:
        alpha = torch.rand(shape, device=real.device, dtype=real.dtype)
    else:
        alpha = torch.rand(shape, generator=generator).to(real)
    mixed = alpha * real.detach() + (1 - alpha) * fake.detach()
    return weight * (_input_gradient_norms(critic, mixed) - 1).pow(2).mean()


def r1_penalty(critic: nn.Module, real: torch.Tensor, gamma: float = 10.0) -> torch.Tensor:
    """R1 (Mescheder et al. 2018): ``gamma / 2 * E[||∇D(real)||^2]``."""
    return gamma / 2 * _input_gradient_norms(critic, real).pow(2).mean()


def adaptive_gan_weight(
    reconstruction_loss: torch.Tensor,
    gan_loss: torch.Tensor,
    last_layer_weight: torch.Tensor,
    disc_weight: float = 0.5,
    max_weight: float = 1e4,
    reduce=None,
) -> torch.Tensor:
    """LDM's adaptive weight: ``disc_weight * ||∇_W rec|| / (||∇_W gan|| + 1e-4)``, clamped and detached.

    W is the decoder's last layer; with ``disc_weight`` 0.5 the GAN gradient there is half the
    reconstruction gradient, whatever the losses' raw scales."""
    (rec_grad,) = torch.autograd.grad(reconstruction_loss, last_layer_weight, retain_graph=True)
    (gan_grad,) = torch.autograd.grad(gan_loss, last_layer_weight, retain_graph=True)
    if reduce is not None:  # several processes: the gradients of the global batch, so every process gets one weight
        rec_grad, gan_grad = reduce([rec_grad.clone(), gan_grad.clone()])
    ratio = rec_grad.norm() / (gan_grad.norm() + 1e-4)
    return (ratio.clamp(0.0, max_weight) * disc_weight).detach()
