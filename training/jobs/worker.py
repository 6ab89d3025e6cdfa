"""The worker: trains one job folder to its end through ``training.run.TrainingRun``, resumable at any moment.

Run as ``python tools/run_job.py <job folder>`` (Start Finetune Job starts it so), or as N ranks under ``torchrun``.
It takes the job's lock (one worker per job) and its device's (one job per device; a waiting job shows as queued),
resumes from the newest checkpoint that loads, and then per step: obeys stop / pause (``control.json``) and a vanished
ComfyUI (``--parent-pid``), logs metrics and status, evaluates and previews on schedule, checkpoints every interval,
and rolls back to the last checkpoint at half the learning rate after three non-finite steps in a row.

The process' global torch generators are the training's own: seeded from the config's seed when a job starts,
restored from the checkpoint when it resumes, and touched by nothing else — every model the worker builds besides
(the encoder, the base decoder of the previews, the trained model before its weights are loaded, LPIPS) is built on a
private copy of the generator (``rng_untouched``), so a killed-and-resumed job ends with a final checkpoint equal to an
uninterrupted run's in every value, its RNG states included.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time

import torch

from .. import data, distributed, finetune, recipes
from ..files import atomic_write, read_json, read_weight_file
from ..run import TrainingRun
from ..vae_files import build_autoencoder
from .checkpoints import checkpoint_path, latest_checkpoint, load_checkpoint, save_checkpoint
from .faults import ROLLBACK_AFTER, Faults
from .folder import JobError, load_spec, write_status
from .process import alive, remove_file, try_lock


@contextlib.contextmanager
def rng_untouched():
    """Runs the block on a private copy of the process' CPU generator: what it draws — a module's random default
    initialisation before its weights are loaded, a preview — leaves the generator a checkpoint saves where it was.
    Models are built on the CPU (then moved), so the CUDA generators are not involved."""
    with torch.random.fork_rng(devices=[]):
        yield


def seed_training_rng(seed: int, rank: int = 0, step: int = 0) -> None:
    """The global generators (CPU and CUDA) of a run that has no saved RNG state for this process: a function of the
    config's seed, this rank and the step, not of whatever this process did before."""
    torch.manual_seed((seed * 1_000_003 + rank * 7_919 + step + 0x5EED) % (2**63))


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

    def build_model(self) -> torch.nn.Module:
        """The base VAE (a new module with the job's base weights, in eval mode), built without touching the global
        generator: its layers' random default initialisation, overwritten at once by the weights, is drawn from a
        private copy of it (``rng_untouched``)."""
        with rng_untouched():
            return build_autoencoder(
                self.spec.family, self.base_tensors(), self.spec.latent_scale, self.spec.latent_shift
            ).eval()

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
                remove_file(os.path.join(self.folder, "control.json"))
                state = "stopped" if command == "stop" else "paused"
                write_status(self.folder, state, pid=os.getpid(), message=f"{state} while waiting for {name}")
                return False
            if not waiting:
                write_status(self.folder, "queued", pid=os.getpid(), message=f"waiting for the job running on {name}")
                waiting = True
            if self.parent_pid and not alive(self.parent_pid):
                write_status(self.folder, "interrupted", message="ComfyUI stopped while the job was waiting")
                return False
            time.sleep(0.5)

    def run(self) -> str:
        spec = self.spec
        if spec.threads:
            torch.set_num_threads(spec.threads)
        try:
            self.collective.check_batch(spec.config.get("batch_size", 1))
        except ValueError as exc:  # every rank finds it: rank 0 writes it before any exits (torchrun kills the rest)
            self.status("failed", message=str(exc))
            self.collective.barrier()
            raise JobError(str(exc)) from exc
        if not self._take_locks():
            if getattr(self, "busy", False):
                return "busy"
            return (read_json(os.path.join(self.folder, "status.json"), {}) or {}).get("state", "stopped")
        where = str(self.device) if not self.collective.active else f"{self.collective.world} × {self.device.type}"
        self.status(
            "running",
            pid=os.getpid(),
            message="loading images and encoding crops",
            total=spec.total_steps,
            device=where,
        )
        recipe = recipes.Recipe(**spec.recipe)
        self.lpips = None
        if recipe.uses_lpips:
            from ..perceptual import Lpips, LpipsWeightsMissing

            try:
                with rng_untouched():  # AlexNet / VGG's random default initialisation, then the backbone's weights
                    self.lpips = Lpips(recipe.lpips_net, spec.lpips_backbone).to(self.device)
            except LpipsWeightsMissing as exc:
                raise JobError(
                    f"recipe {recipe.name} needs LPIPS: {exc}; put the file back or start the job with "
                    "furception-nolpips"
                ) from exc
        state = self._latest_state()
        if state is not None and state.get("world_size", 1) != self.collective.world:
            self.log(
                f"resuming a {state.get('world_size', 1)}-process checkpoint with {self.collective.world}: same "
                "global batch and data order; per-process RNG states are not carried over (each rank's are seeded "
                "afresh; the trainer draws from explicit generators only)"
            )
        train = self._images(spec.train_images)
        held = self._images(spec.held_out_images) if self.main else []  # held-out evaluation runs on rank 0
        if not train:
            raise JobError("none of the training images could be read")
        held_names = [os.path.basename(p) for p in spec.held_out_images[: len(held)]]
        with self.training_run(recipe, state, train, held, held_names) as training:
            run = training.trainer
            for note in run.notes:
                self.log(note)
            if state is not None:
                self.log(f"resumed from step {state['step']}")
            elif run.base_evaluation is not None:
                self.metric({"kind": "eval", **run.base_evaluation})
            self.write_preview(run, training.held_out, training.cache)
            return self._train(training, recipe)

    def training_run(
        self, recipe: recipes.Recipe, state: dict | None, train: list, held: list, held_names: list[str] = ()
    ) -> TrainingRun:
        """The job's ``TrainingRun`` at ``state`` (the start when None) on these images, the global generators set to
        the training's as the last thing done (``_set_training_rng``): setting a run up is not training, so it runs on
        a private copy of them (the trainer seeds its critic privately)."""
        encoder = self.build_model()
        encoded = {"chunks": 0}

        def encode(images01):
            encoded["chunks"] += 1
            if encoded["chunks"] == 1:  # the pool is being encoded
                self.faults("latent-cache")
            with torch.no_grad():
                return encoder.encode(images01)

        def plain_encode(images01):
            with torch.no_grad():
                return encoder.encode(images01)

        with rng_untouched():
            training = TrainingRun(
                self.build_model(),
                recipe,
                finetune.FinetuneConfig(**self.spec.config),
                train,
                encode,
                held_out_images=held,
                held_out_names=held_names,
                encode_held_out_with=plain_encode,
                lpips=self.lpips,
                state=state,
                device=self.device,
                collective=self.collective,
            )
        self._set_training_rng(training.trainer, state)
        return training

    def _set_training_rng(self, trainer: finetune.DecoderFinetune, state: dict | None) -> None:
        """The global generators set to the training's: the checkpoint's RNG state of this rank, or a fresh seed when it
        has none for this world size. The last thing done before training (re)starts; nothing after it may draw from
        the global generators but the training."""
        if state is not None and state.get("rng") and len(state["rng"]) == self.collective.world:
            distributed.set_rng_state(state["rng"][self.collective.rank])
        else:
            seed_training_rng(trainer.config.seed, self.collective.rank, trainer.step)

    def _train(self, training: TrainingRun, recipe: recipes.Recipe) -> str:
        spec = self.spec
        started, start_step = time.perf_counter(), training.step
        progress = {"recipe": recipe, "non_finite": 0}

        def should_stop() -> str | None:
            orphan = bool(self.parent_pid) and not alive(self.parent_pid)
            command, orphan = self.collective.broadcast((self.control(), orphan) if self.main else None)  # all agree
            if orphan:
                return "interrupted"
            return command if command in ("stop", "pause") else None

        def on_eval(result: dict) -> None:
            self.metric({"kind": "eval", **result})
            if training.trainer.step < spec.total_steps:  # the last preview follows the last checkpoint
                self.write_preview(training.trainer, training.held_out)

        def on_step(logs: dict) -> None:
            run = training.trainer
            progress["non_finite"] = progress["non_finite"] + 1 if logs.get("skipped") else 0
            if progress["non_finite"] >= ROLLBACK_AFTER:
                progress["recipe"], progress["non_finite"] = self._rollback(training, progress["recipe"]), 0
                return
            if run.step % spec.log_every == 0 or run.step == spec.total_steps:
                self.metric({"kind": "step", **{k: v for k, v in logs.items() if isinstance(v, (int, float, bool))}})
                elapsed = time.perf_counter() - started
                rate = (run.step - start_step) * run.config.batch_size / max(elapsed, 1e-9)
                left = (spec.total_steps - run.step) * run.config.batch_size / max(rate, 1e-9)
                self.status(
                    "running",
                    step=run.step,
                    images_per_second=rate,
                    eta_seconds=left,
                    message=f"step {run.step} / {spec.total_steps}",
                )
            if run.step % spec.checkpoint_interval == 0 and run.step < spec.total_steps:
                self._save(run)

        report = training.run(
            steps=max(0, spec.total_steps - training.step),
            should_stop=should_stop,
            on_step=on_step,
            on_eval=on_eval,
            around_step=lambda step: self.faults.around_step(training.trainer, step),
        )
        run = training.trainer
        if report.ended == "interrupted":
            self._save(run)
            self.status(
                "interrupted",
                step=run.step,
                message=f"ComfyUI stopped at step {run.step}; checkpoint written, resume to continue",
            )
            return "interrupted"
        if report.ended in ("stop", "pause"):
            self._save(run)
            state = "stopped" if report.ended == "stop" else "paused"
            self.status(state, step=run.step, message=f"{state} at step {run.step} (checkpoint written)")
            if self.main:
                remove_file(os.path.join(self.folder, "control.json"))
            return state
        self._save(run)  # the last checkpoint holds the final evaluation
        self.write_preview(run, training.held_out, training.cache)
        self.status("done", step=run.step, message=f"finished {run.step} steps")
        return "done"

    def write_preview(self, run: finetune.DecoderFinetune, held_out, cache=None, count: int = 3) -> None:
        """preview.png: rows of target | base decoder | EMA decoder now, on up to ``count`` held-out crops (the first
        training crops when nothing is held out); written to a temporary file and renamed. Called when the worker
        (re)starts, after the training RNG state is set: nothing in it may draw from the global generators, so it runs
        on a private copy of them."""
        if not self.main:
            return
        with rng_untouched():
            self._write_preview(run, held_out, cache, count)

    def _write_preview(self, run: finetune.DecoderFinetune, held_out, cache, count: int) -> None:
        from .. import visualize

        if held_out is not None:
            targets, latents = held_out.images01[:count], held_out.latents[:count]
        elif cache is not None:
            latents, targets = cache.batch(0, 1)
        else:
            return
        if self._base_previews is None or self._base_previews.shape[0] != targets.shape[0]:
            base = self.build_model()
            with torch.no_grad():
                self._base_previews = torch.cat([base.decode(z[None]).float().clamp(0, 1) for z in latents])
        now = run.decode_with(latents, use_ema=True)
        rows = [
            [visualize.label(t, "target"), visualize.label(b, "base"), visualize.label(n, f"EMA, step {run.step}")]
            for t, b, n in zip(targets, self._base_previews, now)
        ]
        picture = visualize.grid(rows)
        atomic_write(os.path.join(self.folder, "preview.png"), lambda temporary: visualize.save_png(picture, temporary))

    def _rollback(self, training: TrainingRun, recipe: recipes.Recipe) -> recipes.Recipe:
        """Back to the newest checkpoint (or the start) with half the learning rate; returns that recipe."""
        state = self._latest_state()
        lower = recipes.recipe_with(recipe, lr=recipe.lr * 0.5)
        self.log(
            f"{ROLLBACK_AFTER} non-finite steps in a row at step {training.step}: back to "
            f"{'step ' + str(state['step']) if state else 'the start'} with lr {lower.lr:g}"
        )
        with rng_untouched():
            trainer = training.restart(self.build_model(), lower, state)
        self._set_training_rng(trainer, state)
        return lower


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Run (or resume) a VAE Lab finetuning job folder.")
    parser.add_argument("folder", help="the job folder (made by Start Finetune Job or training.jobs.create_job)")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: CUDA when present)")
    parser.add_argument(
        "--parent-pid",
        type=int,
        default=None,
        help="stop (with a checkpoint, state 'interrupted') when this process is gone, e.g. ComfyUI",
    )
    args = parser.parse_args(argv)
    folder = os.path.abspath(args.folder)
    worker = Worker(folder, args.device, args.parent_pid)
    try:
        state = worker.run()
    except torch.cuda.OutOfMemoryError:
        worker.status(
            "failed",
            message=(
                f"out of GPU memory at batch {worker.spec.config.get('batch_size')}, "
                f"crop {worker.spec.config.get('crop_size')}: "
                "lower batch_size or crop_size, or turn on gradient_checkpointing; the last checkpoint is kept"
            ),
        )
        return 3
    except (JobError, finetune.FinetuneError, ValueError) as exc:
        worker.status("failed", message=str(exc))
        return 2
    finally:
        if worker.collective.active:
            import torch.distributed as dist

            dist.destroy_process_group()
    return 0 if state in ("done", "stopped", "paused", "interrupted", "busy") else 1
