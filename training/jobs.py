"""Background finetuning jobs: a job folder that holds everything, and the worker that trains it.

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
``training.distributed`` (each takes 1/N of the global batch; gradients averaged explicitly); rank 0 alone writes status,
metrics, previews and checkpoints (with every rank's RNG state), and broadcasts stop / pause so all ranks stop together.
"""
from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

from . import data, distributed, finetune, recipes
from .files import read_weight_file, save_safetensors_atomic
from .latent_cache import LatentCache
from .vae_files import build_autoencoder

JOB_FORMAT = "vae_lab.job"
JOB_VERSION = 1
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,79}$")
WINDOWS_DEVICES = re.compile(r"^(con|prn|aux|nul|com[0-9]|lpt[0-9])(\..*)?$", re.IGNORECASE)  # not folders there
STATES = ("queued", "running", "paused", "stopped", "interrupted", "done", "failed")
ROLLBACK_AFTER = 3  # consecutive non-finite steps before going back to the last checkpoint with half the LR


class JobError(ValueError):
    """A job that cannot be made or run as asked; the message says what to change."""


def job_folder(root: str, name: str) -> str:
    """``root/name``, refusing names that could leave ``root`` (separators, '..', hidden names, odd characters)."""
    if (not isinstance(name, str) or not NAME.match(name) or ".." in name or name.endswith(".")
            or WINDOWS_DEVICES.match(name)):
        raise JobError(f"job name {name!r}: use letters, digits, '_', '-' and '.', starting with a letter or digit, "
                       "not ending with '.', not a Windows device name such as NUL or COM1 (at most 80 characters)")
    root_real = os.path.realpath(root)
    path = os.path.realpath(os.path.join(root_real, name))
    if os.path.dirname(path) != root_real:
        raise JobError(f"job name {name!r} leaves the jobs folder")
    return path


def write_json_atomic(path: str, value) -> None:
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w") as f:
        json.dump(value, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    replace(temporary, path)
    _fsync_dir(os.path.dirname(path))


def replace(source: str, destination: str) -> None:
    """os.replace, retried briefly on Windows, where it fails while another process (the panel's route, Load Finetune
    Job) has the destination open."""
    for attempt in range(50):
        try:
            os.replace(source, destination)
            return
        except PermissionError:
            if os.name != "nt" or attempt == 49:
                raise
            time.sleep(0.02)


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_json(path: str, default=None):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


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


def new_spec(recipe_name: str, learning_rate: float, config: finetune.FinetuneConfig, total_steps: int,
             checkpoint_interval: int, train_images: list[str], held_out_images: list[str], family: str,
             latent_scale: float = 1.0, latent_shift: float = 0.0, threads: int = 0) -> tuple[JobSpec, str | None]:
    """(spec, note) for a new job: the named recipe (its no-LPIPS fallback, with a note, when the LPIPS weights are not
    found now; the backbone file found is recorded so the worker uses the same one), ``learning_rate`` > 0 overriding
    the recipe's. What Start Finetune Job and tools/make_job.py both make."""
    from .perceptual import find_backbone_file

    wanted = recipes.RECIPES[recipe_name]
    backbone = find_backbone_file(wanted.lpips_net) if wanted.uses_lpips else None
    recipe, note = recipes.resolve_recipe(recipe_name, backbone is not None)
    if learning_rate > 0:
        recipe = finetune.recipe_with(recipe, lr=learning_rate)
    spec = JobSpec(recipe=recipe.as_dict(), config=asdict(config), total_steps=total_steps,
                   checkpoint_interval=checkpoint_interval, train_images=list(train_images),
                   held_out_images=list(held_out_images), family=family, latent_scale=latent_scale,
                   latent_shift=latent_shift, threads=threads, lpips_backbone=backbone if recipe.uses_lpips else None)
    return spec, note


def create_job(root: str, name: str, base_tensors: dict[str, torch.Tensor], spec: JobSpec,
               train_arrays: list | None = None, held_out_arrays: list | None = None,
               initial_state: dict | None = None) -> str:
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
            raise JobError(f"training_state: it trains a {initial_state.get('family')} decoder, the VAE is {spec.family}; "
                           "connect the VAE that run started from")
        if initial_state["step"] >= spec.total_steps:
            raise JobError(f"training_state is at step {initial_state['step']} already: raise total_steps above it")
    if not spec.train_images and not train_arrays:
        raise JobError("a job needs training images")
    os.makedirs(os.path.join(folder, "checkpoints"))
    for prefix, arrays, paths in (("train", train_arrays, spec.train_images), ("held", held_out_arrays, spec.held_out_images)):
        for i, pixels in enumerate(arrays or []):
            os.makedirs(os.path.join(folder, "images"), exist_ok=True)
            path = os.path.join(folder, "images", f"{prefix}_{i:05d}.png")
            _save_png01(pixels, path)
            paths.append(path)
    save_safetensors_atomic(base_tensors, os.path.join(folder, "base.safetensors"), {"vae_lab.family": spec.family})
    write_json_atomic(os.path.join(folder, "job.json"), asdict(spec))
    if initial_state is not None:
        save_checkpoint(folder, initial_state, spec.keep_last)
    write_status(folder, "queued", step=initial_state["step"] if initial_state else 0, total=spec.total_steps,
                 message="waiting for the worker")
    return folder


def _save_png01(pixels, path: str) -> None:
    import numpy as np
    from PIL import Image

    array = (np.clip(np.asarray(pixels, dtype=np.float32), 0, 1) * 255 + 0.5).astype(np.uint8)
    temporary = f"{path}.{os.getpid()}.tmp"
    Image.fromarray(array).save(temporary, format="PNG")
    replace(temporary, path)


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


# ----------------------------------------------------------------------------------------------
# checkpoints

CHECKPOINT = re.compile(r"^step_(\d{8})\.pt$")


def checkpoint_paths(folder: str) -> list[str]:
    """Complete checkpoint files, newest first (temporary files are never listed)."""
    directory = os.path.join(folder, "checkpoints")
    try:
        names = [n for n in os.listdir(directory) if CHECKPOINT.match(n)]
    except OSError:
        return []
    return [os.path.join(directory, n) for n in sorted(names, reverse=True)]


def checkpoint_path(folder: str, step: int) -> str:
    return os.path.join(folder, "checkpoints", f"step_{step:08d}.pt")


def checkpoint_step(path: str) -> int:
    return int(CHECKPOINT.match(os.path.basename(path)).group(1))


def checkpoint_at(folder: str, step: int) -> dict:
    """The checkpoint of ``step``; a JobError names the steps kept when there is none (or it does not load)."""
    path = checkpoint_path(folder, step)
    if not os.path.isfile(path):
        kept = [checkpoint_step(p) for p in checkpoint_paths(folder)]
        raise JobError(f"{os.path.basename(folder)} has no checkpoint of step {step}; it keeps steps {kept} (0 = the newest)")
    return load_checkpoint(path)


def load_checkpoint(path: str) -> dict:
    """A checkpoint's state, checked: it loads with weights_only, has the trainer's format, and its step is
    the one in its name. Raises JobError otherwise."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torn/truncated zip, unpickling errors: all mean "not usable"
        raise JobError(f"{os.path.basename(path)}: unreadable ({type(exc).__name__}: {str(exc)[:120]})") from exc
    expected = checkpoint_step(path)
    if not isinstance(state, dict) or state.get("format") != finetune.STATE_FORMAT or state.get("step") != expected:
        raise JobError(f"{os.path.basename(path)}: not a training state for step {expected}")
    return state


def latest_checkpoint(folder: str, log=None) -> dict | None:
    """The newest checkpoint that loads; broken ones are reported through ``log`` and skipped."""
    for path in checkpoint_paths(folder):
        try:
            return load_checkpoint(path)
        except JobError as exc:
            if log:
                log(f"skipped a broken checkpoint: {exc}")
    return None


def save_checkpoint(folder: str, state: dict, keep_last: int, fault=lambda phase, step=None: None) -> str:
    """temp + fsync + rename, then the oldest beyond ``keep_last`` removed. Non-finite weights are refused."""
    bad = [k for k, v in state["decoder"].items() if not torch.isfinite(v).all()]
    if bad:
        raise JobError(f"refusing to checkpoint non-finite weights ({bad[:3]})")
    path = checkpoint_path(folder, state["step"])
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    fault("after-temp-write", state["step"])
    replace(temporary, path)
    _fsync_dir(os.path.dirname(path))
    fault("after-rename", state["step"])
    for old in checkpoint_paths(folder)[keep_last:]:
        os.remove(old)
    return path


# ----------------------------------------------------------------------------------------------
# what the panel reads: a job's summary, its metrics log read incrementally, and requests to a worker

ACTIVE = ("queued", "running")


def worker_alive(folder: str, pid) -> bool:
    """True when ``pid`` is a live worker of this job folder (one of its arguments is the folder: a reused pid of
    another program does not count)."""
    if not isinstance(pid, int) or pid <= 0 or not _alive(pid):
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return True  # no /proc (macOS): trust the pid
    target = os.path.realpath(folder)
    return any(os.path.realpath(os.path.join(cwd, a)) == target for a in args[1:])


def job_summary(folder: str) -> dict:
    """The status of a job as the panel shows it: status.json plus the job's name, recipe, total, newest checkpoint,
    preview time and what can be done with it. A job whose worker vanished while running or queued (killed, the
    machine rebooted) shows as 'interrupted'."""
    status = read_json(os.path.join(folder, "status.json"), {}) or {}
    spec = read_json(os.path.join(folder, "job.json"), {}) or {}
    state = status.get("state", "queued")
    if state in ACTIVE and not worker_alive(folder, status.get("pid")):
        state = "interrupted"
        status["message"] = (f"the worker ended without finishing (at step {status.get('step', 0)}); Resume continues "
                             "from the last checkpoint (worker.log in the job folder says why)")
    checkpoints = checkpoint_paths(folder)
    try:
        preview = os.path.getmtime(os.path.join(folder, "preview.png"))
    except OSError:
        preview = None
    return {
        "job": os.path.basename(folder), "state": state, "step": status.get("step", 0),
        "total": status.get("total", spec.get("total_steps")), "images_per_second": status.get("images_per_second"),
        "eta_seconds": status.get("eta_seconds") if state == "running" else None, "message": status.get("message", ""),
        "device": status.get("device"), "updated": status.get("updated"),
        "recipe": (spec.get("recipe") or {}).get("name"), "family": spec.get("family"),
        "checkpoint_step": checkpoint_step(checkpoints[0]) if checkpoints else None,
        "preview": preview, "actions": actions_for(state),
    }


def actions_for(state: str) -> list[str]:
    """What the panel offers in each state (the routes refuse the rest)."""
    return {"queued": ["stop"], "running": ["pause", "stop"], "paused": ["resume", "stop", "delete"],
            "interrupted": ["resume", "stop", "delete"], "stopped": ["resume", "delete"], "failed": ["resume", "delete"],
            "done": ["delete"]}.get(state, [])


def request(folder: str, command: str) -> None:
    """Asks a running or queued worker to stop or pause (it checkpoints first); a job whose worker is gone is marked
    directly."""
    if command not in ("stop", "pause"):
        raise JobError(f"unknown request {command!r}")
    summary = job_summary(folder)
    if summary["state"] in ACTIVE:
        write_json_atomic(os.path.join(folder, "control.json"), {"command": command, "time": time.time()})
    elif command == "stop" and "stop" in summary["actions"]:
        write_status(folder, "stopped", message=f"stopped at step {summary['step']}")
    else:
        raise JobError(f"job {summary['job']} is {summary['state']}: nothing to {command}")


def delete_job(folder: str) -> None:
    """Removes a job folder whose worker is not running (stop it first); only folders that are VAE Lab jobs."""
    import shutil

    if load_spec(folder) and job_summary(folder)["state"] in ACTIVE:
        raise JobError(f"job {os.path.basename(folder)} is running: stop it first")
    shutil.rmtree(folder)


class MetricsTail:
    """metrics.jsonl read incrementally (from the last offset; a half-written last line waits for the next read),
    kept as chart series: per loss term (step, value) points thinned to at most ``max_points`` by dropping every
    other point when full, all held-out evaluations, and the last log lines."""

    def __init__(self, path: str, max_points: int = 400, max_logs: int = 20):
        self.path, self.max_points, self.max_logs = path, max_points, max_logs
        self.offset, self.stride, self.seen = 0, 1, 0
        self.steps: list[dict] = []
        self.evals: list[dict] = []
        self.logs: list[dict] = []

    def update(self) -> list[dict]:
        """Reads what was appended since the last call; returns the new rows (a truncated file is read anew)."""
        try:
            size = os.path.getsize(self.path)
        except OSError:
            return []
        if size < self.offset:
            self.__init__(self.path, self.max_points, self.max_logs)
        if size == self.offset:
            return []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            chunk = f.read(size - self.offset)
        end = chunk.rfind(b"\n") + 1
        self.offset += end
        rows = []
        for line in chunk[:end].splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            rows.append(row)
            self._add(row)
        return rows

    def _add(self, row: dict) -> None:
        kind = row.get("kind")
        if kind == "eval":
            self.evals.append({k: v for k, v in row.items() if isinstance(v, (int, float)) or k in ("weights", "kind")})
        elif kind == "log":
            self.logs = [*self.logs, row][-self.max_logs:]
        elif kind == "step" and not row.get("skipped"):
            self.seen += 1
            if (self.seen - 1) % self.stride == 0:
                self.steps.append({k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
                if len(self.steps) > self.max_points:
                    self.steps, self.stride = self.steps[::2], self.stride * 2

    def series(self) -> dict:
        return {"steps": self.steps, "evals": self.evals, "logs": self.logs}


# ----------------------------------------------------------------------------------------------
# fault injection (tests): VAE_LAB_FAULT="<phase>@<step>" kills the worker with SIGKILL at that phase of that step;
# phases: mid-step, after-temp-write, after-rename, latent-cache; also nan@<step> (three non-finite steps from
# there) and oom@<step> (a CUDA out-of-memory error at that step).


class Faults:
    def __init__(self, spec: str | None):
        self.phase, self.step = None, -1
        if spec:
            phase, _, step = spec.partition("@")
            self.phase, self.step = phase, int(step or 0)

    def __call__(self, phase: str, step: int | None = None) -> None:
        if self.phase == phase and (step is None or step == self.step):
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)


# ----------------------------------------------------------------------------------------------
# the worker


class Worker:
    def __init__(self, folder: str, device: str | None = None, parent_pid: int | None = None):
        self.folder = folder
        self.parent_pid = parent_pid  # ComfyUI's pid: when it is gone, checkpoint and stop (no orphan holds the GPU)
        self.spec = load_spec(folder)
        # under torchrun: this rank's collective and device (rank 0 alone writes status, metrics, previews, checkpoints)
        self.collective, self.device = distributed.from_environment(device)
        self.main = self.collective.is_main
        self.faults = Faults(os.environ.get("VAE_LAB_FAULT"))
        self._base: dict[str, torch.Tensor] | None = None
        self._base_previews: torch.Tensor | None = None
        self.lpips = None

    def base_tensors(self) -> dict[str, torch.Tensor]:
        """The job's base weights, read once per process (every model built from them copies them)."""
        if self._base is None:
            self._base = read_weight_file(os.path.join(self.folder, "base.safetensors"))[0]
        return self._base

    def log(self, message: str) -> None:
        self.metric({"kind": "log", "message": message})

    def status(self, state: str, **values) -> None:
        if self.main:
            write_status(self.folder, state, **values)

    def metric(self, row: dict) -> None:
        if not self.main:
            return
        with open(os.path.join(self.folder, "metrics.jsonl"), "a") as f:
            f.write(json.dumps({**row, "time": time.time()}) + "\n")

    def control(self) -> str | None:
        return (read_json(os.path.join(self.folder, "control.json"), {}) or {}).get("command")

    def _images(self, paths: list[str]) -> list:
        images = []
        for path in paths:
            try:
                images.append(data.load_image01(path))
            except Exception as exc:  # noqa: BLE001  (any unreadable file is skipped and counted)
                self.log(f"skipped {os.path.basename(path)}: {exc}")
        return images

    def _run(self, recipe: recipes.Recipe, state: dict | None, cache, held_out) -> finetune.DecoderFinetune:
        model = build_autoencoder(self.spec.family, self.base_tensors(), self.spec.latent_scale, self.spec.latent_shift).eval()
        config = finetune.FinetuneConfig(**self.spec.config)
        run = finetune.DecoderFinetune(model, recipe, config, cache, held_out, self.lpips if recipe.uses_lpips else None,
                                       state, self.device, self.collective)
        if state is not None and state.get("rng") and len(state["rng"]) == self.collective.world:
            distributed.set_rng_state(state["rng"][self.collective.rank])
        return run

    def _latest_state(self) -> dict | None:
        """The newest checkpoint that loads, the same one on every rank (rank 0 picks it)."""
        state = latest_checkpoint(self.folder, self.log) if self.main else None
        step = self.collective.broadcast(state["step"] if state else None)
        if self.main or step is None:
            return state
        return load_checkpoint(checkpoint_path(self.folder, step))

    def _save(self, run: finetune.DecoderFinetune) -> None:
        """A checkpoint with every rank's RNG state, written by rank 0 (all ranks take part in the gather)."""
        rng = self.collective.gather(distributed.rng_state())
        if self.main:
            state = run.state_dict()
            state["rng"], state["world_size"] = rng, self.collective.world
            save_checkpoint(self.folder, state, self.spec.keep_last, self.faults)

    def _take_locks(self) -> bool:
        if not self.collective.active:
            return self._take_locks_alone()
        # under torchrun the launcher assigns devices: only the one-worker-per-job lock, taken by rank 0, agreed by all
        free = self._take_locks_alone(device_lock=False) if self.main else None
        free = self.collective.broadcast(free)
        self.busy = not free
        return free

    def _take_locks_alone(self, device_lock: bool = True) -> bool:
        """One worker per job (a second launch of the same job exits at once) and one job per device at a time: lock
        files held until this process ends (the OS releases them even on SIGKILL). A job waiting for its device shows
        as 'queued' and still obeys stop / pause. False when the job should not run (already running, or stopped
        while queued)."""
        self._job_lock = open(os.path.join(self.folder, ".worker.lock"), "a")  # noqa: SIM115 (held for the process' life)
        if not try_lock(self._job_lock):
            print(f"{self.folder}: another worker runs this job already", file=sys.stderr)
            self.busy = True
            return False
        if not device_lock:
            return True
        name = f"{self.device.type}{self.device.index if self.device.index is not None else ''}"
        self._lock = open(os.path.join(os.path.dirname(self.folder), f".device-{name}.lock"), "a")  # noqa: SIM115
        waiting = False
        while True:
            if try_lock(self._lock):
                return True
            command = self.control()
            if command in ("stop", "pause"):
                _remove(os.path.join(self.folder, "control.json"))
                state = "stopped" if command == "stop" else "paused"
                write_status(self.folder, state, pid=os.getpid(), message=f"{state} while waiting for {name}")
                return False
            if not waiting:
                write_status(self.folder, "queued", pid=os.getpid(), message=f"waiting for the job running on {name}")
                waiting = True
            if self.parent_pid and not _alive(self.parent_pid):
                write_status(self.folder, "interrupted", message="ComfyUI stopped while the job was waiting")
                return False
            time.sleep(0.5)

    def run(self) -> str:
        spec = self.spec
        if spec.threads:
            torch.set_num_threads(spec.threads)
        try:
            self.collective.check_batch(spec.config.get("batch_size", 1))
        except ValueError as exc:  # every rank finds it: rank 0 writes it before any rank exits (torchrun kills the rest)
            self.status("failed", message=str(exc))
            self.collective.barrier()
            raise JobError(str(exc)) from exc
        if not self._take_locks():
            if getattr(self, "busy", False):
                return "busy"
            return (read_json(os.path.join(self.folder, "status.json"), {}) or {}).get("state", "stopped")
        where = str(self.device) if not self.collective.active else f"{self.collective.world} × {self.device.type}"
        self.status("running", pid=os.getpid(), message="loading images and encoding crops", total=spec.total_steps,
                    device=where)
        recipe = recipes.Recipe(**spec.recipe)
        self.lpips = None
        if recipe.uses_lpips:
            from .perceptual import Lpips, LpipsWeightsMissing

            try:
                self.lpips = Lpips(recipe.lpips_net, spec.lpips_backbone).to(self.device)
            except LpipsWeightsMissing as exc:
                raise JobError(f"recipe {recipe.name} needs LPIPS: {exc}; put the file back or start the job with "
                               "furception-nolpips") from exc
        state = self._latest_state()
        if state is not None and state.get("world_size", 1) != self.collective.world:
            self.log(f"resuming a {state.get('world_size', 1)}-process checkpoint with {self.collective.world}: same global "
                     "batch and data order; per-process RNG states are not carried over (the trainer does not use them)")
        train = self._images(spec.train_images)
        held = self._images(spec.held_out_images) if self.main else []  # held-out evaluation runs on rank 0
        if not train:
            raise JobError("none of the training images could be read")
        encoder_model = build_autoencoder(spec.family, self.base_tensors(), spec.latent_scale, spec.latent_shift).eval()
        encoded = {"chunks": 0}

        def encode(images01):
            encoded["chunks"] += 1
            if encoded["chunks"] == 1:  # the pool is being encoded
                self.faults("latent-cache")
            with torch.no_grad():
                return encoder_model.encode(images01)

        def plain_encode(images01):
            with torch.no_grad():
                return encoder_model.encode(images01)

        config = finetune.FinetuneConfig(**spec.config)
        held_out = finetune.encode_held_out(held, [os.path.basename(p) for p in spec.held_out_images[: len(held)]],
                                            plain_encode, config.eval_size) if held else None
        with LatentCache(train, config.crop_size, config.crops_per_image, config.seed, encode) as cache:
            run = self._run(recipe, state, cache, held_out)
            for note in run.notes:
                self.log(note)
            if state is not None:
                self.log(f"resumed from step {state['step']}")
            elif run.base_evaluation is not None:
                self.metric({"kind": "eval", **run.base_evaluation})
            self.write_preview(run, held_out, cache)
            return self._train(run, recipe, cache, held_out)

    def _train(self, run: finetune.DecoderFinetune, recipe, cache, held_out) -> str:
        spec, fault = self.spec, self.faults
        hook = _decoding(run.model).register_forward_hook(lambda *_: fault("mid-step", run.step)) \
            if fault.phase == "mid-step" else None
        nan_from = fault.step if fault.phase == "nan" else None
        started, start_step, consecutive = time.perf_counter(), run.step, 0
        while run.step < spec.total_steps:
            orphan = bool(self.parent_pid) and not _alive(self.parent_pid)
            command = self.collective.broadcast((self.control(), orphan) if self.main else None)  # every rank agrees
            command, orphan = command
            if orphan:
                self._save(run)
                self.status("interrupted", step=run.step,
                            message=f"ComfyUI stopped at step {run.step}; checkpoint written, resume to continue")
                return "interrupted"
            if command in ("stop", "pause"):
                self._save(run)
                state = "stopped" if command == "stop" else "paused"
                self.status(state, step=run.step, message=f"{state} at step {run.step} (checkpoint written)")
                if self.main:
                    _remove(os.path.join(self.folder, "control.json"))
                return state
            if fault.phase == "oom" and run.step == fault.step:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected by VAE_LAB_FAULT)")
            poison = nan_from is not None and nan_from <= run.step < nan_from + ROLLBACK_AFTER
            handle = _decoding(run.model).register_forward_hook(lambda _m, _i, out: out * float("nan")) if poison else None
            try:
                logs = run.train_step()
            finally:
                if handle is not None:
                    handle.remove()
            if poison and run.step >= nan_from + ROLLBACK_AFTER:
                nan_from = None  # injected once
            consecutive = consecutive + 1 if logs.get("skipped") else 0
            if consecutive >= ROLLBACK_AFTER:
                run, recipe = self._rollback(run, recipe, cache, held_out)
                consecutive = 0
                continue
            if run.step % spec.log_every == 0 or run.step == spec.total_steps:
                self.metric({"kind": "step", **{k: v for k, v in logs.items() if isinstance(v, (int, float, bool))}})
                elapsed = time.perf_counter() - started
                rate = (run.step - start_step) * run.config.batch_size / max(elapsed, 1e-9)
                left = (spec.total_steps - run.step) * run.config.batch_size / max(rate, 1e-9)
                self.status("running", step=run.step, images_per_second=rate, eta_seconds=left,
                            message=f"step {run.step} / {spec.total_steps}")
            if held_out is not None and run.config.eval_every and run.step % run.config.eval_every == 0:
                self.metric({"kind": "eval", **run.evaluate()})
                self.write_preview(run, held_out)
            if run.step % spec.checkpoint_interval == 0 or run.step == spec.total_steps:
                self._save(run)
        if hook is not None:
            hook.remove()
        if held_out is not None:
            self.metric({"kind": "eval", **run.evaluate()})
        self.write_preview(run, held_out, cache)
        self.status("done", step=run.step, message=f"finished {run.step} steps")
        return "done"

    def write_preview(self, run: finetune.DecoderFinetune, held_out, cache=None, count: int = 3) -> None:
        """preview.png: rows of target | base decoder | EMA decoder now, on up to ``count`` held-out crops (the first
        training crops when nothing is held out); written to a temporary file and renamed."""
        from . import visualize

        if not self.main:
            return
        if held_out is not None:
            targets, latents = held_out.images01[:count], held_out.latents[:count]
        elif cache is not None:
            latents, targets = cache.batch(0, 1)
        else:
            return
        if self._base_previews is None or self._base_previews.shape[0] != targets.shape[0]:
            base = build_autoencoder(self.spec.family, self.base_tensors(), self.spec.latent_scale, self.spec.latent_shift).eval()
            with torch.no_grad():
                self._base_previews = torch.cat([base.decode(z[None]).float().clamp(0, 1) for z in latents])
        now = run.decode_with(latents, use_ema=True)
        rows = [[visualize.label(t, "target"), visualize.label(b, "base"), visualize.label(n, f"EMA, step {run.step}")]
                for t, b, n in zip(targets, self._base_previews, now)]
        path = os.path.join(self.folder, "preview.png")
        temporary = f"{path}.{os.getpid()}.tmp.png"
        visualize.save_png(visualize.grid(rows), temporary)
        replace(temporary, path)

    def _rollback(self, run, recipe, cache, held_out):
        state = self._latest_state()
        lower = finetune.recipe_with(recipe, lr=recipe.lr * 0.5)
        self.log(f"{ROLLBACK_AFTER} non-finite steps in a row at step {run.step}: back to "
                 f"{'step ' + str(state['step']) if state else 'the start'} with lr {lower.lr:g}")
        return self._run(lower, state, cache, held_out), lower


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def try_lock(f) -> bool:
    """An exclusive lock on the open file ``f`` without waiting; the OS releases it when the process ends, however it
    ends. fcntl on Linux/macOS, msvcrt on Windows (a lock on its first byte)."""
    if os.name == "nt":
        import msvcrt

        try:
            f.seek(0)
            msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    import fcntl

    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would send Ctrl+C there (signal 0 is CTRL_C_EVENT)
        return _alive_windows(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _is_zombie(pid)  # an ended process not yet reaped by its own parent still answers kill(pid, 0)


def _alive_windows(pid: int) -> bool:
    import ctypes

    kernel32 = ctypes.windll.kernel32
    handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
    if not handle:
        return False
    try:
        code = ctypes.c_ulong()
        return bool(kernel32.GetExitCodeProcess(handle, ctypes.byref(code))) and code.value == 259  # STILL_ACTIVE
    finally:
        kernel32.CloseHandle(handle)


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False


def _decoding(model: torch.nn.Module) -> torch.nn.Module:
    """The submodule every decode runs through (for the fault hooks; ``decode`` bypasses ``forward``)."""
    return getattr(model, "decoder", None) or model.up_blocks


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Run (or resume) a VAE Lab finetuning job folder.")
    parser.add_argument("folder", help="the job folder (made by Start Finetune Job or training.jobs.create_job)")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: CUDA when present)")
    parser.add_argument("--parent-pid", type=int, default=None,
                        help="stop (with a checkpoint, state 'interrupted') when this process is gone, e.g. ComfyUI")
    args = parser.parse_args(argv)
    folder = os.path.abspath(args.folder)
    worker = Worker(folder, args.device, args.parent_pid)
    try:
        state = worker.run()
    except torch.cuda.OutOfMemoryError:
        worker.status("failed", message=(
            f"out of GPU memory at batch {worker.spec.config.get('batch_size')}, crop {worker.spec.config.get('crop_size')}: "
            "lower batch_size or crop_size, or turn on gradient_checkpointing; the last checkpoint is kept"))
        return 3
    except (JobError, finetune.FinetuneError, ValueError) as exc:
        worker.status("failed", message=str(exc))
        return 2
    finally:
        if worker.collective.active:
            import torch.distributed as dist

            dist.destroy_process_group()
    return 0 if state in ("done", "stopped", "paused", "interrupted", "busy") else 1
