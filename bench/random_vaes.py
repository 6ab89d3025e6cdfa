"""Random-weight VAE files in the real layouts for the host benchmarks (no real kl-f8/TAESD weights here)."""

from __future__ import annotations

import os
import tempfile


def write_random_vaes() -> str:
    """A scratch folder registered with ComfyUI as vae/ and vae_approx/, holding a full-size SD/SDXL-layout kl-f8
    (``vae/kl4.safetensors``) and a TAESD pair (``vae_approx/taesd_{encoder,decoder}.safetensors``)."""
    import folder_paths
    import torch
    from safetensors.torch import save_file
    from vae_lab.training import klf8, taesd

    scratch = tempfile.mkdtemp(prefix="vae_lab_bench_")
    for folder in ("vae", "vae_approx"):
        os.makedirs(os.path.join(scratch, folder))
        folder_paths.add_model_folder_path(folder, os.path.join(scratch, folder), is_default=True)
    torch.manual_seed(0)
    save_file(klf8.KlAutoencoder().state_dict(), os.path.join(scratch, "vae", "kl4.safetensors"))
    tiny = taesd.TinyAutoencoder(4).state_dict()
    for part in ("encoder", "decoder"):
        save_file(
            {k[len(part) + 1 :]: v for k, v in tiny.items() if k.startswith(part + ".")},
            os.path.join(scratch, "vae_approx", f"taesd_{part}.safetensors"),
        )
    return scratch
