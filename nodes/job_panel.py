"""What the VAE Lab sidebar panel talks to: routes that take only the names of existing jobs (never paths), and a
monitor thread that turns changes in the job folders into ``vae_lab.job`` events (``send_sync``; thread-safe).

Routes (also under ``/api``):
- ``GET  /vae_lab/jobs``                   every job's summary (state, step / total, images/s, ETA, actions);
- ``GET  /vae_lab/jobs/{job}``             one job's summary with its chart series (loss terms, held-out metrics);
- ``GET  /vae_lab/jobs/{job}/preview.png`` the latest target | base | EMA preview grid;
- ``POST /vae_lab/jobs/{job}/{action}``    stop, pause, resume or delete.

Events: ``vae_lab.job`` with ``{"job", "summary", "rows"}`` (the metrics rows appended since the last event) or
``{"job", "deleted": true}``. The panel applies them to what the routes gave it on page load.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from ..training import jobs
from .jobs import job_names, jobs_root, launch_worker

LOG = logging.getLogger("vae_lab")
EVENT = "vae_lab.job"
POLL_SECONDS = 1.0
MAX_ROWS_PER_EVENT = 200

_tails: dict[str, jobs.MetricsTail] = {}
_tails_lock = threading.Lock()


def _folder_or_none(name: str) -> str | None:
    """The folder of an existing job called ``name``; None for anything else (bad names included)."""
    try:
        folder = jobs.job_folder(jobs_root(), name)
    except jobs.JobError:
        return None
    return folder if os.path.isfile(os.path.join(folder, "job.json")) else None


def _tail(name: str, folder: str) -> tuple[jobs.MetricsTail, list[dict]]:
    with _tails_lock:
        tail = _tails.get(name)
        if tail is None:
            tail = _tails[name] = jobs.MetricsTail(os.path.join(folder, "metrics.jsonl"))
        return tail, tail.update()


def job_detail(name: str, folder: str) -> dict:
    tail, _ = _tail(name, folder)
    with _tails_lock:
        return {**jobs.job_summary(folder), **tail.series()}


def register_routes(server) -> None:
    from aiohttp import web

    routes = server.routes

    def not_found(name: str):
        return web.json_response({"error": f"no job named {name!r}"}, status=404)

    @routes.get("/vae_lab/jobs")
    async def list_jobs(_request):
        root = jobs_root()
        return web.json_response({"jobs": [jobs.job_summary(os.path.join(root, n)) for n in job_names()]})

    @routes.get("/vae_lab/jobs/{job}")
    async def get_job(request):
        name = request.match_info["job"]
        folder = _folder_or_none(name)
        return web.json_response(job_detail(name, folder)) if folder else not_found(name)

    @routes.get("/vae_lab/jobs/{job}/preview.png")
    async def get_preview(request):
        name = request.match_info["job"]
        folder = _folder_or_none(name)
        path = os.path.join(folder, "preview.png") if folder else None
        if path is None or not os.path.isfile(path):
            return not_found(name) if folder is None else web.json_response({"error": "no preview yet"}, status=404)
        return web.FileResponse(path, headers={"Cache-Control": "no-store"})

    @routes.post("/vae_lab/jobs/{job}/{action}")
    async def act(request):
        name, action = request.match_info["job"], request.match_info["action"]
        folder = _folder_or_none(name)
        if folder is None:
            return not_found(name)
        try:
            if action in ("stop", "pause"):
                jobs.request(folder, action)
            elif action == "resume":
                summary = jobs.job_summary(folder)
                if "resume" not in summary["actions"]:
                    raise jobs.JobError(f"job {name} is {summary['state']}: nothing to resume")
                jobs.write_status(folder, "queued", message="resuming", pid=launch_worker(folder).pid)
            elif action == "delete":
                jobs.delete_job(folder)
                with _tails_lock:
                    _tails.pop(name, None)
                return web.json_response({"job": name, "deleted": True})
            else:
                return web.json_response(
                    {"error": f"unknown action {action!r}: stop, pause, resume or delete"}, status=400
                )
        except jobs.JobError as exc:
            return web.json_response({"error": str(exc)}, status=409)
        return web.json_response(jobs.job_summary(folder))


class Monitor(threading.Thread):
    """Polls the jobs folder; sends an event for each job whose status or metrics changed, or that vanished."""

    def __init__(self, server):
        super().__init__(name="vae-lab-job-monitor", daemon=True)
        self.server = server
        self.seen: dict[str, tuple] = {}

    def run(self) -> None:
        while True:
            try:
                self.poll()
            except Exception:  # the monitor must outlive any odd folder
                LOG.exception("VAE Lab: job monitor")
            time.sleep(POLL_SECONDS)

    def poll(self) -> None:
        root = jobs_root()
        names = job_names()
        for name in names:
            folder = os.path.join(root, name)
            summary = jobs.job_summary(folder)
            _, rows = _tail(name, folder)
            key = tuple(summary[k] for k in ("state", "step", "message", "preview", "checkpoint_step", "updated"))
            if rows or self.seen.get(name) != key:
                self.seen[name] = key
                self.server.send_sync(EVENT, {"job": name, "summary": summary, "rows": rows[-MAX_ROWS_PER_EVENT:]})
        for gone in set(self.seen) - set(names):
            del self.seen[gone]
            with _tails_lock:
                _tails.pop(gone, None)
            self.server.send_sync(EVENT, {"job": gone, "deleted": True})


def start(server) -> None:
    register_routes(server)
    Monitor(server).start()
