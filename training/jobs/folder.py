"""A job folder: its name (which cannot leave the jobs root), the spec in job.json, its status, and making a new one."""

from __future__ import annotations

import os
import re
import time
from dataclasses import asdict, dataclass, field

import torch

from .. import finetune, recipes
from ..files import atomic_write, read_json, save_safetensors_atomic, write_json_atomic

JOB_FORMAT = "vae_lab.job"
JOB_VERSION = 1
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,79}$")
WINDOWS_DEVICES = re.compile(r"^(con|prn|aux|nul|com[0-9]|lpt[0-9])(\..*)?$", re.IGNORECASE)  # not folders there
STATES = ("queued", "running", "paused", "stopped", "interrupted", "done", "failed")


class JobError(ValueError):
    """A job that cannot be made or run as asked; the message says what to change."""


def job_folder(root: str, name: str) -> str:
    """``root/name``, refusing names that could leave ``root`` (separators, '..', hidden names, odd characters)."""
    if (
        not isinstance(name, str)
        or not NAME.match(name)
        or ".." in name
        or name.endswith(".")
        or WINDOWS_DEVICES.match(name)
    ):
        raise JobError(
            f"job name {name!r}: use letters, digits, '_', '-' and '.', starting with a letter or digit, "
            "not ending with '.', not a Windows device name such as NUL or COM1 (at most 80 characters)"
        )
    root_real = os.path.realpath(root)
    path = os.path.realpath(os.path.join(root_real, name))
    if os.path.dirname(path) != root_real:
        raise JobError(f"job name {name!r} leaves the jobs folder")
    return path


@dataclass
class JobSpec:
    """What a job trains; everything the worker needs besides the base weights."""

    recipe: dict  # a full recipe (Recipe.as_dict())
    config: dict  # FinetuneConfig fields
    total_steps: int
    checkpoint_interval: int
    train_images: list[str]
    held_out_images: list[str] = field(default_factory=list)
    family: str = ""
    latent_scale: float = 1.0
    latent_shift: float = 0.0
    keep_last: int = 3
    log_every: int = 5
    threads: int = 0  # 0: torch's default
    lpips_backbone: str | None = None  # the backbone file found when the job was made (LPIPS recipes)
    format: str = JOB_FORMAT
    version: int = JOB_VERSION


def new_spec(
    recipe_name: str,
    learning_rate: float,
    config: finetune.FinetuneConfig,
    total_steps: int,
    checkpoint_interval: int,
    train_images: list[str],
    held_out_images: list[str],
    family: str,
    latent_scale: float = 1.0,
    latent_shift: float = 0.0,
    threads: int = 0,
) -> tuple[JobSpec, str | None]:
    """(spec, note) for a new job: the named recipe (its no-LPIPS fallback, with a note, when the LPIPS weights are not
    found now; the backbone file found is recorded so the worker uses the same one), ``learning_rate`` > 0 overriding
    the recipe's. What Start Finetune Job and tools/make_job.py both make."""
    from ..perceptual import find_backbone_file

    wanted = recipes.RECIPES[recipe_name]
    backbone = find_backbone_file(wanted.lpips_net) if wanted.uses_lpips else None
    recipe, note = recipes.resolve_recipe(recipe_name, backbone is not None)
    if learning_rate > 0:
        recipe = recipes.recipe_with(recipe, lr=learning_rate)
    spec = JobSpec(
        recipe=recipe.as_dict(),
        config=asdict(config),
        total_steps=total_steps,
        checkpoint_interval=checkpoint_interval,
        train_images=list(train_images),
        held_out_images=list(held_out_images),
        family=family,
        latent_scale=latent_scale,
        latent_shift=latent_shift,
        threads=threads,
        lpips_backbone=backbone if recipe.uses_lpips else None,
    )
    return spec, note


def create_job(
    root: str,
    name: str,
    base_tensors: dict[str, torch.Tensor],
    spec: JobSpec,
    train_arrays: list | None = None,
    held_out_arrays: list | None = None,
    initial_state: dict | None = None,
) -> str:
    """Makes ``root/name`` with its base weights, job.json and a 'queued' status. Refuses an existing job.
    ``train_arrays`` / ``held_out_arrays`` (float (H, W, 3) in [0, 1], e.g. an IMAGE batch) are written into the
    job's ``images/`` as 8-bit PNGs and added to the spec's lists, so the job does not depend on the graph.
    ``initial_state`` (a training state, e.g. from Decoder Finetune Steps) becomes the job's first checkpoint: the job
    continues that run."""
    folder = job_folder(root, name)
    if os.path.exists(folder):
        raise JobError(f"a job named {name!r} exists already; pick another name or delete it first")
    if spec.total_steps < 1 or spec.checkpoint_interval < 1:
        raise JobError("total_steps and checkpoint_interval must be at least 1")
    if initial_state is not None:
        if not isinstance(initial_state, dict) or initial_state.get("format") != finetune.STATE_FORMAT:
            raise JobError("training_state: not a VAE Lab training state")
        if initial_state.get("family") != spec.family:
            raise JobError(
                f"training_state: it trains a {initial_state.get('family')} decoder, the VAE is "
                f"{spec.family}; connect the VAE that run started from"
            )
        if initial_state["step"] >= spec.total_steps:
            raise JobError(f"training_state is at step {initial_state['step']} already: raise total_steps above it")
    if not spec.train_images and not train_arrays:
        raise JobError("a job needs training images")
    os.makedirs(os.path.join(folder, "checkpoints"))
    for prefix, arrays, paths in (
        ("train", train_arrays, spec.train_images),
        ("held", held_out_arrays, spec.held_out_images),
    ):
        for i, pixels in enumerate(arrays or []):
            os.makedirs(os.path.join(folder, "images"), exist_ok=True)
            path = os.path.join(folder, "images", f"{prefix}_{i:05d}.png")
            _save_png01(pixels, path)
            paths.append(path)
    save_safetensors_atomic(base_tensors, os.path.join(folder, "base.safetensors"), {"vae_lab.family": spec.family})
    write_json_atomic(os.path.join(folder, "job.json"), asdict(spec))
    if initial_state is not None:
        from .checkpoints import save_checkpoint

        save_checkpoint(folder, initial_state, spec.keep_last)
    write_status(
        folder,
        "queued",
        step=initial_state["step"] if initial_state else 0,
        total=spec.total_steps,
        message="waiting for the worker",
    )
    return folder


def _save_png01(pixels, path: str) -> None:
    import numpy as np
    from PIL import Image

    array = (np.clip(np.asarray(pixels, dtype=np.float32), 0, 1) * 255 + 0.5).astype(np.uint8)
    atomic_write(path, lambda temporary: Image.fromarray(array).save(temporary, format="PNG"))


def write_status(folder: str, state: str, **values) -> dict:
    status = {**read_json(os.path.join(folder, "status.json"), {}), **values, "state": state, "updated": time.time()}
    write_json_atomic(os.path.join(folder, "status.json"), status)
    return status


def load_spec(folder: str) -> JobSpec:
    raw = read_json(os.path.join(folder, "job.json"))
    if not raw or raw.get("format") != JOB_FORMAT:
        raise JobError(f"{folder}: no readable job.json (not a VAE Lab job folder)")
    if raw.get("version", 0) > JOB_VERSION:
        raise JobError(f"{folder}: made by a newer VAE Lab (job format {raw['version']}); update VAE Lab")
    return JobSpec(**{k: v for k, v in raw.items() if k in JobSpec.__dataclass_fields__})
