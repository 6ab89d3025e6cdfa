from __future__ import annotations

from comfy_api.latest import io

from ..training import losses, metrics, visualize
from .common import CATEGORY, summary_ui
from .host import comfy_from_images01, images01_from_comfy, matching_batches


class OklabLoss(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VAELab_OklabLoss",
            display_name="Oklab Loss",
            category=CATEGORY,
            description=(
                "Colour difference between two images in Oklab, the perceptual colour space the Furception "
                "recipe trains in: the loss a finetune would see, a per-pixel ΔE heatmap, and where the error "
                "lives (lightness L vs the colour axes a and b)."
            ),
            is_output_node=True,
            inputs=[
                io.Image.Input(
                    "image",
                    tooltip="The image to judge, e.g. a VAE's reconstruction. A batch is compared image by image.",
                ),
                io.Image.Input(
                    "reference",
                    tooltip="The reference image, same size. One reference image is compared against every image of "
                    "the batch.",
                ),
                io.Float.Input(
                    "mse_mix",
                    default=0.5,
                    min=0.0,
                    max=1.0,
                    step=0.05,
                    tooltip="0 = pure MAE (robust, forgiving of a few bad pixels), 1 = pure MSE (punishes large "
                    "misses). MSE is measured in units of mse_scale so the mix is a real mix.",
                ),
                io.Float.Input(
                    "weight_L",
                    default=losses.DEFAULT_CHANNEL_WEIGHTS[0],
                    min=0.0,
                    max=10.0,
                    step=0.1,
                    tooltip="Weight of lightness errors.",
                ),
                io.Float.Input(
                    "weight_a",
                    default=losses.DEFAULT_CHANNEL_WEIGHTS[1],
                    min=0.0,
                    max=10.0,
                    step=0.1,
                    tooltip="Weight of green-red errors. Default 2: a spans half the range of L, so this keeps colour "
                    "from being swamped by lightness.",
                ),
                io.Float.Input(
                    "weight_b",
                    default=losses.DEFAULT_CHANNEL_WEIGHTS[2],
                    min=0.0,
                    max=10.0,
                    step=0.1,
                    tooltip="Weight of blue-yellow errors. Default 2, for the same reason as weight_a.",
                ),
                io.Float.Input(
                    "mse_scale",
                    default=losses.DEFAULT_MSE_SCALE,
                    min=0.0001,
                    max=1.0,
                    step=0.001,
                    round=0.0001,
                    tooltip="Error size (Oklab units) at which the MAE and MSE terms are equal. 0.01 is a typical "
                    "per-channel error of a good VAE.",
                ),
                io.Float.Input(
                    "heatmap_max",
                    default=0.1,
                    min=0.001,
                    max=1.0,
                    step=0.005,
                    round=0.001,
                    tooltip="ΔE shown at full brightness in the heatmap. Keep it fixed to compare heatmaps across "
                    "runs; ~0.02 is a just-visible difference.",
                ),
            ],
            outputs=[
                io.Float.Output(
                    "loss", display_name="loss", tooltip="Weighted Oklab MAE/MSE loss, averaged over the batch."
                ),
                io.Image.Output(
                    "delta_e_heatmap",
                    display_name="ΔE heatmap",
                    tooltip="Per-pixel Oklab ΔE: black = identical, bright = large colour difference.",
                ),
                io.String.Output("summary", display_name="summary", tooltip="The text shown on the node."),
            ],
        )

    @classmethod
    def execute(cls, image, reference, mse_mix, weight_L, weight_a, weight_b, mse_scale, heatmap_max) -> io.NodeOutput:
        output01, reference01 = matching_batches(
            images01_from_comfy(image, "image"), images01_from_comfy(reference, "reference"), "image", "reference"
        )
        weights = (weight_L, weight_a, weight_b)
        if sum(weights) <= 0:
            raise ValueError("Oklab Loss: weight_L, weight_a and weight_b are all 0; set at least one above 0.")
        loss = float(losses.oklab_loss(output01, reference01, mse_mix, weights, mse_scale))
        delta_e = metrics.delta_e_map(output01, reference01)
        split = metrics.oklab_error_split(output01, reference01)
        stats = {"loss": loss, **metrics.delta_e_distribution(delta_e), "images": int(delta_e.shape[0]), **split}
        summary = (
            f"Oklab loss {loss:.5f}  (MSE mix {mse_mix:.2f}, "
            f"weights L {weight_L:g} · a {weight_a:g} · b {weight_b:g})\n"
            f"mean ΔE {stats['mean_delta_e']:.4f}   median {stats['median_delta_e']:.4f}   "
            f"95th pct {stats['p95_delta_e']:.4f}"
            f"   ({stats['images']} image{'s' if stats['images'] != 1 else ''}; ~0.02 is just visible)\n"
            "error split (share of ΔE²): "
            f"L {split['share_L']:.0%} · a {split['share_a']:.0%} · b {split['share_b']:.0%}\n"
            f"mean |ΔL| {split['mean_abs_L']:.4f}   |Δa| {split['mean_abs_a']:.4f}   |Δb| {split['mean_abs_b']:.4f}"
        )
        heat = comfy_from_images01(visualize.heatmap(delta_e, heatmap_max))
        return io.NodeOutput(loss, heat, summary, ui=summary_ui(summary, stats))
