"""Background finetuning jobs: a job folder that holds everything, and the worker that trains it.

Modules: ``folder`` (names, job.json, status, making a job), ``checkpoints``, ``worker`` (the training loop around
``training.run.TrainingRun``), ``panel`` (what the sidebar panel reads and asks), ``process`` (locks, liveness),
``faults`` (fault injection for the crash tests). The names callers use are re-exported here.

A job folder (``<jobs root>/<name>/``) is self-contained, so the worker can run it from a shell without ComfyUI
(``python tools/run_job.py <job folder>``) and a job survives any crash:

- ``job.json``       what to train: format version, recipe, trainer config, total steps, checkpoint interval,
                     image lists (train / held out), family and latent scale/shift of the base;
- ``base.safetensors`` the base VAE's canonical weights (encoder + decoder), snapshotted when the job was made;
- ``status.json``    state, step / total, images/s, ETA, message, pid — rewritten atomically;
- ``control.json``   a request from outside (``stop`` / ``pause``), polled every step;
- ``metrics.jsonl``  one line per logged step and per held-out evaluation;
- ``preview.png``    target | base decoder | EMA decoder on held-out crops, rewritten atomically at each evaluation;
- ``images/``        the training images of a job started from an IMAGE batch (PNG), when there were any;
- ``checkpoints/step_<8-digit step>.pt`` the trainer's full state (weights, EMA, optimisers, critic, step, data pool
                     fingerprint, format version), written to a temporary file, fsynced, renamed; the last
                     ``keep_last`` kept. A checkpoint that does not load (torn, truncated, wrong format) is skipped
                     and the previous one used.

Every schedule and batch of the trainer is a function of the global step, so a job resumed from a checkpoint
continues exactly where that checkpoint was (bit for bit on a CPU with fixed threads).

Under ``torchrun --nproc_per_node N tools/run_job.py <folder>`` the same worker runs as N ranks kept in step by
``training.distributed`` (each takes 1/N of the global batch; gradients averaged explicitly); rank 0 alone writes
status, metrics, previews and checkpoints (with every rank's RNG state), and broadcasts stop / pause so all ranks stop
together.
"""

from __future__ import annotations

from ..files import read_json, write_json_atomic
from .checkpoints import (
    checkpoint_at,
    checkpoint_path,
    checkpoint_paths,
    checkpoint_step,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from .faults import ROLLBACK_AFTER, Faults
from .folder import (
    JOB_FORMAT,
    JOB_VERSION,
    STATES,
    JobError,
    JobSpec,
    create_job,
    job_folder,
    load_spec,
    new_spec,
    write_status,
)
from .panel import ACTIVE, MetricsTail, actions_for, delete_job, job_summary, request, worker_alive
from .process import alive, remove_file, try_lock
from .worker import Worker, main, rng_untouched, seed_training_rng

__all__ = [
    "ACTIVE",
    "JOB_FORMAT",
    "JOB_VERSION",
    "ROLLBACK_AFTER",
    "STATES",
    "Faults",
    "JobError",
    "JobSpec",
    "MetricsTail",
    "Worker",
    "actions_for",
    "alive",
    "checkpoint_at",
    "checkpoint_path",
    "checkpoint_paths",
    "checkpoint_step",
    "create_job",
    "delete_job",
    "job_folder",
    "job_summary",
    "latest_checkpoint",
    "load_checkpoint",
    "load_spec",
    "main",
    "new_spec",
    "read_json",
    "remove_file",
    "request",
    "rng_untouched",
    "save_checkpoint",
    "seed_training_rng",
    "try_lock",
    "worker_alive",
    "write_json_atomic",
    "write_status",
]
