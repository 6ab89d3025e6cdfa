"""Decoder finetuning: the encoder is frozen, the decoder learns the user's images.

One loop, read top to bottom in ``DecoderFinetune.train_step``: decode cached latents, reconstruction loss
(Oklab or RGB, MAE<->MSE mix on a schedule, seen through an optional fine-band blur; optional LPIPS and
detail-energy terms), the PatchGAN critic's verdict weighted adaptively, an AdamW step with warm-up and
clipping, the optional pull toward the starting weights, EMA; then one critic step. Every schedule and every
batch is a function of the global step, so a run split into pieces (a ``TrainingState`` handed from one call
to the next) gives the same weights as one run.

Models are this pack's own (``training.klf8.KlAutoencoder``, ``training.taesd.TinyAutoencoder``,
``training.stage_a.StageAAutoencoder``); what is trained is the decoding half only
(``layouts.is_decoder_key``: the decoder, plus ``post_quant_conv`` for SD/SDXL; ``up_blocks`` +
``out_block`` for Stable Cascade stage A). Images are in [0, 1]; the losses see the output clamped to
[0, 1], as a user sees it, so the pretrained decoder's harmless overshoot is not "corrected" into lifted blacks.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from . import gan, losses, metrics, posthoc
from .decoders import (
    DecoderView,
    FinetuneError,
    decoder_parameters,
    enable_gradient_checkpointing,
    family_of,
    last_decoder_layer,
)
from .distributed import Collective
from .ema import EMA, batch_scaled_decay
from .latent_cache import LatentCache
from .recipes import Recipe

STATE_FORMAT = "vae_lab.training_state"
STATE_VERSION = 1


@dataclass(frozen=True)
class FinetuneConfig:
    batch_size: int = 4
    crop_size: int = 128
    seed: int = 0
    crops_per_image: int = 48
    eval_every: int = 0  # held-out evaluation every N steps (0: at the end of each call only)
    eval_size: int = 256  # held-out images: Lanczos short side to this, centre crop
    gradient_checkpointing: bool = False
    channels_last: bool | None = None  # None: on CUDA only
    posthoc_ema: bool = False  # keep EDM2 power-function EMA snapshots
    posthoc_snapshots: int = 16  # at most this many per power EMA (older ones thinned out)
    cache_bytes: int = 1 << 30


# ----------------------------------------------------------------------------------------------
# the run


@dataclass
class HeldOut:
    """Held-out images (never trained on), their latents from the frozen encoder, and the names."""

    images01: torch.Tensor
    latents: torch.Tensor
    names: list[str]


class DecoderFinetune:
    """A finetuning run on one decoder. ``model`` is modified in place; ``state`` continues a run."""

    def __init__(
        self,
        model: nn.Module,
        recipe: Recipe,
        config: FinetuneConfig,
        cache: LatentCache,
        held_out: HeldOut | None = None,
        lpips: nn.Module | None = None,
        state: dict | None = None,
        device: str | torch.device = "cpu",
        collective: Collective | None = None,
    ):
        self.family = family_of(model)
        if recipe.uses_lpips and lpips is None:
            raise FinetuneError(f"recipe {recipe.name} needs an LPIPS module")
        self.device = torch.device(device)
        self.collective = collective or Collective()
        self.collective.check_batch(config.batch_size)
        self.recipe, self.config = recipe, config
        self.cache, self.held_out, self.lpips = cache, held_out, lpips
        self.model = model.to(self.device)
        self.model.requires_grad_(False)
        self.params = decoder_parameters(model)
        for p in self.params.values():
            p.requires_grad_(True)
        self.last_layer = last_decoder_layer(model)
        channels_last = self.device.type == "cuda" if config.channels_last is None else config.channels_last
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        if config.gradient_checkpointing:
            enable_gradient_checkpointing(self.model)
        self.optimizer = torch.optim.AdamW(
            self.params.values(), lr=recipe.lr, betas=(recipe.beta1, recipe.beta2), weight_decay=recipe.weight_decay
        )
        self.critic = None
        if recipe.gan_weight > 0:
            # the critic's initial weights are a function of the seed alone, drawn from a private copy of the CPU
            # generator: the process' global generators (a job's checkpointed training RNG state, the host's) are
            # neither reseeded nor advanced
            with torch.random.fork_rng(devices=[]):
                torch.random.default_generator.manual_seed(config.seed)
                critic = gan.PatchDiscriminator(norm=recipe.disc_norm)
            self.critic = critic.to(self.device)
            self.critic_optimizer = torch.optim.AdamW(
                self.critic.parameters(), lr=recipe.disc_lr, betas=(0.5, 0.9), weight_decay=0.0
            )
        # L2-SP's anchor: the weights this run started from (kept in the state, so a continued run pulls
        # toward the same point; a state from before this field pulls toward the connected VAE's weights)
        self.anchor = {k: p.detach().clone() for k, p in self.params.items()} if recipe.base_decay > 0 else None
        decoder_module = DecoderView(self.model, self.params)
        self.ema = EMA(decoder_module, batch_scaled_decay(recipe.ema_decay, config.batch_size, recipe.ema_batch))
        self.posthoc = posthoc.PowerEmaSnapshots(self.params, config.posthoc_snapshots) if config.posthoc_ema else None
        self.step = 0
        self.images_seen = 0
        self.history: list[dict] = []
        self.evaluations: list[dict] = []
        self.base_evaluation: dict | None = None
        self.skipped_steps = 0
        self.notes: list[str] = []
        if recipe.detail_weight > 0 and recipe.detail_reference == "base":
            known = (
                state.get("reference_energy") if state and state.get("data_fingerprint") == cache.fingerprint else None
            )
            if state is not None and known is None:
                self.notes.append(
                    "different training images than the run being continued: detail reference "
                    "recomputed with the connected VAE's decoder"
                )
            with torch.no_grad():
                cache.set_reference(lambda z: self.model.decode(z.to(self.device)), known)
        if state is not None:
            self.load_state(state)
        elif held_out is not None:
            self.base_evaluation = self.evaluate(use_ema=False, label="base")

    # -- the step ---------------------------------------------------------------------------------

    def lr_at(self, step: int) -> float:
        warm = self.recipe.warmup_steps
        return self.recipe.lr * (min(1.0, (step + 1) / warm) if warm > 0 else 1.0)

    def train_step(self) -> dict:
        recipe, step = self.recipe, self.step
        shard = self.collective.shard  # this process' slice of the global batch (all of it in one process)
        latents, targets = self.cache.batch(step, self.config.batch_size)
        latents, targets = shard(latents).to(self.device), shard(targets).to(self.device)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(step)
        generator = torch.Generator(device="cpu").manual_seed((self.config.seed * 1_000_003 + step) % (2**63))

        with self._autocast():
            out = self.model.decode(latents)
        out01 = out.float().clamp(0, 1)
        rec = losses.pixel_loss(out01, targets, recipe, step)
        logs = {"pixel": float(rec.detach())}
        if recipe.lpips_weight > 0:
            perceptual = self.lpips(out01, targets).mean()
            rec = rec + recipe.lpips_weight * perceptual
            logs["lpips"] = float(perceptual.detach())
        if recipe.detail_weight > 0:
            if recipe.detail_reference == "base":
                reference = shard(self.cache.reference_energies(step, self.config.batch_size))
            else:
                reference = metrics.high_frequency_energy(targets)
            detail = losses.detail_loss(out01, reference * recipe.detail_target)
            rec = rec + recipe.detail_weight * detail
            logs["detail"] = float(detail.detach())
        loss = rec
        fakes = losses.quantize_straight_through(out01) if recipe.quantize_fakes else out01
        if self.critic is not None and step >= recipe.gan_start:
            self.critic.requires_grad_(False)
            g_loss = gan.generator_loss(self.critic(fakes), recipe.disc_loss)
            weight = gan.adaptive_gan_weight(
                rec, g_loss, self.last_layer, recipe.gan_weight, reduce=self.collective.mean_
            )
            loss = rec + weight * g_loss
            logs["gan"], logs["gan_weight"] = float(g_loss.detach()), float(weight)
        logs["loss"] = float(loss.detach())

        self.optimizer.zero_grad(set_to_none=True)
        if self.collective.any(not torch.isfinite(loss)):  # every process skips together
            self.skipped_steps += 1
            logs["skipped"] = True
        else:
            loss.backward()
            self.collective.mean_gradients(self.params.values())
            norm = torch.nn.utils.clip_grad_norm_(self.params.values(), recipe.grad_clip)
            if torch.isfinite(norm):
                self.optimizer.step()
                if self.anchor is not None:
                    self._decay_toward_anchor(min(1.0, self.lr_at(step) * recipe.base_decay))
                self.ema.update(DecoderView(self.model, self.params))
                if self.posthoc is not None:
                    self.posthoc.update(step + 1)
            else:
                self.skipped_steps += 1
                logs["skipped"] = True
        if self.critic is not None and step >= recipe.gan_start - recipe.critic_warmup_steps:
            logs.update(self._critic_step(targets, out01.detach(), generator))
        if self.skipped_steps > 20 and self.skipped_steps > 0.2 * (step + 1):
            raise FinetuneError(
                f"{self.skipped_steps} of {step + 1} steps gave non-finite losses: lower the learning "
                "rate (or train in fp32); nothing non-finite was applied to the weights"
            )
        self.step += 1
        self.images_seen += self.config.batch_size
        logs = self.collective.mean_numbers(logs)
        logs.update(step=self.step, lr=self.lr_at(step))
        self.history.append(logs)
        return logs

    @torch.no_grad()
    def _decay_toward_anchor(self, weight: float) -> None:
        """Decoupled L2-SP (Li et al. 2018, "Explicit inductive bias for transfer learning"): every weight moves
        ``weight`` of the way back to where the run started. Pixel losses on a few images pull a decoder toward
        those images' statistics for as long as it trains; with this pull the held-out gain on other domains
        stays where it peaked instead of fading (docs/recipes.md)."""
        for k, p in self.params.items():
            p.lerp_(self.anchor[k], weight)

    def _critic_step(self, real01: torch.Tensor, fake01: torch.Tensor, generator: torch.Generator) -> dict:
        recipe = self.recipe
        self.critic.requires_grad_(True)
        fake = (fake01 * 255).round() / 255 if recipe.quantize_fakes else fake01
        d_loss = gan.discriminator_loss(self.critic(real01), self.critic(fake), recipe.disc_loss)
        # the random mixes of the whole global batch, this process' slice of them
        alpha = self.collective.shard(torch.rand((self.config.batch_size, 1, 1, 1), generator=generator)).to(real01)
        penalty = gan.gradient_penalty(self.critic, real01, fake, recipe.gp_weight, alpha=alpha)
        total = d_loss + penalty
        self.critic_optimizer.zero_grad(set_to_none=True)
        if not self.collective.any(not torch.isfinite(total)):
            total.backward()
            self.collective.mean_gradients(self.critic.parameters())
            torch.nn.utils.clip_grad_norm_(self.critic.parameters(), 10.0)
            self.critic_optimizer.step()
        return {"critic": float(d_loss.detach()), "gp": float(penalty.detach())}

    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)

    # -- evaluation -------------------------------------------------------------------------------

    @torch.no_grad()
    def decode_with(self, latents: torch.Tensor, use_ema: bool) -> torch.Tensor:
        saved = None
        if use_ema:
            saved = {k: p.detach().clone() for k, p in self.params.items()}
            self.ema.copy_to(DecoderView(self.model, self.params))
        self.model.eval()
        try:
            with self._autocast():
                outs = [
                    self.model.decode(latents[i : i + 1].to(self.device)).float().clamp(0, 1).cpu()
                    for i in range(latents.shape[0])
                ]
        finally:
            if saved is not None:
                for k, p in self.params.items():
                    p.copy_(saved[k])
        return torch.cat(outs)

    def evaluate(self, use_ema: bool = True, label: str = "ema") -> dict:
        out = self.decode_with(self.held_out.latents, use_ema)
        per_image = metrics.reconstruction_metrics(
            out, self.held_out.images01, {self.recipe.lpips_net: self.lpips} if self.lpips is not None else None
        )
        result = {
            "step": self.step,
            "weights": label,
            **{k: float(np.nanmean(v.numpy())) for k, v in per_image.items()},
        }
        if label != "base":
            self.evaluations.append(result)
        return result

    # -- weights and state ------------------------------------------------------------------------

    def decoder_tensors(self, use_ema: bool = True) -> dict[str, torch.Tensor]:
        """Canonical-key fp32 CPU tensors of the trained half (EMA by default); never non-finite."""
        source = self.ema.shadow if use_ema else {k: p.detach() for k, p in self.params.items()}
        tensors = {k: v.detach().float().cpu().clone() for k, v in source.items()}
        bad = [k for k, v in tensors.items() if not torch.isfinite(v).all()]
        if bad:
            raise FinetuneError(f"non-finite values in {bad[:3]}: refusing to hand them out")
        return tensors

    def state_dict(self) -> dict:
        """A self-contained, versioned copy on the CPU (never shares storage with the live run)."""
        state = {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "family": self.family,
            "recipe": self.recipe.as_dict(),
            "config": asdict(self.config),
            "step": self.step,
            "images_seen": self.images_seen,
            "skipped_steps": self.skipped_steps,
            "decoder": self.decoder_tensors(use_ema=False),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "history": list(self.history),
            "evaluations": list(self.evaluations),
            "base_evaluation": self.base_evaluation,
            "data_fingerprint": self.cache.fingerprint,
            "reference_energy": dict(self.cache.reference_energy),
        }
        if self.critic is not None:
            state["critic"] = self.critic.state_dict()
            state["critic_optimizer"] = self.critic_optimizer.state_dict()
        if self.posthoc is not None:
            state["posthoc"] = self.posthoc.state_dict()
        if self.anchor is not None:
            state["anchor"] = {k: v.float() for k, v in self.anchor.items()}  # _cpu_copy makes the copy
        return _cpu_copy(state)

    def load_state(self, state: dict) -> None:
        check_state(state, self.family, self.params)
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(state["decoder"][k].to(p.dtype))
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        for group in self.optimizer.param_groups:  # the recipe of this call rules (a changed lr is honoured)
            group["betas"] = (self.recipe.beta1, self.recipe.beta2)
            group["weight_decay"] = self.recipe.weight_decay
        if self.critic is not None and "critic" in state:
            self.critic.load_state_dict(state["critic"])
            self.critic_optimizer.load_state_dict(copy.deepcopy(state["critic_optimizer"]))
        if self.posthoc is not None and "posthoc" in state:
            self.posthoc.load_state_dict(state["posthoc"])
        if self.anchor is not None:
            if "anchor" in state:
                with torch.no_grad():
                    for k, a in self.anchor.items():
                        a.copy_(state["anchor"][k].to(a.dtype))
            else:
                self.notes.append(
                    "the training state holds no starting weights: base_decay pulls toward the connected VAE's decoder"
                )
        self.step, self.images_seen = state["step"], state["images_seen"]
        self.skipped_steps = state.get("skipped_steps", 0)
        self.history, self.evaluations = list(state["history"]), list(state["evaluations"])
        self.base_evaluation = state.get("base_evaluation")


def check_state(state: dict, family: str, params: dict[str, torch.Tensor]) -> None:
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise FinetuneError("training_state: not a VAE Lab training state")
    if state.get("version") != STATE_VERSION:
        raise FinetuneError(
            f"training_state: version {state.get('version')} is not supported by this VAE Lab "
            f"(expects {STATE_VERSION}); start a new run"
        )
    if state["family"] != family or set(state["decoder"]) != set(params):
        raise FinetuneError(
            "training_state belongs to a different decoder (another family or architecture); "
            "connect the VAE it was trained from, or start a new run"
        )
    wrong = [k for k, p in params.items() if state["decoder"][k].shape != p.shape]
    if wrong:
        raise FinetuneError(
            f"training_state's decoder shapes differ from this VAE's ({wrong[0]}); connect the VAE it was trained from"
        )


def _cpu_copy(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {k: _cpu_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_cpu_copy(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_cpu_copy(v) for v in value)
    return copy.deepcopy(value)
