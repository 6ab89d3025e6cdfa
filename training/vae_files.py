"""From a weight file (or a state dict) to checked canonical VAE weights, and what to say about them.

``open_vae_file`` is the one road from disk: read safely (``training.files``), peel wrappers and map
keys (``training.layouts``), refuse quantized dtypes, check every tensor's shape against the module
that will hold it. ``pair_with_base`` decides how a decoder-only file gets its encoder.
Every error names the file and what to do.
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from dataclasses import dataclass, field

import torch

from . import layouts
from .files import WeightFileError, read_weight_file, safetensors_keys, wrapped_part
from .klf8 import KlAutoencoder, config_from_state_dict
from .layouts import KL, STAGE_A, TINY, Detected, LayoutError
from .stage_a import StageAAutoencoder
from .stage_a import config_from_state_dict as stage_a_config
from .taesd import TinyAutoencoder

FLOAT_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}

#: Metadata keys shown first (lower-cased substrings), e.g. Furception's licence and version.
METADATA_HIGHLIGHTS = ("title", "version", "licen", "recipe", "author", "description", "architecture")


class VaeFileError(ValueError):
    """Loading failed; the message names the file (or input) and the fix."""


@dataclass
class VaeWeights:
    """Checked canonical weights and where they came from."""

    source: str  # the file name, or "base VAE input"
    detected: Detected
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def family(self) -> str:
        return self.detected.family

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        return self.detected.tensors

    @property
    def dtype(self) -> str:
        counts = Counter(
            FLOAT_DTYPES.get(t.dtype, str(t.dtype))
            for k, t in self.tensors.items()
            if not k.endswith("num_batches_tracked")
        )
        return " + ".join(name for name, _ in counts.most_common())

    def parameter_count(self, decoder_half: bool) -> int:
        return sum(t.numel() for k, t in self.tensors.items() if layouts.is_decoder_key(self.family, k) == decoder_half)


def open_vae_file(path: str | os.PathLike, part_hint: str | None = None) -> VaeWeights:
    path = os.fspath(path)
    name = os.path.basename(path)
    prefix = wrapped_part(safetensors_keys(path)) if path.lower().endswith(".safetensors") else ""
    try:
        tensors, metadata = read_weight_file(path, prefix)
    except WeightFileError as exc:
        raise VaeFileError(str(exc)) from exc
    if not prefix and not path.lower().endswith(".safetensors"):
        part = wrapped_part(tensors)
        tensors = {k: v for k, v in tensors.items() if k.startswith(part)}  # the pickle is memory-mapped
    return weights_from_state_dict(tensors, name, metadata, part_hint)


def weights_from_state_dict(
    sd: dict[str, torch.Tensor], source: str, metadata: dict | None = None, part_hint: str | None = None
) -> VaeWeights:
    try:
        detected = layouts.detect(sd, part_hint)
        check_dtypes(detected.tensors)
        check_shapes(detected)
    except LayoutError as exc:
        raise VaeFileError(f"{source}: {exc}") from exc
    return VaeWeights(source, detected, dict(metadata or {}))


def check_dtypes(tensors: dict[str, torch.Tensor]) -> None:
    bad = sorted(
        {
            str(t.dtype).replace("torch.", "")
            for k, t in tensors.items()
            if t.dtype not in FLOAT_DTYPES and not k.endswith("num_batches_tracked")
        }
    )
    if bad:
        raise LayoutError(
            f"holds {', '.join(bad)} tensors (a quantized or converted file); VAE Lab needs fp32, fp16 "
            "or bf16 weights: use the original release of this VAE"
        )


def expected_shapes(det: Detected) -> dict[str, torch.Size]:
    """Key -> shape of the module the canonical tensors must fill (built on the meta device)."""
    with torch.device("meta"):
        if det.family == KL:
            try:
                config = config_from_state_dict(det.tensors)
            except (KeyError, ValueError) as exc:
                raise LayoutError(f"{det.layout} kl VAE is incomplete: it lacks {exc}; download it again") from exc
            model = KlAutoencoder(config)
        elif det.family == STAGE_A:
            try:
                model = StageAAutoencoder(stage_a_config(det.tensors))
            except (KeyError, ValueError) as exc:
                raise LayoutError(f"{det.layout} stage A is incomplete: it lacks {exc}; download it again") from exc
        else:
            model = TinyAutoencoder(det.latent_channels, det.midblock_groupnorm)
    return {k: v.shape for k, v in model.state_dict().items()}


def check_shapes(det: Detected) -> None:
    """Every tensor of the halves present has the right shape, none is missing, none is extra."""
    if det.family == TINY:
        width = det.tensors.get("decoder.1.weight", det.tensors.get("encoder.0.weight"))
        if width is not None and width.shape[0] != 64:
            raise LayoutError(
                "this is a 32x-downscaling tiny autoencoder (TAESANA, Sana's DC-AE latent space); "
                "ComfyUI has no Sana models to use it with, so VAE Lab does not load it"
            )
    expected = expected_shapes(det)
    # only the halves the file holds are required (a decoder-only file is complete without an encoder)
    required = {k for k in expected if (det.has_decoder if layouts.is_decoder_key(det.family, k) else det.has_encoder)}
    missing = sorted(required - set(det.tensors))
    extra = sorted(set(det.tensors) - set(expected))
    wrong = [
        f"{k} is {tuple(t.shape)}, expected {tuple(expected[k])}"
        for k, t in det.tensors.items()
        if k in expected and t.shape != expected[k]
    ]
    if missing or extra or wrong:
        problems = []
        if missing:
            problems.append(f"missing {len(missing)} tensors ({layouts._first_keys(missing, 3)})")
        if extra:
            problems.append(f"{len(extra)} unexpected tensors ({layouts._first_keys(extra, 3)})")
        if wrong:
            problems.append(f"wrong shapes: {'; '.join(wrong[:3])}")
        raise LayoutError(
            f"{det.layout} {det.family_name} file does not fit its architecture: {', '.join(problems)}. "
            "The file is incomplete or from a different model: download it again or pick the right file"
        )


# ----------------------------------------------------------------------------------------------
# decoder + base


@dataclass
class Pairing:
    """How a VAE is put together: ``merged`` (one family, one module) or a hybrid of two modules."""

    decoder: VaeWeights
    encoder: VaeWeights | None  # None: the decoder file's own encoder
    merged_tensors: dict[str, torch.Tensor] | None  # set when both halves live in one module
    notes: list[str]


def pair_with_base(
    decoder: VaeWeights,
    base: VaeWeights | None,
    base_latent_channels: int | None = None,
    use_base_encoder: bool = False,
    allow_merge: bool = True,
) -> Pairing:
    """Decide where the encoding half comes from.

    The decoder file's own encoder is used unless ``use_base_encoder``; a decoder-only file needs a
    base. ``base`` may be None when the base is a host object whose weights this pack cannot read but
    whose latent channel count is known (``base_latent_channels``): then a hybrid is the only way.
    Halves of one family are merged into one module unless ``allow_merge`` is False (e.g. two TAESD
    variants with different latent scales, which one module cannot hold).
    """
    det = decoder.detected
    if not det.has_decoder:
        raise VaeFileError(f"{decoder.source}: holds only an encoder; pick a decoder file (or a full VAE)")
    has_base = base is not None or base_latent_channels is not None
    if det.has_encoder and not (use_base_encoder and has_base):
        if use_base_encoder:
            raise VaeFileError(
                f"{decoder.source}: 'encoder' is set to the base, but no base VAE is connected "
                "or chosen; connect base_vae or pick base_file"
            )
        return Pairing(decoder, None, det.tensors, [])
    if not has_base:
        raise VaeFileError(
            f"{decoder.source}: this file holds only a decoder ({det.family_name}); VAE Lab will not invent an "
            "encoder. Connect a base_vae (or pick a base_file) from the same latent space, e.g. the VAE this "
            "decoder was finetuned from"
        )
    channels = base.detected.latent_channels if base is not None else base_latent_channels
    base_name = base.source if base is not None else "the base VAE"
    if channels != det.latent_channels:
        raise VaeFileError(
            f"{decoder.source}: this decoder takes {det.latent_channels}-channel latents but {base_name} makes "
            f"{channels}-channel latents: they are different latent spaces. Pick a base from the decoder's own "
            "family (e.g. the SDXL VAE for an SDXL decoder)"
        )
    if base is not None and not base.detected.has_encoder:
        raise VaeFileError(f"{base.source}: the base holds no encoder either; pick a full VAE as the base")
    notes = [f"encoder from {base_name}"]
    if base is not None and base.family != det.family and STAGE_A in (base.family, det.family):
        raise VaeFileError(
            f"{decoder.source} ({det.family_name}) and {base_name} ({base.detected.family_name}) are "
            "different latent spaces; a stage A decoder pairs only with a stage A encoder"
        )
    if base is None or base.family != det.family or not allow_merge:
        return Pairing(decoder, base, None, notes)
    enc_half, _ = layouts.split_parts(base.detected)
    _, dec_half = layouts.split_parts(det)
    merged = {**enc_half, **dec_half}
    if det.family == KL:
        base_quant = "quant_conv.weight" in enc_half
        if "post_quant_conv.weight" not in dec_half and base_quant:
            merged.update({k: v for k, v in base.tensors.items() if k.startswith("post_quant_conv.")})
            notes.append(f"post_quant_conv from {base_name}")
        elif "post_quant_conv.weight" in dec_half and not base_quant:
            raise VaeFileError(
                f"{decoder.source}: this decoder has a post_quant_conv (SD/SDXL style) but {base_name} has no "
                "quant_conv (SD3/FLUX style): different latent spaces. Pick the base this decoder was made for"
            )
    merged_det = Detected(
        det.family, det.layout, merged, det.latent_channels, True, True, midblock_groupnorm=det.midblock_groupnorm
    )
    try:
        check_shapes(merged_det)
    except LayoutError as exc:
        raise VaeFileError(f"{decoder.source} with the encoder of {base_name}: {exc}") from exc
    return Pairing(decoder, base, merged, notes)


def join_files(decoder: VaeWeights, encoder: VaeWeights, source: str) -> VaeWeights:
    """One full set of weights from separate encoder and decoder files (madebyollin's pairs)."""
    pairing = pair_with_base(decoder, encoder)
    detected = dataclasses.replace(decoder.detected, tensors=pairing.merged_tensors, has_encoder=True)
    return VaeWeights(source, detected, {**encoder.metadata, **decoder.metadata})


# ----------------------------------------------------------------------------------------------
# what the node shows


def metadata_lines(metadata: dict[str, str], limit: int = 12, width: int = 120) -> list[str]:
    """The file's safetensors metadata, licence/version/recipe first; long values shortened."""
    keys = sorted(metadata, key=lambda k: (not any(h in k.lower() for h in METADATA_HIGHLIGHTS), k))
    lines = []
    for key in keys[:limit]:
        value = " ".join(str(metadata[key]).split())
        lines.append(f"  {key}: {value[:width] + '…' if len(value) > width else value}")
    if len(keys) > limit:
        lines.append(f"  (+{len(keys) - limit} more metadata entries)")
    return lines


def describe_weights(w: VaeWeights) -> list[str]:
    det = w.detected
    lines = [
        f"{w.source}: {det.family_name}",
        f"  layout {det.layout}" + (f" inside '{det.wrapper}'" if det.wrapper else "") + f", {det.parts}, {w.dtype}",
        "  parameters: "
        + ", ".join(
            f"{half} {w.parameter_count(half == 'decoder') / 1e6:.2f} M"
            for half, present in (("encoder", det.has_encoder), ("decoder", det.has_decoder))
            if present
        ),
    ]
    lines += [f"  {note}" for note in det.notes]
    if w.metadata:
        lines.append("  metadata:")
        lines += metadata_lines(w.metadata)
    return lines


def build_autoencoder(
    family: str, tensors: dict[str, torch.Tensor], latent_scale: float = 1.0, latent_shift: float = 0.0
) -> torch.nn.Module:
    """Our module for canonical tensors (strict; decoder-only when the encoder half is absent)."""
    if family == KL:
        return KlAutoencoder.from_state_dict(tensors)
    if family == STAGE_A:
        return StageAAutoencoder.from_state_dict(tensors)
    return TinyAutoencoder.from_canonical(tensors, latent_scale, latent_shift)
