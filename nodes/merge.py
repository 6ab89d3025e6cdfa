"""Nodes that make one decoder out of several: Merge VAEs (weighted average of decoders) and Post-hoc EMA (an EMA
length chosen after training, from a training state's snapshots).

Glue only: the arithmetic is ``training.compare.merge_state_dicts`` and ``training.posthoc``.
"""

from __future__ import annotations

import torch
from comfy_api.latest import io

from ..training import compare, layouts, posthoc, report
from ..training.vae_files import VaeFileError
from .common import CATEGORY, summary_ui
from .compare import VaeList
from .host import images01_from_comfy
from .host_vae import latent_scale_shift, trainable_decoder, vae_with_decoder, weights_or_refusal
from .training_inputs import TrainingState


def _weights(text: str, count: int) -> list[float]:
    if not text.strip():
        return [1.0] * count
    try:
        values = [float(v) for v in text.replace(";", ",").split(",") if v.strip()]
    except ValueError as exc:
        raise ValueError(f"Merge VAEs: weights {text!r} are not numbers; write e.g. '0.5, 0.5'") from exc
    if len(values) != count:
        raise ValueError(f"Merge VAEs: {len(values)} weight(s) for {count} VAEs; give one per VAE, in list order")
    return values


class MergeVAEs(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VAELab_MergeVAEs",
            display_name="Merge VAEs",
            category=CATEGORY,
            description=(
                "Weighted average of the decoders of two or more VAEs of one family and architecture (e.g. two "
                "finetunes of one base); the encoder is the first VAE's. Weights are normalised to sum to 1; a "
                "negative weight extrapolates, with a warning."
            ),
            inputs=[
                VaeList.Input("vae_list", tooltip="The VAEs to merge, in order (chain VAE List nodes)."),
                io.String.Input(
                    "weights", default="", tooltip="One weight per VAE, comma-separated ('0.7, 0.3'); empty = equal."
                ),
            ],
            outputs=[
                io.Vae.Output("merged", display_name="VAE", tooltip="The merged VAE (first VAE's encoder)."),
                io.String.Output("summary", display_name="summary", tooltip="What was merged with which weights."),
            ],
        )

    @classmethod
    def execute(cls, vae_list, weights) -> io.NodeOutput:
        if not vae_list or len(vae_list) < 2:
            raise ValueError("Merge VAEs: connect a VAE List with at least two VAEs")
        labels = [e["label"] for e in vae_list]
        normalised, warning = compare.normalised_weights(_weights(weights, len(vae_list)))
        parts = []
        for entry in vae_list:
            w = weights_or_refusal(entry["vae"], "Merge VAEs")
            parts.append((w, layouts.split_parts(w.detected)[1]))
        family = parts[0][0].family
        other = [labels[i] for i, (w, _) in enumerate(parts) if w.family != family]
        if other:
            raise VaeFileError(
                f"Merge VAEs: {', '.join(other)} are not {parts[0][0].detected.family_name} like {labels[0]}; "
                "merge only VAEs of one family"
            )
        try:
            merged = compare.merge_state_dicts([d for _, d in parts], normalised, labels)
        except compare.MergeError as exc:
            raise ValueError(f"Merge VAEs: {exc}") from exc
        first = vae_list[0]["vae"]
        scale, shift = latent_scale_shift(first, parts[0][0])
        vae = vae_with_decoder(first, family, merged, scale, shift)
        vae.vae_lab_source = {"file": f"merge of {', '.join(labels)}", "licence": None}
        lines = [
            f"decoder = {' + '.join(f'{w:.3f}·{label}' for w, label in zip(normalised, labels))}; "
            f"encoder from {labels[0]}"
        ]
        if warning:
            lines.append("WARNING: " + warning)
        text = "\n".join(lines)
        return io.NodeOutput(
            vae, text, ui=summary_ui(text, {"weights": dict(zip(labels, normalised)), "warning": warning})
        )


class PostHocEMA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VAELab_PostHocEMA",
            display_name="Post-hoc EMA",
            category=CATEGORY,
            description=(
                "Rebuilds the finetuned decoder for an EMA length chosen after training (Karras et al., EDM2: least "
                "squares over the power-function EMA snapshots Decoder Finetune Steps keeps with posthoc_ema on). With "
                "images connected, a table shows held-out metrics for several EMA lengths so the choice is visible."
            ),
            inputs=[
                io.Vae.Input("vae", tooltip="The VAE the training started from (its encoder is used)."),
                TrainingState.Input("training_state", tooltip="From Decoder Finetune Steps run with posthoc_ema on."),
                io.Float.Input(
                    "sigma_rel",
                    default=0.10,
                    min=0.01,
                    max=0.3,
                    step=0.005,
                    round=0.001,
                    tooltip="EMA length relative to the run (EDM2's σ_rel): 0.05 short, 0.10 medium, 0.15+ long.",
                ),
                io.String.Input(
                    "table_lengths",
                    default="0.05, 0.10, 0.15, 0.20",
                    tooltip="σ_rel values for the metrics table (with images connected).",
                ),
                io.Image.Input("images", optional=True, tooltip="Images never trained on, for the metrics table."),
            ],
            outputs=[
                io.Vae.Output("vae_out", display_name="VAE", tooltip="The VAE with the post-hoc EMA decoder."),
                io.String.Output("table", display_name="table", tooltip="Held-out metrics per EMA length (Markdown)."),
            ],
        )

    @classmethod
    def execute(cls, vae, training_state, sigma_rel, table_lengths, images=None) -> io.NodeOutput:
        snapshots = (training_state.get("posthoc") or {}).get("snapshots") or []
        if not snapshots:
            raise ValueError(
                "Post-hoc EMA: this training_state has no EMA snapshots; run Decoder Finetune Steps with "
                "posthoc_ema on (long enough for a few snapshots: one every 8+ steps)"
            )
        model, family, scale, shift = trainable_decoder(vae, "Post-hoc EMA")
        if family != training_state.get("family") or set(snapshots[0]["tensors"]) != set(
            dict(model.named_parameters())
        ):
            raise ValueError(
                "Post-hoc EMA: the training_state belongs to another decoder; connect the VAE it was trained from"
            )
        tensors = posthoc.posthoc_ema(snapshots, sigma_rel)
        lines = [
            f"post-hoc EMA σ_rel {sigma_rel:g} at step {max(s['step'] for s in snapshots)} "
            f"from {len(snapshots)} snapshots"
        ]
        values = {"sigma_rel": sigma_rel, "snapshots": len(snapshots)}
        table = ""
        if images is not None:
            reference = images01_from_comfy(images, "images").clamp(0, 1)
            reference = compare.crop_to_multiple(reference, vae.spacial_compression_encode())
            with torch.inference_mode():
                latents = vae.encode(reference.movedim(1, -1)).clone()
            try:
                lengths = [round(float(x), 4) for x in table_lengths.replace(";", ",").split(",") if x.strip()]
            except ValueError as exc:
                raise ValueError(
                    f"Post-hoc EMA: table_lengths {table_lengths!r} are not numbers; write e.g. '0.05, 0.10, 0.15'"
                ) from exc
            with torch.inference_mode(False):
                per_image = posthoc.posthoc_table(
                    model, snapshots, [*lengths, sigma_rel], latents, reference, sigma_rel
                )
            table = report.markdown_table(per_image)
            lines.append(table)
            values["table"] = {k: {m: float(v.mean()) for m, v in d.items()} for k, d in per_image.items()}
        new_vae = vae_with_decoder(vae, family, tensors, scale, shift)
        new_vae.vae_lab_source = getattr(vae, "vae_lab_source", None)
        text = "\n".join(lines)
        return io.NodeOutput(new_vae, table, ui=summary_ui(text, values))
