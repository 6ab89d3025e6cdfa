"""Background finetuning: Start Finetune Job launches the worker (tools/run_job.py, a script file run by ComfyUI's own
Python) on a job folder under output/vae_lab_jobs and returns at once; Load Finetune Job turns the job's newest (or
the chosen) checkpoint into a VAE, while the job trains or after it ended. The worker never touches ComfyUI's
progress bar or interrupt flag: cancelling a generation does not touch a job, and a job never cancels a generation.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from comfy_api.latest import io

from ..training import data, finetune, jobs, layouts
from ..training.files import read_weight_file
from . import training_inputs as inputs
from .common import CATEGORY, summary_ui
from .finetune_steps import WEIGHTS, image_source
from .host import output_folder, training_device
from .host_vae import full_vae, latent_scale_shift, weights_or_refusal
from .training_inputs import BUNDLED

JOBS = "vae_lab_jobs"
SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "run_job.py")


def jobs_root() -> str:
    root = output_folder(JOBS)
    os.makedirs(root, exist_ok=True)
    return root


def launch_worker(folder: str) -> subprocess.Popen:
    """Runs tools/run_job.py on ``folder`` with ComfyUI's own Python in its own session (so Ctrl+C in ComfyUI's
    terminal does not kill it mid-write); it watches ComfyUI's pid and checkpoints and stops when ComfyUI is gone."""
    # a ComfyUI started under a launcher must not pass its torch.distributed variables on: this worker is one process
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    # its own session / process group: Ctrl+C in ComfyUI's terminal does not hit it mid-write (it stops by itself,
    # with a checkpoint, when ComfyUI is gone)
    detach = {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP} if os.name == "nt" else {"start_new_session": True}
    with open(os.path.join(folder, "worker.log"), "ab") as log:
        return subprocess.Popen(
            [sys.executable, SCRIPT, folder, "--device", str(training_device()), "--parent-pid", str(os.getpid())],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            **detach,
        )


def job_names() -> list[str]:
    root = jobs_root()
    return sorted(n for n in os.listdir(root) if os.path.isfile(os.path.join(root, n, "job.json")))


class StartFinetuneJob(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VAELab_StartFinetuneJob",
            display_name="Start Finetune Job",
            category=CATEGORY,
            is_output_node=True,
            description=(
                "Starts a decoder finetune as a background job and returns at once: the queue moves on while it trains "
                "in its own process (your GPU when there is one). Everything the job needs is copied into "
                "output/vae_lab_jobs/<job_name>; checkpoints are crash-safe and a stopped or killed job resumes. Pick "
                "the result up with Load Finetune Job, any time."
            ),
            inputs=[
                io.Vae.Input("vae", tooltip="The VAE whose decoder is trained (its weights are copied into the job)."),
                inputs.folder(default=BUNDLED),
                inputs.recipe(),
                io.Int.Input("total_steps", default=2000, min=1, max=10_000_000, tooltip="Steps of the whole job."),
                io.Int.Input(
                    "checkpoint_interval",
                    default=100,
                    min=1,
                    max=1_000_000,
                    tooltip="Steps between checkpoints: a crash loses at most this many.",
                ),
                inputs.batch_size(),
                inputs.crop_size(),
                inputs.learning_rate(),
                inputs.seed(),
                inputs.held_out_fraction(),
                io.String.Input(
                    "job_name", default="", tooltip="Letters, digits, '_', '-', '.'; empty = vae_lab_<date>_<time>."
                ),
                inputs.images(),
                inputs.gradient_checkpointing(optional=True),
                inputs.training_state(
                    "Continue this run (from Decoder Finetune Steps) as a job: it becomes the job's "
                    "first checkpoint; total_steps counts from the run's start."
                ),
            ],
            outputs=[
                io.String.Output(
                    "job_id", display_name="job_id", tooltip="The job's name (its folder under output/vae_lab_jobs)."
                )
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, **_kwargs):
        return time.time()  # every queueing starts a job (a name that exists is refused with a message)

    @classmethod
    def execute(
        cls,
        vae,
        folder,
        recipe,
        total_steps,
        checkpoint_interval,
        batch_size,
        crop_size,
        learning_rate,
        seed,
        held_out_fraction,
        job_name,
        images=None,
        gradient_checkpointing=False,
        training_state=None,
    ) -> io.NodeOutput:
        weights = weights_or_refusal(vae, "Start Finetune Job")
        if not weights.detected.has_encoder:
            raise ValueError(
                "Start Finetune Job: this VAE's encoder comes from another family (a hybrid); a job needs "
                "one VAE it can copy whole"
            )
        arrays, found = image_source(images, folder, crop_size, "Start Finetune Job")
        paths = list(found.paths) if found is not None else None
        source = (
            f"the IMAGE input ({len(arrays)} images)"
            if found is None
            else found.folder + (f"; {found.skipped.summary()}" if found.skipped.count else "")
        )
        train_idx, held_idx = data.split_or_all(len(paths or arrays), held_out_fraction, seed)
        scale, shift = latent_scale_shift(vae, weights)
        config = finetune.FinetuneConfig(
            batch_size=batch_size,
            crop_size=crop_size,
            seed=seed,
            eval_every=max(checkpoint_interval, 1),
            gradient_checkpointing=gradient_checkpointing,
        )
        spec, note = jobs.new_spec(
            recipe,
            learning_rate,
            config,
            total_steps,
            checkpoint_interval,
            [paths[i] for i in train_idx] if paths else [],
            [paths[i] for i in held_idx] if paths else [],
            weights.family,
            scale,
            shift,
        )
        name = job_name.strip() or time.strftime("vae_lab_%Y%m%d_%H%M%S")
        try:
            job = jobs.create_job(
                jobs_root(),
                name,
                weights.tensors,
                spec,
                [arrays[i] for i in train_idx] if arrays else None,
                [arrays[i] for i in held_idx] if arrays else None,
                training_state,
            )
        except jobs.JobError as exc:
            raise ValueError(f"Start Finetune Job: {exc}") from exc
        process = launch_worker(job)
        lines = [
            f"started job {name} (worker pid {process.pid}) in {job}",
            f"{len(train_idx)} training / {len(held_idx)} held-out images from {source}",
            (
                f"{spec.recipe['name']}, {total_steps} steps, checkpoint every {checkpoint_interval}; "
                "follow it in the VAE Lab panel (sidebar), load it with Load Finetune Job"
            ),
        ]
        if training_state is not None:
            lines.append(f"continues the connected training_state from step {training_state['step']}")
        if note:
            lines.append("NOTE: " + note)
        text = "\n".join(lines)
        return io.NodeOutput(name, ui=summary_ui(text, {"job": name, "pid": process.pid, "folder": job}))


def _checkpoint(job: str) -> str | None:
    paths = jobs.checkpoint_paths(jobs.job_folder(jobs_root(), job))
    return paths[0] if paths else None


class LoadFinetuneJob(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="VAELab_LoadFinetuneJob",
            display_name="Load Finetune Job",
            category=CATEGORY,
            description=(
                "The VAE of a background job's newest checkpoint (EMA weights by default), while it trains or after it "
                "ended, also after ComfyUI restarted. Re-queue to get the newer weights as the job advances."
            ),
            inputs=[
                io.Combo.Input(
                    "job", options=job_names(), tooltip="Jobs in output/vae_lab_jobs (press R to refresh the list)."
                ),
                io.Combo.Input(
                    "weights", options=WEIGHTS, default="ema", tooltip="ema (smoother) or raw (last step's)."
                ),
                io.Int.Input(
                    "step",
                    default=0,
                    min=0,
                    max=10_000_000,
                    optional=True,
                    tooltip="0 = the newest checkpoint; else the checkpoint of that step (the job keeps its "
                    "last few; the error lists them).",
                ),
            ],
            outputs=[
                io.Vae.Output("vae", display_name="VAE", tooltip="The base VAE's encoder with the job's decoder."),
                io.String.Output(
                    "summary", display_name="summary", tooltip="Job state, step and latest held-out metrics."
                ),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, job, weights, step=0):
        path = _checkpoint(job) if job in job_names() else None
        return (path, os.path.getmtime(path), step) if path else None

    @classmethod
    def execute(cls, job, weights, step=0) -> io.NodeOutput:
        folder = jobs.job_folder(jobs_root(), job)
        if not os.path.isfile(os.path.join(folder, "job.json")):
            raise ValueError(f"Load Finetune Job: no job named {job!r} in {jobs_root()}; press R and pick again")
        spec = jobs.load_spec(folder)
        status = jobs.read_json(os.path.join(folder, "status.json"), {}) or {}
        if step:
            try:
                state = jobs.checkpoint_at(folder, step)
            except jobs.JobError as exc:
                raise ValueError(f"Load Finetune Job: {exc}") from exc
        else:
            state = jobs.latest_checkpoint(folder)
        if state is None:
            raise ValueError(
                f"Load Finetune Job: {job} has no checkpoint yet (state {status.get('state')}, step "
                f"{status.get('step')}); queue again after its first checkpoint"
            )
        base, _ = read_weight_file(os.path.join(folder, "base.safetensors"))
        decoder = state["ema"]["shadow"] if weights == "ema" else state["decoder"]
        merged = {**{k: v for k, v in base.items() if not layouts.is_decoder_key(spec.family, k)}, **decoder}
        vae = full_vae(spec.family, merged, spec.latent_scale, spec.latent_shift, f"job {job}")[0]
        vae.vae_lab_source = {"file": f"job {job}", "licence": None}
        vae.vae_lab_training = {
            "recipe": state["recipe"],
            "steps": state["step"],
            "images_seen": state["images_seen"],
            "output_weights": weights,
            "held_out": (state.get("evaluations") or [None])[-1],
            "base_held_out": state.get("base_evaluation"),
            "family": spec.family,
        }
        lines = [
            (
                f"job {job}: {status.get('state')} at step {status.get('step')} / {spec.total_steps}; "
                f"loaded the {weights} weights of step {state['step']}"
            )
        ]
        if state.get("evaluations") and state.get("base_evaluation"):
            base_eval, now = state["base_evaluation"], state["evaluations"][-1]
            lines.append(
                f"held-out: PSNR {base_eval['psnr']:.2f} → {now['psnr']:.2f} dB, Oklab ΔE {base_eval['delta_e']:.4f} → "
                f"{now['delta_e']:.4f}, detail ratio {base_eval['detail_ratio']:.3f} → {now['detail_ratio']:.3f}"
            )
        text = "\n".join(lines)
        return io.NodeOutput(vae, text, ui=summary_ui(text, {"job": job, "step": state["step"], "status": status}))
