"""Comparison nodes: VAE List, Compare Reconstructions, Compare Decoders on a Latent.

Glue only: VAEs are run through the host's own encode/decode (what VAE Encode / VAE Decode do), and every
number and picture comes from ``training.compare``.
"""

from __future__ import annotations

import math
import os
import uuid

import torch
from comfy_api.latest import io

from ..training import compare, perceptual
from .common import CATEGORY, summary_ui
from .host import comfy_from_images01, images01_from_comfy

VaeList = io.Custom("VAE_LAB_VAE_LIST")
MODES = ["autoencoders", "shared encoder"]
LPIPS_CHOICES = ["if weights are found", "off"]
LPIPS_MISSING = "no weights (see README: LPIPS weights)"


def _default_label(vae, position: int) -> str:
    source = getattr(vae, "vae_lab_source", None) or {}
    name = source.get("file") or f"VAE {position}"
    return os.path.splitext(os.path.basename(name))[0] if isinstance(name, str) else f"VAE {position}"


class VAEList(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VAELab_VAEList",
            display_name="VAE List",
            category=CATEGORY,
            description="Adds a labelled VAE to a list for Compare Reconstructions, Compare Decoders on a Latent and "
            "Merge VAEs. Chain one per VAE: the first node's list goes into the next node's vae_list.",
            inputs=[
                io.Vae.Input("vae", tooltip="A VAE to compare or merge (from any loader)."),
                io.String.Input("label", default="", tooltip="Its name in tables and pictures; empty = the file name."),
                VaeList.Input(
                    "vae_list", optional=True, tooltip="The list so far (from another VAE List); empty starts one."
                ),
            ],
            outputs=[VaeList.Output("vaes", display_name="vae_list", tooltip="The list with this VAE appended.")],
        )

    @classmethod
    def execute(cls, vae, label, vae_list=None) -> io.NodeOutput:
        entries = list(vae_list or [])  # a new list: the cached input is never changed
        name = label.strip() or _default_label(vae, len(entries) + 1)
        taken = {e["label"] for e in entries}
        unique, n = name, 2
        while unique in taken:
            unique, n = f"{name} ({n})", n + 1
        entries.append({"label": unique, "vae": vae})
        return io.NodeOutput(entries)


def _space(vae, label: str, encoder_side: bool) -> compare.LatentSpace:
    source = getattr(vae, "vae_lab_source", None) or {}
    ratio = vae.spacial_compression_encode() if encoder_side else vae.spacial_compression_decode()
    return compare.LatentSpace(
        int(vae.latent_channels), int(ratio), compare.space_tag(source.get("variant"), source.get("file"), label)
    )


def _lpips_models(choice: str) -> tuple[dict | None, str]:
    if choice == "off":
        return None, ""
    models = {net: perceptual.lpips_if_available(net) for net in ("alex", "vgg")}
    return models, LPIPS_MISSING


def _chunks(count: int, size: int):
    for start in range(0, count, size):
        yield slice(start, min(count, start + size))


def _decode(vae, latents: torch.Tensor, tiled: bool, tile_size: int) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] (unclamped) through the host, as VAE Decode (Tiled) does."""
    if tiled:
        ratio = vae.spacial_compression_decode()
        tile = max(8, tile_size // ratio)
        pixels = vae.decode_tiled(latents, tile_x=tile, tile_y=tile, overlap=max(1, tile // 4))
    else:
        pixels = vae.decode(latents)
    if pixels.ndim == 5:  # video VAEs give (B, T, H, W, C)
        pixels = pixels.reshape(-1, *pixels.shape[-3:])
    return pixels.movedim(-1, 1).float()


def _encode(vae, images01: torch.Tensor, tiled: bool, tile_size: int) -> torch.Tensor:
    pixels = images01.movedim(1, -1)
    if tiled:
        return vae.encode_tiled(pixels, tile_x=tile_size, tile_y=tile_size, overlap=tile_size // 4)
    return vae.encode(pixels)


def _ab_preview(a: torch.Tensor, b: torch.Tensor, labels: tuple[str, str]) -> dict:
    """Saves the first image of each side to ComfyUI's temp folder for the A/B slider widget."""
    import folder_paths
    import numpy as np
    from PIL import Image

    folder = folder_paths.get_temp_directory()
    os.makedirs(folder, exist_ok=True)
    stem = f"vae_lab_ab_{uuid.uuid4().hex[:12]}"
    files = {}
    for side, image in (("a", a), ("b", b)):
        name = f"{stem}_{side}.png"
        array = (image.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255 + 0.5).astype(np.uint8)
        Image.fromarray(array).save(os.path.join(folder, name), compress_level=1)
        files[side] = {"filename": name, "subfolder": "", "type": "temp"}
    return {**files, "labels": list(labels)}


class CompareReconstructions(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VAELab_CompareReconstructions",
            display_name="Compare Reconstructions",
            category=CATEGORY,
            is_output_node=True,
            description=(
                "Encodes and decodes your images with every VAE of a VAE List and shows the reconstructions side by "
                "side with numbers: PSNR, SSIM, Oklab ΔE, detail ratio and LPIPS (when its weights are present), mean "
                "± std as on the model cards; ΔE heatmaps; zoomed crops where the decoders disagree most; an A/B "
                "slider on the node. 'shared encoder' encodes once and compares only the decoders: the fair test for "
                "finetunes of one decoder."
            ),
            inputs=[
                io.Image.Input(
                    "images", tooltip="Reference images (a batch of one size; crop/resize first if needed)."
                ),
                VaeList.Input("vae_list", tooltip="The VAEs to compare (chain VAE List nodes)."),
                io.Combo.Input(
                    "mode",
                    options=MODES,
                    default=MODES[0],
                    tooltip="autoencoders: each VAE encodes and decodes. shared encoder: one encoder (the "
                    "'encoder' input, else the list's first VAE) makes the latents every decoder decodes.",
                ),
                io.Combo.Input(
                    "lpips",
                    options=LPIPS_CHOICES,
                    default=LPIPS_CHOICES[0],
                    tooltip="LPIPS-Alex/VGG need torchvision's backbone files (README: LPIPS weights); without "
                    "them the column says so.",
                ),
                io.Boolean.Input(
                    "tiled", default=False, tooltip="Tiled encode/decode (VAE Encode/Decode (Tiled)) for large images."
                ),
                io.Int.Input(
                    "tile_size", default=512, min=128, max=4096, step=64, tooltip="Tile side in pixels when tiled."
                ),
                io.Int.Input("chunk_size", default=4, min=1, max=64, tooltip="Images per encode/decode call (memory)."),
                io.Int.Input(
                    "zoom_window",
                    default=64,
                    min=16,
                    max=512,
                    step=8,
                    tooltip="Side of the crop, in pixels, where the decoders disagree most (shown enlarged).",
                ),
                io.Int.Input(
                    "a", default=1, min=1, max=64, tooltip="Which VAE of the list is side A of the slider and image_a."
                ),
                io.Int.Input(
                    "b", default=2, min=1, max=64, tooltip="Which VAE is side B (with one VAE: the reference)."
                ),
                io.Vae.Input(
                    "encoder", optional=True, tooltip="shared encoder mode: the VAE whose encoder makes the latents."
                ),
                io.Boolean.Input(
                    "rfid",
                    default=False,
                    optional=True,
                    tooltip="Also rFID (distribution distance of reconstructions to references). Opt-in: needs "
                    "the pytorch-fid package and pt_inception-2015-12-05-6726825d.pth in models/inception "
                    "(never downloaded), and hundreds of images to mean much.",
                ),
            ],
            outputs=[
                io.Image.Output(
                    "grid",
                    display_name="grid",
                    tooltip="Rows: images; columns: reference, then each VAE, labelled with PSNR.",
                ),
                io.Image.Output(
                    "crops", display_name="zoomed crops", tooltip="Where the decoders disagree most, enlarged."
                ),
                io.Image.Output(
                    "heatmaps", display_name="ΔE heatmaps", tooltip="Oklab ΔE per pixel, one shared scale."
                ),
                io.String.Output("table", display_name="table", tooltip="Markdown table, mean ± std per VAE."),
                io.String.Output(
                    "json", display_name="json", tooltip="Every number, per image and summarised, as JSON."
                ),
                io.Image.Output(
                    "image_a", display_name="image_a", tooltip="Side A's reconstructions (for your own compare nodes)."
                ),
                io.Image.Output("image_b", display_name="image_b", tooltip="Side B's reconstructions."),
            ],
        )

    @classmethod
    def execute(
        cls, images, vae_list, mode, lpips, tiled, tile_size, chunk_size, zoom_window, a, b, encoder=None, rfid=False
    ) -> io.NodeOutput:
        import json

        import comfy.utils

        if not vae_list:
            raise ValueError("Compare Reconstructions: vae_list is empty; connect VAE List nodes")
        labels = [e["label"] for e in vae_list]
        reference = images01_from_comfy(images, "images").clamp(0, 1)  # e.g. Lanczos overshoot: compare what is seen
        warnings = []
        if mode == MODES[1]:
            enc_vae = encoder if encoder is not None else vae_list[0]["vae"]
            enc_name = "encoder" if encoder is not None else labels[0]
            warnings += compare.check_shared_encoder(
                (enc_name, _space(enc_vae, enc_name, True)),
                [(e["label"], _space(e["vae"], e["label"], False)) for e in vae_list],
            )
            ratios = [enc_vae.spacial_compression_encode()]
        else:
            ratios = [e["vae"].spacial_compression_encode() for e in vae_list]
        ratio = math.lcm(*[int(r) for r in ratios])
        reference = compare.crop_to_multiple(reference, ratio)
        count = reference.shape[0]
        steps = len(vae_list) * math.ceil(count / chunk_size) + (
            math.ceil(count / chunk_size) if mode == MODES[1] else 0
        )
        progress = comfy.utils.ProgressBar(steps)
        outputs = {}
        shared = None
        if mode == MODES[1]:
            shared = []
            for part in _chunks(count, chunk_size):
                shared.append(_encode(enc_vae, reference[part], tiled, tile_size))
                progress.update(1)
        for entry in vae_list:
            pieces = []
            for n, part in enumerate(_chunks(count, chunk_size)):
                latents = shared[n] if shared is not None else _encode(entry["vae"], reference[part], tiled, tile_size)
                pieces.append(_decode(entry["vae"], latents, tiled, tile_size).cpu())
                progress.update(1)
            decoded = torch.cat(pieces)
            if decoded.shape[-2:] != reference.shape[-2:]:
                raise ValueError(
                    f"Compare Reconstructions: {entry['label']} returned {decoded.shape[-1]}x{decoded.shape[-2]} "
                    f"for {reference.shape[-1]}x{reference.shape[-2]} input: its encoder and decoder ratios differ"
                )
            outputs[entry["label"]] = decoded
        models, note = _lpips_models(lpips)
        result = compare.compare_reconstructions(reference, outputs, models, note)
        grid = compare.labelled_grid(result)
        crops = compare.most_different_regions(result, window=zoom_window)
        heat, vmax = compare.delta_e_heatmaps(result)
        table = result.table()
        data = result.as_json()
        if rfid:
            values, rfid_warning = _rfid(reference, result.outputs)
            table += "\n\nrFID ↓ (vs the references): " + ", ".join(f"{k} {v:.2f}" for k, v in values.items())
            data["rfid"] = values
            warnings += [rfid_warning] if rfid_warning else []
        data.update(mode=mode, cropped_to_multiple_of=ratio, heatmap_max_delta_e=vmax, warnings=warnings)
        a_label = labels[min(a, len(labels)) - 1]
        b_label = labels[min(b, len(labels)) - 1] if len(labels) > 1 else None
        side_a = result.outputs[a_label]
        side_b = result.outputs[b_label] if b_label else result.reference
        text = "\n".join(
            [f"{mode}: {count} image(s) at {reference.shape[-1]}x{reference.shape[-2]}, {len(labels)} VAE(s)"]
            + [f"WARNING: {w}" for w in warnings]
            + [table]
        )
        ui = summary_ui(text, data)
        ui["vae_lab_ab"] = [_ab_preview(side_a[0], side_b[0], (a_label, b_label or "reference"))]
        return io.NodeOutput(
            comfy_from_images01(grid[None]),
            comfy_from_images01(crops[None]),
            comfy_from_images01(heat[None]),
            table,
            json.dumps(data),
            comfy_from_images01(side_a),
            comfy_from_images01(side_b),
            ui=ui,
        )


def _rfid(reference: torch.Tensor, outputs: dict[str, torch.Tensor]) -> tuple[dict[str, float], str | None]:
    import folder_paths

    from ..training import rfid

    folder = os.path.join(folder_paths.models_dir, "inception")
    path = rfid.find_weights([folder])
    if path is None:
        raise rfid.RfidUnavailable(
            f"Compare Reconstructions: rfid is on but {rfid.WEIGHTS_FILE} is in neither {folder} nor "
            f"torch's cache; download it from {rfid.WEIGHTS_URL} into {folder}, or turn rfid off"
        )
    return rfid.rfid_per_decoder(rfid.inception(path), reference, outputs)


class CompareLatent(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VAELab_CompareLatent",
            display_name="Compare Decoders on a Latent",
            category=CATEGORY,
            is_output_node=True,
            description=(
                "Decodes one LATENT (e.g. your generation, straight from the KSampler) with every VAE of a VAE List: a "
                "labelled grid and reference-free numbers per decoder — detail energy, share of values clipped outside "
                "[0, 1], Oklab lightness / contrast / chroma, and ΔE against the first decoder."
            ),
            inputs=[
                io.Latent.Input("samples", tooltip="The latent to decode (all VAEs must read its latent space)."),
                VaeList.Input("vae_list", tooltip="Decoders of that latent space (chain VAE List nodes)."),
                io.Boolean.Input("tiled", default=False, tooltip="Tiled decode for large latents."),
                io.Int.Input(
                    "tile_size", default=512, min=128, max=4096, step=64, tooltip="Tile side in pixels when tiled."
                ),
            ],
            outputs=[
                io.Image.Output("grid", display_name="grid", tooltip="Rows: latents of the batch; columns: decoders."),
                io.Image.Output(
                    "decoded", display_name="decoded", tooltip="Every decode, decoder after decoder, as one batch."
                ),
                io.String.Output("table", display_name="table", tooltip="Markdown table per decoder."),
                io.String.Output("json", display_name="json", tooltip="Every number as JSON."),
            ],
        )

    @classmethod
    def execute(cls, samples, vae_list, tiled, tile_size) -> io.NodeOutput:
        import json

        import comfy.utils

        if not vae_list:
            raise ValueError("Compare Decoders on a Latent: vae_list is empty; connect VAE List nodes")
        latents = samples["samples"]
        wrong = [
            f"{e['label']} ({e['vae'].latent_channels} channels)"
            for e in vae_list
            if latents.ndim == 4 and e["vae"].latent_channels != latents.shape[1]
        ]
        if wrong:
            raise ValueError(
                f"Compare Decoders on a Latent: the latent has {latents.shape[1]} channels but "
                f"{', '.join(wrong)} read another latent space; remove them or decode a matching latent"
            )
        progress = comfy.utils.ProgressBar(len(vae_list))
        decoded = {}
        for entry in vae_list:
            decoded[entry["label"]] = _decode(entry["vae"], latents, tiled, tile_size).cpu()
            progress.update(1)
        sizes = {tuple(d.shape[-2:]) for d in decoded.values()}
        if len(sizes) > 1:
            raise ValueError(
                f"Compare Decoders on a Latent: the decoders give different sizes {sorted(sizes)}: "
                "they upscale by different ratios, so they are not decoders of one latent space"
            )
        stats = compare.latent_statistics(decoded)
        grid = compare.latent_grid(decoded, stats)
        first = next(iter(decoded.values()))
        table = compare.latent_table(stats)
        data = {label: {k: [float(x) for x in v] for k, v in s.items()} for label, s in stats.items()}
        text = (
            f"{first.shape[0]} latent(s) decoded at {first.shape[-1]}x{first.shape[-2]} by {len(decoded)} decoder(s)\n"
            f"{table}"
        )
        return io.NodeOutput(
            comfy_from_images01(grid[None]),
            comfy_from_images01(torch.cat(list(decoded.values()))),
            table,
            json.dumps(data),
            ui=summary_ui(text, data),
        )
