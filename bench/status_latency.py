#!/usr/bin/env python3
"""Latency of the VAE Lab panel's routes while a background job trains and other workflows execute, on loopback
against a real ComfyUI (CPU unless the machine has CUDA). Target: p99 < 200 ms. Reference in the same run: core's own
``/system_stats`` route under the same load (what any page of ComfyUI waits on).

    python bench/status_latency.py --comfyui $COMFYUI_DIR [--requests 300] [--job-steps 100000]

Load: one job (the bundled TAEF2, furception-nolpips, batch 2 of 128² crops) training in its worker process, and a
thread queueing the load_tiny_autoencoder_taef2 example workflow (TAEF2 encode + decode + Oklab loss) back to back,
its image rescaled to a new size each time so nothing is served from cache. The job is stopped and deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
import urllib.request

PACK = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(PACK, "tests"))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def timed_get(url: str) -> float:
    start = time.perf_counter()
    with urllib.request.urlopen(url, timeout=30) as r:
        r.read()
    return (time.perf_counter() - start) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_DIR"), help="ComfyUI checkout with its venv")
    parser.add_argument("--requests", type=int, default=300, help="requests per route")
    parser.add_argument("--job-steps", type=int, default=100_000)
    parser.add_argument("--pause", type=float, default=0.05, help="seconds between rounds of requests")
    args = parser.parse_args()
    if not args.comfyui:
        parser.error("--comfyui (or $COMFYUI_DIR) must name a ComfyUI checkout")
    from comfy_host import ComfyServer, ui_to_api

    server = ComfyServer(args.comfyui)
    try:
        server.wait_ready()
        info = server.get("/object_info")
        with open(os.path.join(PACK, "example_workflows", "background_finetune_job.json")) as f:
            start = ui_to_api(json.load(f), info)
        node = next(k for k, v in start.items() if v["class_type"] == "VAELab_StartFinetuneJob")
        start[node]["inputs"].update(
            job_name="latency_bench", total_steps=args.job_steps, checkpoint_interval=50, batch_size=2, crop_size=128
        )
        server.run_prompt(start, timeout=120)
        deadline = time.time() + 300
        while (
            server.get("/vae_lab/jobs/latency_bench")["state"] != "running"
            or not server.get("/vae_lab/jobs/latency_bench")["steps"]
        ):
            if time.time() > deadline:
                raise RuntimeError("the job did not start training")
            time.sleep(0.5)
        with open(os.path.join(PACK, "example_workflows", "load_tiny_autoencoder_taef2.json")) as f:
            other = ui_to_api(json.load(f), info)
        load = next(k for k, v in other.items() if v["class_type"] == "LoadImage")
        for value in other.values():  # example.png -> ImageScale (a new size each run: never served from cache) -> ...
            for key, link in value["inputs"].items():
                if link == [load, 0]:
                    value["inputs"][key] = ["scale", 0]
        other["scale"] = {
            "class_type": "ImageScale",
            "inputs": {"image": [load, 0], "upscale_method": "bilinear", "width": 256, "height": 256, "crop": "center"},
        }
        stop, executed = threading.Event(), [0]

        def generate():
            size = 256
            while not stop.is_set():
                other["scale"]["inputs"]["width"] = other["scale"]["inputs"]["height"] = size
                size = 256 + (size - 256 + 8) % 256
                try:
                    server.run_prompt(other, timeout=300)
                    executed[0] += 1
                except AssertionError:
                    if not stop.is_set():
                        raise

        thread = threading.Thread(target=generate, daemon=True)
        thread.start()
        time.sleep(2)
        routes = {
            "GET /vae_lab/jobs": "/vae_lab/jobs",
            "GET /vae_lab/jobs/<job>": "/vae_lab/jobs/latency_bench",
            "GET /system_stats (core, reference)": "/system_stats",
        }
        results = {name: [] for name in routes}
        first_step, began = server.get("/vae_lab/jobs/latency_bench")["step"], time.perf_counter()
        for _ in range(args.requests):  # interleaved, so every route sees the same load
            for name, path in routes.items():
                results[name].append(timed_get(server.url + path))
            time.sleep(args.pause)
        stop.set()
        seconds = time.perf_counter() - began
        steps = server.get("/vae_lab/jobs/latency_bench")
        print(
            f"\nComfyUI on {'CUDA' if 'cuda' in str(steps.get('device')) else 'CPU'}; "
            f"over {seconds:.0f} s the job went from step {first_step} to {steps['step']} "
            f"({steps.get('images_per_second') or 0:.2f} img/s) and "
            f"{executed[0]} other workflows executed; {args.requests} requests per route\n"
        )
        print("| route | p50 ms | p99 ms | max ms |")
        print("|---|---:|---:|---:|")
        for name, values in results.items():
            print(f"| {name} | {statistics.median(values):.1f} | {percentile(values, 99):.1f} | {max(values):.1f} |")
        thread.join(timeout=300)
        request = urllib.request.Request(server.url + "/vae_lab/jobs/latency_bench/stop", method="POST", data=b"")
        urllib.request.urlopen(request, timeout=30).read()
        while server.get("/vae_lab/jobs/latency_bench")["state"] != "stopped":
            time.sleep(0.5)
        request = urllib.request.Request(server.url + "/vae_lab/jobs/latency_bench/delete", method="POST", data=b"")
        urllib.request.urlopen(request, timeout=30).read()
    finally:
        server.stop()


if __name__ == "__main__":
    main()
