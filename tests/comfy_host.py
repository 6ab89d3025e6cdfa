"""Host tier: real ComfyUI servers on CPU, one per host ``tools/hosts.sh`` found (``$COMFYUI_DIR``, the ComfyUI the
pack is installed in, or both releases in ``../shared/comfyui`` set up once), with this pack linked in.

Nothing here imports ComfyUI: the server runs in its own process with the host's own Python, on a free loopback
port, with a temporary base directory (custom_nodes/, models/, input/, output/, temp/, user/) so a developer's
install stays clean.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACK_NAME = "vae_lab"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


@dataclass(frozen=True)
class Host:
    """One real ComfyUI: its release (``comfyui_version.py``), folder and Python."""

    release: str
    dir: str
    python: str

    def at_least(self, release: str) -> bool:
        return release_tuple(self.release) >= release_tuple(release)


def release_tuple(release: str) -> tuple[int, ...]:
    return tuple(int(part) if part.isdigit() else 0 for part in release.split("."))


def _release_of(comfy_dir: str) -> str:
    try:
        with open(os.path.join(comfy_dir, "comfyui_version.py")) as f:
            for line in f:
                if line.startswith("__version__"):
                    return line.split("=", 1)[1].strip().strip("\"'")
    except OSError:
        pass
    return "unknown"


def _python_of(comfy_dir: str) -> str:
    if os.environ.get("COMFYUI_PYTHON"):
        return os.environ["COMFYUI_PYTHON"]
    for venv in ("venv", ".venv"):
        candidate = os.path.join(comfy_dir, venv, "bin", "python")
        if os.path.exists(candidate):
            return candidate
    raise RuntimeError(f"no Python for ComfyUI: set COMFYUI_PYTHON or create {comfy_dir}/venv")


def newest_release() -> str | None:
    """The newest release among the hosts found (None without any)."""
    found = hosts()
    return max(found, key=lambda h: release_tuple(h.release)).release if found else None


def hosts() -> list[Host]:
    """The hosts ``tools/test.sh`` found (``VAE_LAB_HOSTS``: lines of release, folder, Python separated by tabs, as
    ``tools/hosts.sh`` prints them); without it, ``COMFYUI_DIR`` alone (pytest run by hand)."""
    listed = os.environ.get("VAE_LAB_HOSTS")
    if listed is not None:
        found = []
        for line in listed.splitlines():
            if line.strip():
                release, folder, python = line.split("\t")
                found.append(Host(release, folder, python))
        return found
    path = os.environ.get("COMFYUI_DIR")
    if path and os.path.isfile(os.path.join(path, "main.py")):
        return [Host(_release_of(path), path, _python_of(path))]
    return []


HOSTS = hosts()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    def __init__(self, host: Host, base: str | None = None):
        """A server on a fresh base directory, or on ``base`` (one a stopped server left with ``stop(remove=False)``:
        ComfyUI restarted on the same folders)."""
        self.host = host
        self.release = host.release
        comfy_dir = self.comfy_dir = host.dir
        self.base = base or tempfile.mkdtemp(prefix="vae_lab_host_")
        if base is None:
            for sub in ("custom_nodes", "models", "input", "output", "temp", "user"):
                os.makedirs(os.path.join(self.base, sub))
            os.symlink(ROOT, os.path.join(self.base, "custom_nodes", PACK_NAME))
            example = os.path.join(comfy_dir, "input", "example.png")
            if os.path.exists(example):
                shutil.copy(example, os.path.join(self.base, "input", "example.png"))
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(self.base, "server.log")
        self._log = open(self.log_path, "a")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            [
                host.python,
                "main.py",
                "--cpu",
                "--listen",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--disable-auto-launch",
                "--base-directory",
                self.base,
            ],
            cwd=comfy_dir,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode}:\n{self.log()[-4000:]}")
            try:
                self.get("/system_stats")
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        raise RuntimeError(f"ComfyUI did not answer within {timeout}s:\n{self.log()[-4000:]}")

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            body = r.read()
        return json.loads(body) if body[:1] in (b"{", b"[") else body

    def post(self, path: str, payload):
        request = urllib.request.Request(
            self.url + path, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                body = r.read()
                return json.loads(body) if body.strip() else None
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"POST {path} -> {exc.code}: {exc.read().decode(errors='replace')[:4000]}") from exc

    def run_prompt(self, prompt: dict, timeout: float = 900, expect_error: bool = False) -> dict:
        """Queues an API-format prompt, waits for it, returns its history entry; fails on execution_error
        (or, with ``expect_error``, returns that error's data and fails without one)."""
        answer = self.post("/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})
        assert not answer.get("node_errors"), answer
        prompt_id = answer["prompt_id"]
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                entry = history[prompt_id]
                errors = [m for m in entry["status"].get("messages", []) if m[0] == "execution_error"]
                if expect_error:
                    assert errors, "the prompt was expected to fail"
                    return errors[0][1]
                assert not errors, json.dumps(errors, indent=1)[:4000]
                assert entry["status"]["completed"], entry["status"]
                return entry
            time.sleep(0.25)
        raise AssertionError(f"prompt {prompt_id} did not finish within {timeout}s\n{self.log()[-3000:]}")

    def forget_cached_outputs(self) -> None:
        """Empties the server's node cache, so the next prompt runs as in a fresh ComfyUI.

        Needed because a cached node is not executed again, and 0.8.0 then leaves the UI output of a cached node that
        is not an output node out of the prompt's history (0.3.64 kept it): a test's prompt whose node equals one an
        earlier test ran would find no summary. ``/free`` only sets a flag the prompt worker reads between queue
        items, so a tiny prompt is run after it as a fence: once that prompt is in the history the reset has happened
        or happens before the worker takes the next item."""
        self.post("/free", {"unload_models": True, "free_memory": True})
        fence = {
            "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
            "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
        }
        self.run_prompt(fence, timeout=120)

    def stop(self, remove: bool = True) -> None:
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self._log.close()
        if remove:
            shutil.rmtree(self.base, ignore_errors=True)


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """Converts a UI-format workflow (what users drag in) to the API format /prompt takes, using the live
    server's node definitions to map ``widgets_values`` onto input names, as the frontend does."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node.get("mode", 0) in (2, 4) or node["type"] not in object_info:  # muted/bypassed, or UI-only (Note)
            continue
        definition = object_info[node["type"]]["input"]
        connected = {i["name"]: i.get("link") for i in node.get("inputs", []) if i.get("link") is not None}
        values = list(node.get("widgets_values") or [])
        inputs = {}
        for section in ("required", "optional"):
            for name, spec in definition.get(section, {}).items():
                kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
                is_widget = isinstance(kind, list) or kind in WIDGET_TYPES
                if name in connected:
                    link = links[connected[name]]
                    inputs[name] = [str(link[1]), link[2]]
                    if is_widget and values:
                        values.pop(0)  # a widget converted to an input keeps its slot in widgets_values
                elif is_widget and values:
                    inputs[name] = values.pop(0)
                    if options.get("control_after_generate") or name in ("seed", "noise_seed"):
                        values.pop(0)
                    if options.get("image_upload"):
                        values.pop(0)
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def run_host_script(host: Host, name: str, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """Runs ``tests/host_scripts/<name>`` with the host's own Python, in its folder, with its folder as first
    argument."""
    script = os.path.join(ROOT, "tests", "host_scripts", name)
    return subprocess.run(
        [host.python, script, host.dir, *args],
        cwd=host.dir,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def cascade_files(host: Host) -> dict[str, str]:
    """Random-weight Stable Cascade files (stage-B-lite checkpoint with stage A, stage A, effnet) in the layout of
    this release's own classes, made by its Python (tests/host_scripts/cascade_files.py) under
    ``$VAE_LAB_TEST_CACHE`` (default ~/.cache/vae_lab_tests; 1.6 GB), once per machine and layout: releases whose
    classes agree share them. Name -> path."""
    cache = os.environ.get("VAE_LAB_TEST_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "vae_lab_tests"))
    result = run_host_script(host, "cascade_files.py", cache)
    if result.returncode != 0:
        raise RuntimeError(f"cascade_files.py failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])
