"""Named finetuning recipes. Each is a frozen dataclass: override any field with
``dataclasses.replace(RECIPES["furception"], lr=1e-5)``.

Sources (docs/recipes.md): LDM/taming's ``contperceptual.py`` (adaptive weight, PatchGAN); Stability's
sd-vae-ft-EMA / ft-MSE model cards (L1 + LPIPS / MSE + 0.1 LPIPS, decoder only, EMA); Furception v1.0's
model card and its public trainer drhead/vae_training_tools (Oklab MAE<->MSE, LPIPS, Wasserstein PatchGAN
with LayerNorm and gradient penalty, adaptive weight 0.5, EMA, AdamW betas (0.5, 0.9)).

The published runs train 100k+ steps at batch 32-192 with learning rates around 1e-6. The defaults here are
for what a user runs on their own machine (hundreds to a few thousand steps at batch 4-16): learning rates
were measured on TAEF2 (``bench/efficacy.py``), warm-up is short, and the discriminator starts at once.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace


@dataclass(frozen=True)
class Recipe:
    name: str
    summary: str
    # reconstruction ------------------------------------------------------------------------------
    pixel_space: str = "oklab"  # "oklab" (MAE/MSE per Oklab channel) or "rgb" (on [-1, 1], as LDM)
    mse_mix_start: float = 0.0  # share of MSE in the MAE<->MSE mix at step 0 ...
    mse_mix_end: float = 0.0  # ... and after ``mse_mix_steps`` (cosine in between)
    mse_mix_steps: int = 1
    oklab_weights: tuple[float, float, float] = (1.0, 2.0, 2.0)
    mse_scale: float = 0.01  # Oklab error at which MAE and MSE are equal (see training.losses)
    lpips_weight: float = 0.0
    lpips_net: str = "vgg"
    pixel_blur: float = 0.0
    detail_weight: float = 0.0  # keeps high-frequency energy where it was (see losses.detail_loss)
    detail_reference: str = "base"  # "base": the decoder's own output before training; "target": the training crop
    detail_target: float = 1.0  # the energy aimed at, as a share of the reference (< 1 trades sharpness for PSNR)
    # adversarial ---------------------------------------------------------------------------------
    gan_weight: float = 0.0  # LDM's disc_weight: GAN gradient = this x reconstruction gradient at the last layer
    gan_start: int = 2000  # step from which the decoder sees the GAN loss ...
    critic_warmup_steps: int = 500  # ... after the critic has trained alone for this many steps
    disc_loss: str = "wasserstein"
    disc_norm: str = "layer"
    gp_weight: float = 10.0
    disc_lr: float = 1e-4
    quantize_fakes: bool = True  # the critic sees 8-bit images, as users do (straight-through for the decoder)
    # optimisation ---------------------------------------------------------------------------------
    lr: float = 3e-5
    warmup_steps: int = 20
    beta1: float = 0.5
    beta2: float = 0.9
    weight_decay: float = 0.0
    base_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999  # at ``ema_batch`` images per step; rescaled to the real batch size
    ema_batch: int = 32

    def __post_init__(self):
        if not 0.0 <= self.pixel_blur < 1.0:
            raise ValueError(
                f"pixel_blur must be in [0, 1) (0 = off; 0.3 in furception-nolpips), got {self.pixel_blur}"
            )
        if not self.base_decay >= 0.0:
            raise ValueError(
                f"base_decay must be 0 (off) or positive (3000 in furception-nolpips), got {self.base_decay}"
            )

    @property
    def uses_lpips(self) -> bool:
        return self.lpips_weight > 0

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe(
            "furception",
            "Furception v1.0: Oklab MAE→MSE mix, LPIPS-VGG, LayerNorm PatchGAN (Wasserstein + gradient penalty, "
            "adaptive weight 0.5), EMA",
            pixel_space="oklab",
            mse_mix_start=0.1,
            mse_mix_end=0.4,
            mse_mix_steps=2000,
            lpips_weight=1.0,
            gan_weight=0.5,
        ),
        Recipe(
            "furception-nolpips",
            "Furception without LPIPS (needs no downloaded weights): Oklab MAE→MSE mix seen through a fixed "
            "fine-band blur (keeps detail without LPIPS), LayerNorm PatchGAN (Wasserstein + gradient penalty, "
            "adaptive weight 0.5), decay toward the starting weights, EMA",
            pixel_space="oklab",
            mse_mix_start=0.1,
            mse_mix_end=0.4,
            mse_mix_steps=2000,
            gan_weight=0.5,
            pixel_blur=0.3,
            base_decay=3000.0,
        ),
        Recipe(
            "ft-mse",
            "sd-vae-ft-MSE: MSE + 0.1·LPIPS in RGB, decoder only, EMA",
            pixel_space="rgb",
            mse_mix_start=1.0,
            mse_mix_end=1.0,
            lpips_weight=0.1,
            lpips_net="vgg",
        ),
        Recipe(
            "ft-ema",
            "sd-vae-ft-EMA: L1 + LPIPS in RGB, decoder only, EMA",
            pixel_space="rgb",
            mse_mix_start=0.0,
            mse_mix_end=0.0,
            lpips_weight=1.0,
            lpips_net="vgg",
        ),
    )
}

DEFAULT_RECIPE = "furception"
FALLBACK_RECIPE = "furception-nolpips"  # what "furception" becomes when no LPIPS weights are found


def resolve_recipe(name: str, lpips_available: bool) -> tuple[Recipe, str | None]:
    """(recipe, note): the named recipe, or its no-LPIPS fallback with a note saying so."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    recipe = RECIPES[name]
    if recipe.uses_lpips and not lpips_available:
        if name == "furception":
            return RECIPES[FALLBACK_RECIPE], (
                f"LPIPS-{recipe.lpips_net.upper()} weights not found: trained with "
                f"'{FALLBACK_RECIPE}' instead (put vgg16-397923af.pth in models/lpips "
                "to use the full recipe)"
            )
        raise ValueError(
            f"recipe {name!r} needs LPIPS-{recipe.lpips_net.upper()} weights: put "
            f"{'vgg16-397923af.pth' if recipe.lpips_net == 'vgg' else 'alexnet-owt-7be5be79.pth'} in "
            "ComfyUI/models/lpips (or $TORCH_HOME/hub/checkpoints), or pick furception-nolpips"
        )
    return recipe, None


class RecipeError(ValueError):
    """A recipe override that does not exist (the message lists the fields)."""


def recipe_with(recipe: Recipe, **overrides) -> Recipe:
    """The recipe with some fields replaced (unknown names are an error that lists the valid ones)."""
    try:
        return replace(recipe, **overrides)
    except TypeError as exc:
        raise RecipeError(f"unknown recipe field: {exc}; fields are {', '.join(recipe.as_dict())}") from exc
