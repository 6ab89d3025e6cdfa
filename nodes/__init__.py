"""ComfyUI nodes of VAE Lab: glue between the graph and ``training/``."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .compare import CompareLatent, CompareReconstructions, VAEList
from .finetune_steps import DecoderFinetuneSteps
from .host import register_model_folders
from .jobs import LoadFinetuneJob, StartFinetuneJob
from .load_tiny_autoencoder import LoadTinyAutoencoder
from .load_vae_decoder import LoadVAEDecoder
from .merge import MergeVAEs, PostHocEMA
from .oklab_loss import OklabLoss
from .save_finetuned_vae import SaveFinetunedVAE
from .stable_cascade import LoadStageA, StableCascadeDecode

NODES: list[type[io.ComfyNode]] = [
    LoadVAEDecoder,
    LoadTinyAutoencoder,
    LoadStageA,
    VAEList,
    CompareReconstructions,
    CompareLatent,
    DecoderFinetuneSteps,
    StartFinetuneJob,
    LoadFinetuneJob,
    SaveFinetunedVAE,
    MergeVAEs,
    PostHocEMA,
    StableCascadeDecode,
    OklabLoss,
]


class VAELabExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES


async def comfy_entrypoint() -> VAELabExtension:
    register_model_folders()
    _start_job_panel()
    return VAELabExtension()


def _start_job_panel() -> None:
    """Routes and the event monitor of the sidebar panel; only with a server (not when nodes are imported alone)."""
    try:
        from server import PromptServer
    except ImportError:
        return
    if getattr(PromptServer, "instance", None) is not None:
        from . import job_panel

        job_panel.start(PromptServer.instance)
