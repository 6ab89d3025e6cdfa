"""The half of each autoencoder VAE Lab trains: which family a model is, its decoder's parameters (by canonical
key, ``layouts.is_decoder_key``: the decoder, plus ``post_quant_conv`` for SD/SDXL; ``up_blocks`` + ``out_block`` for
Stable Cascade stage A), the last layer LDM's adaptive GAN weight looks at, and gradient checkpointing per block."""

from __future__ import annotations

import torch
from torch import nn

from . import layouts
from .klf8 import KlAutoencoder
from .stage_a import StageAAutoencoder
from .taesd import TinyAutoencoder


class FinetuneError(ValueError):
    """A finetune that cannot run as asked; the message says what to change."""


def family_of(model: nn.Module) -> str:
    if isinstance(model, KlAutoencoder):
        return layouts.KL
    if isinstance(model, TinyAutoencoder):
        return layouts.TINY
    if isinstance(model, StageAAutoencoder):
        return layouts.STAGE_A
    raise FinetuneError(
        f"cannot finetune a {type(model).__name__}: VAE Lab trains kl-f8 (SD/SDXL/SD3/FLUX.1), "
        "TAESD-family and Stable Cascade stage A decoders"
    )


def decoder_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The trainable half, by canonical key: decoder (+ post_quant_conv for kl)."""
    family = family_of(model)
    return {name: p for name, p in model.named_parameters() if layouts.is_decoder_key(family, name)}


def last_decoder_layer(model: nn.Module) -> torch.Tensor:
    """W of LDM's adaptive weight: the decoder's final conv."""
    if isinstance(model, KlAutoencoder):
        return model.decoder.conv_out.weight
    if isinstance(model, StageAAutoencoder):
        return model.out_block[0].weight
    return model.decoder[-1].weight


class DecoderView(nn.Module):
    """Presents just the trainable parameters (canonical names) to EMA."""

    def __init__(self, model: nn.Module, params: dict[str, nn.Parameter]):
        super().__init__()
        self._params = params

    def named_parameters(self, *args, **kwargs):
        return iter(self._params.items())

    def named_buffers(self, *args, **kwargs):
        return iter(())


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder block's activations in the backward pass (less memory, ~30 % more compute).
    Patches instance ``forward``s, so parameter names (and saved files) are unchanged."""
    from torch.utils.checkpoint import checkpoint

    from .klf8 import ResnetBlock
    from .stage_a import MixingBlock
    from .taesd import Block

    decoder = model.up_blocks if isinstance(model, StageAAutoencoder) else model.decoder
    for module in decoder.modules():
        if isinstance(module, (ResnetBlock, Block, MixingBlock)) and not getattr(module, "_checkpointed", False):
            forward = module.forward
            module.forward = lambda x, forward=forward: checkpoint(forward, x, use_reentrant=False)
            module._checkpointed = True
