"""Multi-process training on torch.distributed (CPU, gloo, 2 processes x 1 thread, launched by torchrun exactly as the
README says): a 2-rank job equals one process on the same global batch within float tolerance — with the LayerNorm
critic, the gradient penalty and the adaptive GAN weight all active — and a 2-rank job killed mid-step and resumed
ends bit-identical to an uninterrupted 2-rank job."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch
import torch.distributed
from test_finetune import taef2_model

from training import finetune, jobs, recipes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "run_job.py")
IMAGES = [os.path.join(ROOT, "assets", "images", n) for n in ("astronaut.png", "coffee.png")]

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="this torch build has no torch.distributed with gloo")


def make_job(root, name, total, interval, batch=2) -> str:
    # the GAN from the first steps: critic from step 0, adaptive-weighted generator loss from step 1
    recipe = finetune.recipe_with(recipes.RECIPES["furception-nolpips"], warmup_steps=1, gan_start=1,
                                  critic_warmup_steps=1)
    assert recipe.disc_norm == "layer" and recipe.gp_weight > 0
    config = finetune.FinetuneConfig(batch_size=batch, crop_size=32, crops_per_image=4, seed=5, eval_every=0)
    spec = jobs.JobSpec(recipe=recipe.as_dict(), config=asdict(config), total_steps=total, checkpoint_interval=interval,
                        train_images=IMAGES, family="tiny", threads=1, log_every=1)
    return jobs.create_job(str(root), name, {k: v.clone() for k, v in taef2_model().state_dict().items()}, spec)


def _env(fault=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("VAE_LAB_FAULT", None)
    if fault:
        env["VAE_LAB_FAULT"] = fault
    return env


def torchrun(folder, processes=2, fault=None) -> subprocess.CompletedProcess:
    """The README's command: torchrun --standalone --nproc_per_node N tools/run_job.py <job folder>."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                           SCRIPT, folder, "--device", "cpu"], env=_env(fault), capture_output=True, text=True,
                          timeout=600, check=False)


def single(folder) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, folder, "--device", "cpu"], env=_env(), capture_output=True, text=True,
                          timeout=600, check=False)


def newest(folder) -> dict:
    return jobs.load_checkpoint(jobs.checkpoint_paths(folder)[0])


def steps_logged(folder) -> list[dict]:
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == "step"]


def _relative(x: dict, y: dict, origin: dict | None = None) -> float:
    """||x - y|| / ||x - origin|| over all tensors (origin 0 when None)."""
    num = sum(float(((x[k].double() - y[k].double()) ** 2).sum()) for k in x)
    den = sum(float(((x[k].double() - (origin[k].double() if origin else 0)) ** 2).sum()) for k in x)
    return (num / max(den, 1e-300)) ** 0.5


def _moments(state: dict, part: str) -> dict:
    return {str(k): v["exp_avg"] for k, v in state[part]["state"].items()}


def test_two_processes_equal_one_on_the_same_global_batch(tmp_path):
    """One step: the averaged gradients (Adam's first moments) and every logged number equal one process's on the
    global batch to float tolerance. Three steps: the weights stay within a few % of the one-process run's update —
    Adam's first steps turn float-level gradient differences in near-zero elements into ±lr, so trajectories drift
    apart slowly — while rank 0 training on its half alone (no all-reduce) lands ~90 % away."""
    one, two = make_job(tmp_path, "one", 1, 1), make_job(tmp_path, "two", 1, 1)
    assert single(one).returncode == 0
    result = torchrun(two)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    a, b = newest(one), newest(two)
    assert b["world_size"] == 2 and len(b["rng"]) == 2 and a["world_size"] == 1
    for part in ("optimizer", "critic_optimizer"):
        ma, mb = _moments(a, part), _moments(b, part)
        for key in ma:
            assert _relative({key: ma[key]}, {key: mb[key]}) < 1e-3, (part, key)
    for ra, rb in zip(steps_logged(one), steps_logged(two), strict=True):
        for term in ("loss", "pixel", "critic", "gp"):
            assert rb[term] == pytest.approx(ra[term], rel=1e-5, abs=1e-7), term

    one, two, half = make_job(tmp_path, "one3", 3, 3), make_job(tmp_path, "two3", 3, 3), make_job(tmp_path, "half3", 3, 3, batch=1)
    assert single(one).returncode == 0 and single(half).returncode == 0
    result = torchrun(two)
    assert result.returncode == 0, result.stderr[-4000:]
    a, b, h = newest(one), newest(two), newest(half)
    base = taef2_model().state_dict()
    drift, alone = _relative(a["decoder"], b["decoder"], base), _relative(a["decoder"], h["decoder"], base)
    assert drift < 0.1 and drift < 0.1 * alone, (drift, alone)
    assert _relative(a["critic"], b["critic"]) < 1e-3 < _relative(a["critic"], h["critic"])
    rows_a, rows_b = steps_logged(one), steps_logged(two)
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b] == [1, 2, 3]
    assert "gan_weight" in rows_a[1] and "gp" in rows_a[0]  # the adaptive weight and the penalty were in play
    for ra, rb in zip(rows_a, rows_b):  # the numbers logged are the global batch's (averaged over the ranks)
        for term in ("loss", "pixel", "gan", "gan_weight", "critic", "gp"):
            if term in ra:
                assert rb[term] == pytest.approx(ra[term], rel=2e-2, abs=1e-3), (ra["step"], term)
    status = jobs.read_json(os.path.join(two, "status.json"))
    assert status["state"] == "done" and status["device"] == "2 × cpu"


def test_a_killed_two_process_job_resumes_to_exactly_the_uninterrupted_weights(tmp_path):
    reference, crashy = make_job(tmp_path, "reference", 6, 2), make_job(tmp_path, "crashy", 6, 2)
    result = torchrun(reference)
    assert result.returncode == 0, result.stderr[-4000:]
    killed = torchrun(crashy, fault="mid-step@4")  # both ranks SIGKILLed inside step 5's forward
    assert killed.returncode != 0, killed.stderr[-2000:]
    assert max(int(os.path.basename(p)[5:13]) for p in jobs.checkpoint_paths(crashy)) == 4
    resumed = torchrun(crashy)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    a, b = newest(reference), newest(crashy)
    assert a["step"] == b["step"] == 6
    for part in ("decoder", "critic"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    assert all(torch.equal(a["ema"]["shadow"][k], b["ema"]["shadow"][k]) for k in a["ema"]["shadow"])
    for key, moments in a["optimizer"]["state"].items():
        assert all(torch.equal(moments[n], b["optimizer"]["state"][key][n]) for n in ("exp_avg", "exp_avg_sq"))
    with open(os.path.join(crashy, "metrics.jsonl")) as f:
        assert "resumed from step 4" in f.read()


def test_a_headless_job_made_by_the_cli_and_a_global_batch_that_does_not_divide(tmp_path):
    """tools/make_job.py makes the same job folder as Start Finetune Job from a VAE file (here TAEF2's madebyollin pair)
    and refuses what it cannot use by name; torchrun refuses a global batch that does not divide by the processes."""
    make = [sys.executable, os.path.join(ROOT, "tools", "make_job.py"), "--root", str(tmp_path), "--steps", "2",
            "--crop-size", "64", "--threads", "1"]
    taef2 = os.path.join(ROOT, "assets", "taef2")
    result = subprocess.run([*make, "--name", "odd", "--batch-size", "3", "--vae", os.path.join(taef2, "taef2_decoder.pth"),
                             "--encoder", os.path.join(taef2, "taef2_encoder.pth")], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    folder = os.path.join(str(tmp_path), "odd")
    spec = jobs.load_spec(folder)
    assert spec.family == "tiny" and spec.config["batch_size"] == 3 and len(spec.train_images) + len(spec.held_out_images) == 8
    assert f"torchrun --standalone --nproc_per_node <GPUs> {SCRIPT} {folder}" in result.stdout
    again = subprocess.run([*make, "--name", "odd"], capture_output=True, text=True, check=False)
    assert again.returncode == 2 and "exists already" in again.stderr
    alone = subprocess.run([*make, "--name", "alone", "--vae", os.path.join(taef2, "taef2_decoder.pth")],
                           capture_output=True, text=True, check=False)
    assert alone.returncode == 2 and "holds a decoder only: give its encoder with --encoder" in alone.stderr
    result = torchrun(folder)
    assert result.returncode != 0
    status = jobs.read_json(os.path.join(folder, "status.json"))
    assert status["state"] == "failed" and "batch_size 3 is the global batch and must divide by the 2 processes" in status["message"]
