"""What the panel reads and asks: a job's summary, its metrics log read incrementally, and requests to its worker."""

from __future__ import annotations

import json
import os
import time

from ..files import read_json, write_json_atomic
from .checkpoints import checkpoint_paths, checkpoint_step
from .folder import JobError, load_spec, write_status
from .process import alive

ACTIVE = ("queued", "running")


def worker_alive(folder: str, pid) -> bool:
    """True when ``pid`` is a live worker of this job folder (one of its arguments is the folder: a reused pid of
    another program does not count)."""
    if not isinstance(pid, int) or pid <= 0 or not alive(pid):
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
        status["message"] = (
            f"the worker ended without finishing (at step {status.get('step', 0)}); Resume continues "
            "from the last checkpoint (worker.log in the job folder says why)"
        )
    checkpoints = checkpoint_paths(folder)
    try:
        preview = os.path.getmtime(os.path.join(folder, "preview.png"))
    except OSError:
        preview = None
    return {
        "job": os.path.basename(folder),
        "state": state,
        "step": status.get("step", 0),
        "total": status.get("total", spec.get("total_steps")),
        "images_per_second": status.get("images_per_second"),
        "eta_seconds": status.get("eta_seconds") if state == "running" else None,
        "message": status.get("message", ""),
        "device": status.get("device"),
        "updated": status.get("updated"),
        "recipe": (spec.get("recipe") or {}).get("name"),
        "family": spec.get("family"),
        "checkpoint_step": checkpoint_step(checkpoints[0]) if checkpoints else None,
        "preview": preview,
        "actions": actions_for(state),
    }


def actions_for(state: str) -> list[str]:
    """What the panel offers in each state (the routes refuse the rest)."""
    return {
        "queued": ["stop"],
        "running": ["pause", "stop"],
        "paused": ["resume", "stop", "delete"],
        "interrupted": ["resume", "stop", "delete"],
        "stopped": ["resume", "delete"],
        "failed": ["resume", "delete"],
        "done": ["delete"],
    }.get(state, [])


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
            self.logs = [*self.logs, row][-self.max_logs :]
        elif kind == "step" and not row.get("skipped"):
            self.seen += 1
            if (self.seen - 1) % self.stride == 0:
                self.steps.append(
                    {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
                )
                if len(self.steps) > self.max_points:
                    self.steps, self.stride = self.steps[::2], self.stride * 2

    def series(self) -> dict:
        return {"steps": self.steps, "evals": self.evals, "logs": self.logs}
