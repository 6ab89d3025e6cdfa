"""Host tier: background jobs inside a real ComfyUI (CPU) — the panel's routes and events, pause / resume / stop /
delete from the routes, a job that keeps training while another workflow executes, Load Finetune Job following the
job's newest checkpoint, and Start Finetune Job on an IMAGE batch. Skipped unless COMFYUI_DIR names a ComfyUI."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
import uuid

from comfy_host import ROOT, ui_to_api


def start_prompt(server, name, total_steps=400, interval=10, crop=64):
    with open(os.path.join(ROOT, "example_workflows", "background_finetune_job.json")) as f:
        prompt = ui_to_api(json.load(f), server.get("/object_info"))
    start = next(k for k, v in prompt.items() if v["class_type"] == "VAELab_StartFinetuneJob")
    prompt[start]["inputs"].update(
        job_name=name, total_steps=total_steps, checkpoint_interval=interval, crop_size=crop, batch_size=1
    )
    return prompt


def request(server, method, path):
    """(status code, JSON body) of a route, errors included."""
    req = urllib.request.Request(server.url + path, method=method, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, (json.loads(r.read()) if r.headers.get_content_type() == "application/json" else r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def wait(predicate, timeout=300, what=""):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def summary(server, name):
    return request(server, "GET", f"/vae_lab/jobs/{name}")[1]


def test_routes_events_and_the_job_lifecycle(comfy_server):
    import websocket

    server, name = comfy_server, "panel_routes"
    ws = websocket.create_connection(f"ws://127.0.0.1:{server.port}/ws?clientId={uuid.uuid4().hex}", timeout=5)
    try:
        server.run_prompt(start_prompt(server, name), timeout=120)
        events = []

        def got_progress():
            try:
                message = json.loads(ws.recv())
            except (websocket.WebSocketTimeoutException, ValueError):
                return False
            if message.get("type") == "vae_lab.job" and message["data"].get("job") == name:
                events.append(message["data"])
            return any(e["summary"]["state"] == "running" and e["summary"]["step"] > 0 and e["rows"] for e in events)

        wait(got_progress, 300, "a vae_lab.job event with progress")
        assert any(r["kind"] == "step" and "pixel" in r for e in events for r in e["rows"])
    finally:
        ws.close()

    code, listing = request(server, "GET", "/vae_lab/jobs")
    assert code == 200 and name in [j["job"] for j in listing["jobs"]]
    detail = wait(
        lambda: (d := summary(server, name)) and d.get("preview") and d.get("checkpoint_step") and d,
        300,
        "a checkpoint",
    )
    assert detail["state"] == "running" and detail["total"] == 400 and detail["actions"] == ["pause", "stop"]
    assert detail["steps"] and [e for e in detail["evals"] if e["weights"] == "base"]
    code, png = request(server, "GET", f"/vae_lab/jobs/{name}/preview.png")
    assert code == 200 and png[:8] == b"\x89PNG\r\n\x1a\n"
    assert request(server, "GET", "/api/vae_lab/jobs")[0] == 200  # also under /api, as the frontend calls it

    # only names of existing jobs: no paths, nothing outside the jobs folder
    for bad in ("..%2F..%2Fuser", "..", "%2Fetc%2Fpasswd", "nope", ".device-cpu.lock"):
        assert request(server, "GET", f"/vae_lab/jobs/{bad}")[0] == 404, bad
        assert request(server, "GET", f"/vae_lab/jobs/{bad}/preview.png")[0] == 404, bad
        assert request(server, "POST", f"/vae_lab/jobs/{bad}/delete")[0] == 404, bad
    assert request(server, "POST", f"/vae_lab/jobs/{name}/explode")[0] == 400
    code, answer = request(server, "POST", f"/vae_lab/jobs/{name}/delete")
    assert code == 409 and "stop it first" in answer["error"]

    # another workflow executes while the job trains; the job advances meanwhile
    before = summary(server, name)["step"]
    other = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
    }
    server.run_prompt(other, timeout=60)
    wait(lambda: summary(server, name)["step"] > before, 120, "the job to advance")

    # pause -> paused (checkpoint at the step), resume -> running again, stop -> stopped, delete -> gone
    assert request(server, "POST", f"/vae_lab/jobs/{name}/pause")[0] == 200
    paused = wait(lambda: (s := summary(server, name))["state"] == "paused" and s, 120, "paused")
    assert paused["checkpoint_step"] == paused["step"] and paused["actions"] == ["resume", "stop", "delete"]
    assert request(server, "POST", f"/vae_lab/jobs/{name}/pause")[0] == 409
    assert request(server, "POST", f"/vae_lab/jobs/{name}/resume")[0] == 200
    wait(
        lambda: (s := summary(server, name))["state"] == "running" and s["step"] > paused["step"],
        300,
        "resumed progress",
    )
    assert request(server, "POST", f"/vae_lab/jobs/{name}/stop")[0] == 200
    stopped = wait(lambda: (s := summary(server, name))["state"] == "stopped" and s, 120, "stopped")
    assert stopped["checkpoint_step"] == stopped["step"]
    with open(os.path.join(server.base, "output", "vae_lab_jobs", name, "metrics.jsonl")) as f:
        log = f.read()
    assert f"resumed from step {paused['step']}" in log
    assert request(server, "POST", f"/vae_lab/jobs/{name}/delete")[1] == {"job": name, "deleted": True}
    assert request(server, "GET", f"/vae_lab/jobs/{name}")[0] == 404
    assert not os.path.exists(os.path.join(server.base, "output", "vae_lab_jobs", name))


def test_load_finetune_job_follows_the_newest_checkpoint_while_the_job_trains(comfy_server):
    server, name = comfy_server, "follow_me"
    # 64 px crops, batch 1: a checkpoint every few seconds on 2 CPU cores; far more steps than the test waits for
    prompt = start_prompt(server, name, total_steps=100_000, interval=5)
    server.run_prompt(prompt, timeout=120)
    load = {
        "1": {"class_type": "VAELab_LoadFinetuneJob", "inputs": {"job": name, "weights": "ema"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
        "3": {"class_type": "VAEEncode", "inputs": {"pixels": ["2", 0], "vae": ["1", 0]}},
        "4": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["1", 0]}},
        "5": {"class_type": "PreviewImage", "inputs": {"images": ["4", 0]}},
    }
    wait(lambda: (summary(server, name).get("checkpoint_step") or 0) >= 5, 300, "a first checkpoint")
    first = server.run_prompt(load, timeout=120)["outputs"]["1"]["vae_lab"][0]["step"]
    wait(lambda: (summary(server, name).get("checkpoint_step") or 0) > first, 300, "a newer checkpoint")
    second = server.run_prompt(load, timeout=120)["outputs"]["1"]["vae_lab"][0]["step"]
    assert second > first  # re-queuing the same prompt is not served from cache: the fingerprint follows the checkpoint
    load["1"]["inputs"]["step"] = second  # a chosen checkpoint stays put while newer ones come
    assert server.run_prompt(load, timeout=120)["outputs"]["1"]["vae_lab"][0]["step"] == second
    load["1"]["inputs"]["step"] = 999_999
    error = server.run_prompt(load, timeout=120, expect_error=True)["exception_message"]
    assert "has no checkpoint of step 999999; it keeps steps [" in error
    request(server, "POST", f"/vae_lab/jobs/{name}/stop")
    wait(lambda: summary(server, name)["state"] == "stopped", 120, "stopped")


def test_a_job_started_from_an_image_batch(comfy_server):
    server, name = comfy_server, "from_a_batch"
    prompt = start_prompt(server, name, total_steps=4, interval=2)
    start = next(k for k, v in prompt.items() if v["class_type"] == "VAELab_StartFinetuneJob")
    prompt["9"] = {"class_type": "LoadImage", "inputs": {"image": "example.png"}}
    prompt[start]["inputs"].update(images=["9", 0], folder="", held_out_fraction=0.0)
    entry = server.run_prompt(prompt, timeout=120)
    assert "from the IMAGE input (1 images)" in entry["outputs"][start]["text"][0]
    done = wait(lambda: (s := summary(server, name))["state"] in ("done", "failed") and s, 300, "the job to end")
    assert done["state"] == "done", done
    folder = os.path.join(server.base, "output", "vae_lab_jobs", name)
    assert os.listdir(os.path.join(folder, "images")) == ["train_00000.png"]
    prompt[start]["inputs"]["folder"] = "bundled"
    prompt[start]["inputs"]["job_name"] = name + "_2"
    error = server.run_prompt(prompt, timeout=60, expect_error=True)
    assert "both images and folder are set" in error["exception_message"]


def _status(folder):
    with open(os.path.join(folder, "status.json")) as f:
        return json.load(f)


def test_a_job_survives_a_comfyui_restart_as_interrupted_and_resumes(comfy_host):
    """ComfyUI stops while a job trains: the worker checkpoints and stops as 'interrupted' (no orphan); a new ComfyUI on
    the same folders lists it with Resume, and Resume continues from that checkpoint."""
    from comfy_host import ComfyServer

    first = ComfyServer(comfy_host)
    second = None
    try:
        first.wait_ready()
        name = "restart_me"
        first.run_prompt(start_prompt(first, name), timeout=120)
        wait(lambda: summary(first, name).get("step", 0) > 0, 300, "training")
        first.stop(remove=False)
        folder = os.path.join(first.base, "output", "vae_lab_jobs", name)
        status = wait(
            lambda: (s := _status(folder))["state"] == "interrupted" and s, 60, "the worker to notice ComfyUI is gone"
        )
        assert f"step_{status['step']:08d}.pt" in os.listdir(os.path.join(folder, "checkpoints"))
        second = ComfyServer(comfy_host, base=first.base)
        second.wait_ready()
        listed = {j["job"]: j for j in request(second, "GET", "/vae_lab/jobs")[1]["jobs"]}
        assert listed[name]["state"] == "interrupted" and "resume" in listed[name]["actions"]
        assert request(second, "POST", f"/vae_lab/jobs/{name}/resume")[0] == 200
        wait(lambda: (s := summary(second, name))["state"] == "running" and s["step"] > status["step"], 300, "resumed")
        with open(os.path.join(folder, "metrics.jsonl")) as f:
            assert f"resumed from step {status['step']}" in f.read()
        request(second, "POST", f"/vae_lab/jobs/{name}/stop")
        wait(lambda: summary(second, name)["state"] == "stopped", 120, "stopped")
    finally:
        if second is not None:
            second.stop()
        else:
            first.stop()


def test_start_finetune_job_continues_a_training_state_from_the_graph(comfy_server):
    """Decoder Finetune Steps (2 steps) → its training_state into Start Finetune Job (total 4, gradient checkpointing
    on): the job resumes at step 2 and finishes at 4 with gradient checkpointing in its config."""
    server, name = comfy_server, "continued_from_graph"
    with open(os.path.join(ROOT, "example_workflows", "finetune_decoder_on_folder.json")) as f:
        graph = ui_to_api(json.load(f), server.get("/object_info"))
    loader = next(k for k, v in graph.items() if v["class_type"] == "VAELab_LoadTinyAutoencoder")
    steps = next(k for k, v in graph.items() if v["class_type"] == "VAELab_DecoderFinetuneSteps")
    prompt = {loader: graph[loader], steps: graph[steps]}
    prompt[steps]["inputs"].update(steps=2, batch_size=1, crop_size=64)
    start = start_prompt(server, name, total_steps=4, interval=2)
    node = next(k for k, v in start.items() if v["class_type"] == "VAELab_StartFinetuneJob")
    prompt["start"] = start[node]
    prompt["start"]["inputs"].update(vae=[loader, 0], training_state=[steps, 1], gradient_checkpointing=True)
    entry = server.run_prompt(prompt, timeout=300)
    assert "continues the connected training_state from step 2" in entry["outputs"]["start"]["text"][0]
    done = wait(lambda: (s := summary(server, name))["state"] in ("done", "failed") and s, 300, "the job to end")
    assert done["state"] == "done" and done["step"] == 4, done
    folder = os.path.join(server.base, "output", "vae_lab_jobs", name)
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        assert "resumed from step 2" in f.read()
    assert jobs_spec(folder)["config"]["gradient_checkpointing"] is True


def jobs_spec(folder):
    with open(os.path.join(folder, "job.json")) as f:
        return json.load(f)
