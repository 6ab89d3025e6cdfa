"""Host tier: a real ComfyUI server on CPU, booted from ``$COMFYUI_DIR`` with this pack linked in.

Nothing here imports ComfyUI: the server runs in its own process with its own Python (``$COMFYUI_PYTHON``,
else ``$COMFYUI_DIR/venv/bin/python`` or ``.venv``), on a free loopback port, with a temporary base
directory (custom_nodes/, models/, input/, output/, temp/, user/) so a developer's install stays clean.
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACK_NAME = "vae_lab"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def comfyui_dir() -> str | None:
    path = os.environ.get("COMFYUI_DIR")
    return path if path and os.path.isfile(os.path.join(path, "main.py")) else None


def comfyui_python(comfy_dir: str) -> str:
    if os.environ.get("COMFYUI_PYTHON"):
        return os.environ["COMFYUI_PYTHON"]
    for venv in ("venv", ".venv"):
        candidate = os.path.join(comfy_dir, venv, "bin", "python")
        if os.path.exists(candidate):
            return candidate
    raise RuntimeError(f"no Python for ComfyUI: set COMFYUI_PYTHON or create {comfy_dir}/venv")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    def __init__(self, comfy_dir: str, base: str | None = None):
        """A server on a fresh base directory, or on ``base`` (one a stopped server left with ``stop(remove=False)``:
        ComfyUI restarted on the same folders)."""
        self.comfy_dir = comfy_dir
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
            [comfyui_python(comfy_dir), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
             "--disable-auto-launch", "--base-directory", self.base],
            cwd=comfy_dir, stdout=self._log, stderr=subprocess.STDOUT, env=env,
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
        request = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                body = r.read()
                return json.loads(body) if body.strip() else None
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"POST {path} -> {exc.code}: {exc.read().decode(errors='replace')[:4000]}") from exc

    def run_prompt(self, prompt: dict, timeout: float = 300, expect_error: bool = False) -> dict:
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


def cascade_files() -> dict[str, str]:
    """Random-weight Stable Cascade files (stage-B-lite checkpoint with stage A, stage A, effnet), made once per
    machine by ComfyUI's own Python (tests/host_scripts/cascade_files.py) under ``$VAE_LAB_TEST_CACHE`` (default
    ~/.cache/vae_lab_tests; 1.6 GB). Name -> path."""
    comfy = comfyui_dir()
    cache = os.environ.get("VAE_LAB_TEST_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "vae_lab_tests"))
    script = os.path.join(ROOT, "tests", "host_scripts", "cascade_files.py")
    result = subprocess.run([comfyui_python(comfy), script, comfy, cache], cwd=comfy, capture_output=True, text=True,
                            timeout=900, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"cascade_files.py failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])
