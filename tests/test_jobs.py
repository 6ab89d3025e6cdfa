"""Background jobs (host-free part): the job folder and the worker script on the real TAEF2, on the CPU with one thread.
Crash safety by fault injection: the worker SIGKILLs itself at named phases, or is SIGKILLed from outside at random
moments; a restart resumes from the last good checkpoint and ends with a final checkpoint equal to an uninterrupted
run's in every value (weights, EMA, optimisers, critic, RNG states, counters, history)."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import asdict

import pytest
import torch
from test_finetune import taef2_model

from training import finetune, jobs, recipes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "run_job.py")
IMAGES = [os.path.join(ROOT, "assets", "images", n) for n in ("astronaut.png", "coffee.png")]
HELD = [os.path.join(ROOT, "assets", "images", "grass.png")]
TOTAL, INTERVAL = 12, 4


def make_job(root, name, total=TOTAL, interval=INTERVAL, held=True, batch=1, crop=32, log_every=2) -> str:
    model = taef2_model()
    recipe = recipes.recipe_with(recipes.RECIPES["furception-nolpips"], lr=3e-4, warmup_steps=2)
    config = finetune.FinetuneConfig(
        batch_size=batch, crop_size=crop, crops_per_image=2, seed=3, eval_every=6, eval_size=64
    )
    spec = jobs.JobSpec(
        recipe=recipe.as_dict(),
        config=asdict(config),
        total_steps=total,
        checkpoint_interval=interval,
        train_images=IMAGES,
        held_out_images=HELD if held else [],
        family="tiny",
        threads=1,
        log_every=log_every,
    )
    return jobs.create_job(str(root), name, {k: v.clone() for k, v in model.state_dict().items()}, spec)


def worker_env(fault: str | None = None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("VAE_LAB_FAULT", None)
    if fault:
        env["VAE_LAB_FAULT"] = fault
    return env


def run_worker(folder, fault: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, SCRIPT, folder, "--device", "cpu"],
        env=worker_env(fault),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def read_text(path) -> str:
    with open(path) as f:
        return f.read()


def final_state(folder) -> dict:
    return jobs.load_checkpoint(jobs.checkpoint_paths(folder)[0])


# Checkpoint fields allowed to differ between a killed-and-resumed run and an uninterrupted one: none. A checkpoint
# holds no wall-clock times, pids or paths (those live in status.json and metrics.jsonl, which are not compared); its
# history and evaluations are loss and metric values, which a bit-exact resume reproduces. A field that is legitimately
# run-specific would be named here (as a path such as "rng/0/cpu") with the reason.
RUN_SPECIFIC: dict[str, str] = {}


def state_differences(a, b, path: str = "", skip=RUN_SPECIFIC) -> list[str]:
    """Every place where two saved states differ, recursively through dicts, lists and tuples: tensors must have the
    same dtype, shape and bits (NaN equals NaN, -0.0 differs from 0.0), floats the same value and sign (NaN equals
    NaN), everything else be equal."""
    if path.lstrip("/") in skip:
        return []
    here = path or "/"
    if type(a) is not type(b):
        return [f"{here}: {type(a).__name__} vs {type(b).__name__}"]
    if isinstance(a, dict):
        out = [f"{here}: keys {sorted(map(str, a.keys() ^ b.keys()))} in one only"] if a.keys() != b.keys() else []
        for key in a.keys() & b.keys():
            out += state_differences(a[key], b[key], f"{path}/{key}", skip)
        return out
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return [f"{here}: {len(a)} vs {len(b)} items"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in state_differences(x, y, f"{path}/{i}", skip)]
    if isinstance(a, torch.Tensor):
        if a.dtype != b.dtype or a.shape != b.shape:
            return [f"{here}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"]
        bits_a, bits_b = (t.detach().cpu().contiguous().reshape(-1).view(torch.uint8) for t in (a, b))
        if not torch.equal(bits_a, bits_b):
            changed = int((bits_a != bits_b).sum())
            return [f"{here}: {changed} of {bits_a.numel()} bytes differ"]
        return []
    if isinstance(a, float):
        return (
            []
            if (a == b and math.copysign(1, a) == math.copysign(1, b)) or (math.isnan(a) and math.isnan(b))
            else [f"{here}: {a!r} vs {b!r}"]
        )
    return [] if a == b else [f"{here}: {a!r} vs {b!r}"]


def assert_same_training(a: dict, b: dict, total: int = TOTAL) -> None:
    """The whole final checkpoint equal, value by value (see ``state_differences``)."""
    assert a["step"] == b["step"] == total
    differences = state_differences(a, b)
    assert not differences, f"{len(differences)} differences: " + "; ".join(sorted(differences)[:20])


def test_the_state_comparator_sees_every_part():
    """The comparator finds a difference anywhere: a nested tensor's bits, the RNG state, a counter, a list, a key."""
    state = {
        "step": 3,
        "rng": [{"cpu": torch.get_rng_state()}],
        "decoder": {"w": torch.tensor([0.0, float("nan")])},
        "history": [{"loss": 0.5}],
        "config": {"seed": 3},
    }

    def changed(edit):
        other = {k: (v.copy() if isinstance(v, (dict, list)) else v) for k, v in state.items()}
        edit(other)
        return state_differences(state, other)

    assert state_differences(state, {**state}) == []  # NaN equals NaN
    signed_zero = {"w": torch.tensor([-0.0, float("nan")])}
    assert changed(lambda s: s.update(decoder=signed_zero)) == ["/decoder/w: 1 of 8 bytes differ"]
    torch.rand(1)  # one draw moves the generator
    assert changed(lambda s: s.update(rng=[{"cpu": torch.get_rng_state()}]))[0].startswith("/rng/0/cpu:")
    assert changed(lambda s: s.update(step=4)) == ["/step: 3 vs 4"]
    assert changed(lambda s: s.update(history=[{"loss": 0.5}, {"loss": 0.4}])) == ["/history: 1 vs 2 items"]
    assert changed(lambda s: s.update(config={"seed": 3, "extra": 1})) == ["/config: keys ['extra'] in one only"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    folder = make_job(tmp_path_factory.mktemp("jobs"), "reference")
    result = run_worker(folder)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder


def test_a_job_runs_to_the_end_with_status_metrics_and_bounded_checkpoints(reference):
    status = jobs.read_json(os.path.join(reference, "status.json"))
    assert status["state"] == "done" and status["step"] == TOTAL and status["images_per_second"] > 0
    names = [os.path.basename(p) for p in jobs.checkpoint_paths(reference)]
    assert names == ["step_00000012.pt", "step_00000008.pt", "step_00000004.pt"]  # keep_last 3 of 3
    rows = [json.loads(line) for line in read_text(os.path.join(reference, "metrics.jsonl")).splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "step"] == [2, 4, 6, 8, 10, 12]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert evals and all(r["psnr"] > 10 for r in evals)
    assert not [n for n in os.listdir(os.path.join(reference, "checkpoints")) if n.endswith(".tmp")]


@pytest.mark.parametrize("phase", ["mid-step@6", "after-temp-write@8", "after-rename@8", "latent-cache"])
def test_a_killed_job_resumes_to_exactly_the_uninterrupted_weights(tmp_path, reference, phase):
    folder = make_job(tmp_path, "crashy")
    killed = run_worker(folder, fault=phase)
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr[-2000:])
    assert jobs.read_json(os.path.join(folder, "status.json"))["state"] == "running"  # what a restart finds
    steps_on_disk = [int(os.path.basename(p)[5:13]) for p in jobs.checkpoint_paths(folder)]
    if phase == "latent-cache":
        assert steps_on_disk == []
    else:
        kill_step = int(phase.split("@")[1])
        assert steps_on_disk and max(steps_on_disk) >= kill_step - INTERVAL  # lost at most one interval
    resumed = run_worker(folder)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_training(final_state(folder), final_state(reference))


def test_the_worker_seeds_or_restores_the_training_rng_and_nothing_else_moves_it(tmp_path):
    """The global generator is the training's: after ``training_run`` it is the seed's (a fresh run, whatever the
    process drew before) or the checkpoint's (a resume), and building models, the trainer with its critic, and a
    preview leave it where it was. (The end-to-end check is the random-kill test below; this one says where a
    regression is.)"""
    from training.data import load_image01

    folder = make_job(tmp_path, "quiet", held=False)
    worker = jobs.Worker(folder, "cpu")
    recipe, config = recipes.Recipe(**worker.spec.recipe), finetune.FinetuneConfig(**worker.spec.config)
    assert recipe.gan_weight > 0  # the trainer builds a critic
    torch.rand(7)  # whatever the process drew before
    before = torch.get_rng_state()
    worker.build_model()
    assert torch.equal(torch.get_rng_state(), before)

    images = [load_image01(path) for path in IMAGES]
    with worker.training_run(recipe, None, images, []) as training:
        run = training.trainer
        seeded = torch.get_rng_state()
        worker.write_preview(run, None, training.cache)
        run.train_step()
        assert torch.equal(torch.get_rng_state(), seeded)  # the preview and a step drew nothing from it
        jobs.seed_training_rng(config.seed)
        assert torch.equal(torch.get_rng_state(), seeded)  # a function of the seed alone
        state = run.state_dict()
    saved = torch.Generator().manual_seed(11).get_state()
    state["rng"], state["world_size"] = [{"cpu": saved}], 1
    torch.rand(3)
    with worker.training_run(recipe, state, images, []) as resumed:
        worker.write_preview(resumed.trainer, None, resumed.cache)
        assert torch.equal(torch.get_rng_state(), saved) and resumed.step == 1


KILLS, LONG_TOTAL, LONG_INTERVAL = 20, 40, 3
FAULT_PHASES = ("mid-step", "after-temp-write", "after-rename", "latent-cache")


class MetricsReader:
    """The rows appended to a job's metrics.jsonl since the last read (whole lines only)."""

    def __init__(self, folder):
        self.path = os.path.join(folder, "metrics.jsonl")
        self.offset = os.path.getsize(self.path) if os.path.exists(self.path) else 0

    def rows(self) -> list[dict]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except OSError:
            return []
        end = chunk.rfind(b"\n") + 1
        self.offset += end
        return [json.loads(line) for line in chunk[:end].splitlines()]


def newest_step(folder) -> int:
    paths = jobs.checkpoint_paths(folder)
    return jobs.checkpoint_step(paths[0]) if paths else 0


def test_a_job_killed_at_random_moments_ends_with_exactly_the_uninterrupted_checkpoint(tmp_path):
    """A 40-step job (TAEF2, batch 2, 64² crops, a checkpoint every 3 steps) SIGKILLed 20 times at random moments and
    resumed after each ends with a final checkpoint equal to an uninterrupted run's in every value, RNG states included.

    The moments come from VAE_LAB_KILL_SEED (random when unset; printed, so a failure can be replayed — the draws
    repeat exactly, the wall-clock moments they name as closely as the machine's timing allows). Each kill is one of:
    - 'signal': os.kill(SIGKILL) from outside, a random fraction of a step after the resumed worker logs a random step
      1..span past its resume point (log_every=1, so every step is observed): lands anywhere in a step — the forward
      and backward, the EMA, a held-out evaluation, a preview, a checkpoint being written or renamed;
    - 'startup': os.kill at a random time within the worker's start-up (measured on this job's earlier launches):
      importing, loading images, encoding the latent pool, restoring the checkpoint, the first preview;
    - 'fault': the worker's VAE_LAB_FAULT hook at a random phase and step (the exact moments a timer rarely hits:
      between a checkpoint's temporary write and its rename, right after the rename, inside a decode).
    ``span`` spreads the expected progress over the kills left, so the kills cover the whole run, and every kill is
    after at least some training or a bounded start-up delay; the loop is 20 kills, then one run to the end. The
    uninterrupted reference runs at the same time in another jobs folder (another device lock; one thread each)."""
    seed = int(os.environ.get("VAE_LAB_KILL_SEED") or random.SystemRandom().randrange(2**32))
    print(f"VAE_LAB_KILL_SEED={seed}")
    rng = random.Random(seed)
    started = time.perf_counter()
    (tmp_path / "ref").mkdir()
    (tmp_path / "crash").mkdir()
    options = dict(total=LONG_TOTAL, interval=LONG_INTERVAL, batch=2, crop=64, log_every=1)
    reference = make_job(tmp_path / "ref", "reference", **options)
    folder = make_job(tmp_path / "crash", "killed", **options)
    reference_log = open(tmp_path / "reference.log", "wb")  # noqa: SIM115 (closed below)
    reference_worker = subprocess.Popen(
        [sys.executable, SCRIPT, reference, "--device", "cpu"],
        env=worker_env(),
        stdout=reference_log,
        stderr=subprocess.STDOUT,
    )
    startups, step_times, kills = [], [], []
    try:
        for k in range(KILLS):
            resume = newest_step(folder)
            span = max(2, min(8, 2 + math.ceil(2 * (LONG_TOTAL - resume) / (KILLS - k))))
            draw = rng.random()
            kind = "signal" if k == 0 else "startup" if draw < 0.15 else "fault" if draw < 0.4 else "signal"
            if kind == "signal" and resume >= LONG_TOTAL - 1:  # one step left: a timer could miss the end, a hook not
                kind = "fault"
            if resume >= LONG_TOTAL:  # the last checkpoint is the end (killed after its rename): only start-up left
                kind = "startup"
            fault = None
            if kind == "fault":
                phase = rng.choice(FAULT_PHASES)
                if phase == "mid-step":  # inside the decode of a step from the resume point on
                    at = min(resume + rng.randint(0, span), LONG_TOTAL - 1)
                elif phase == "latent-cache":
                    at = 0
                else:  # the next checkpoint at or after a random step ahead
                    at = min(LONG_INTERVAL * math.ceil((resume + rng.randint(1, span)) / LONG_INTERVAL), LONG_TOTAL)
                fault = f"{phase}@{at}" if phase != "latent-cache" else phase
            target, fraction = min(resume + rng.randint(1, span), LONG_TOTAL - 1), rng.random()
            launched = time.time()  # the clock of the rows' "time"
            log = open(tmp_path / f"worker_{k:02d}.log", "wb")  # noqa: SIM115
            reader = MetricsReader(folder)
            worker = subprocess.Popen(
                [sys.executable, SCRIPT, folder, "--device", "cpu"],
                env=worker_env(fault),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            detail, seen, last_time = fault, [], None
            try:
                if kind == "startup":
                    delay = fraction * 0.8 * min(startups)  # before the first step (or the end, for a finished job)
                    time.sleep(delay)
                    detail = f"{delay:.2f}s after launch"
                elif kind == "signal":
                    deadline = launched + 300
                    while not (seen and seen[-1] >= target) and worker.poll() is None and time.time() < deadline:
                        for row in reader.rows():
                            if row["kind"] == "step":
                                if not seen:
                                    startups.append(row["time"] - launched)
                                elif last_time is not None:
                                    step_times.append(row["time"] - last_time)
                                seen.append(row["step"])
                                last_time = row["time"]
                        time.sleep(0.005)
                    delay = fraction * sorted(step_times)[len(step_times) // 2] if step_times else 0.0
                    time.sleep(delay)
                    detail = f"{delay:.2f}s after step {seen[-1] if seen else None} (target {target})"
                if kind != "fault" and worker.poll() is None:
                    os.kill(worker.pid, signal.SIGKILL)
                code = worker.wait(timeout=300)
            finally:
                if worker.poll() is None:
                    worker.kill()
                    worker.wait()
                log.close()
            kills.append((k, kind, detail, resume, newest_step(folder), code))
            print(
                f"kill {k:2d} {kind:7s} {detail}: resumed at {resume}, newest checkpoint now {newest_step(folder)}, "
                f"exit {code}"
            )
            assert code == -signal.SIGKILL, (
                f"VAE_LAB_KILL_SEED={seed}: kill {k} ({kind} {detail}) did not land: exit "
                f"{code}\n" + (tmp_path / f"worker_{k:02d}.log").read_text()[-3000:]
            )
        before_end = newest_step(folder)
        resumed = run_worker(folder)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert reference_worker.wait(timeout=600) == 0, (tmp_path / "reference.log").read_text()[-3000:]
    finally:
        if reference_worker.poll() is None:
            reference_worker.kill()
            reference_worker.wait()
        reference_log.close()
    print(
        f"{len(kills)} kills; the last killed run had reached checkpoint {before_end}; "
        f"{time.perf_counter() - started:.0f}s in all"
    )
    assert jobs.read_json(os.path.join(folder, "status.json"))["state"] == "done"
    trained = [kill for kill in kills if kill[1] == "signal"]
    assert len({kill[3] for kill in kills}) >= 4 and before_end >= LONG_TOTAL // 2, kills  # spread over the run
    assert trained and all(kill[2] is not None for kill in trained)
    try:
        assert_same_training(final_state(folder), final_state(reference), LONG_TOTAL)
    except AssertionError as exc:
        raise AssertionError(f"VAE_LAB_KILL_SEED={seed}: {exc}") from None


def test_a_corrupt_checkpoint_is_skipped_for_the_previous_one(tmp_path, reference):
    folder = make_job(tmp_path, "torn")
    assert run_worker(folder, fault="after-rename@8").returncode == -signal.SIGKILL
    newest = jobs.checkpoint_paths(folder)[0]
    with open(newest, "r+b") as f:  # a torn write that got renamed anyway
        f.truncate(os.path.getsize(newest) // 3)
    assert jobs.latest_checkpoint(folder)["step"] == 4
    resumed = run_worker(folder)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = read_text(os.path.join(folder, "metrics.jsonl"))
    assert "skipped a broken checkpoint: step_00000008.pt" in log and "resumed from step 4" in log
    assert_same_training(final_state(folder), final_state(reference))


def test_stop_request_checkpoints_and_a_restart_finishes(tmp_path):
    folder = make_job(tmp_path, "stoppable", held=False)
    jobs.write_json_atomic(os.path.join(folder, "control.json"), {"command": "stop"})
    stopped = run_worker(folder)
    assert stopped.returncode == 0
    status = jobs.read_json(os.path.join(folder, "status.json"))
    assert status["state"] == "stopped" and status["step"] == 0
    assert not os.path.exists(os.path.join(folder, "control.json"))
    assert run_worker(folder).returncode == 0
    assert jobs.read_json(os.path.join(folder, "status.json"))["state"] == "done"


def test_non_finite_steps_roll_back_with_a_lower_lr_and_never_reach_a_checkpoint(tmp_path):
    folder = make_job(tmp_path, "nan", held=False)
    result = run_worker(folder, fault="nan@5")
    assert result.returncode == 0, result.stderr[-3000:]
    log = read_text(os.path.join(folder, "metrics.jsonl"))
    assert "3 non-finite steps in a row at step 8: back to step 4 with lr 0.00015" in log
    for path in jobs.checkpoint_paths(folder):
        state = jobs.load_checkpoint(path)
        assert all(torch.isfinite(v).all() for v in state["decoder"].values())
    assert jobs.read_json(os.path.join(folder, "status.json"))["state"] == "done"
    assert final_state(folder)["recipe"]["lr"] == pytest.approx(1.5e-4)


def test_out_of_memory_ends_the_job_with_advice_and_keeps_the_checkpoint(tmp_path):
    folder = make_job(tmp_path, "oom", held=False)
    result = run_worker(folder, fault="oom@6")
    assert result.returncode == 3
    status = jobs.read_json(os.path.join(folder, "status.json"))
    assert status["state"] == "failed" and "lower batch_size or crop_size" in status["message"]
    assert jobs.latest_checkpoint(folder)["step"] == 4


def test_job_names_cannot_leave_the_jobs_folder(tmp_path):
    for bad in ("../escape", "a/b", "..", ".hidden", "", "x" * 81, "/abs", "a\\b", "job.", "NUL", "com1.txt", "Aux"):
        with pytest.raises(jobs.JobError):
            jobs.job_folder(str(tmp_path), bad)
    assert jobs.job_folder(str(tmp_path), "my-job_1.v2") == os.path.join(os.path.realpath(tmp_path), "my-job_1.v2")
    make_job(tmp_path, "taken", held=False)
    with pytest.raises(jobs.JobError, match="exists already"):
        make_job(tmp_path, "taken", held=False)


def test_the_worker_checkpoints_and_stops_when_its_parent_is_gone(tmp_path):
    """Started by ComfyUI with --parent-pid: when that process ends, the worker checkpoints and stops as
    'interrupted' instead of holding the GPU as an orphan; a restart finishes the job."""
    folder = make_job(tmp_path, "orphan", total=400, interval=400, held=False)
    parent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(6)"])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("VAE_LAB_FAULT", None)
    worker = subprocess.run(
        [sys.executable, SCRIPT, folder, "--device", "cpu", "--parent-pid", str(parent.pid)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    parent.wait()
    assert worker.returncode == 0, worker.stderr[-2000:]
    status = jobs.read_json(os.path.join(folder, "status.json"))
    assert status["state"] == "interrupted" and 0 <= status["step"] < 400, status
    assert jobs.latest_checkpoint(folder)["step"] == status["step"]


def test_a_second_job_on_the_same_device_waits_visibly_then_runs(tmp_path):
    first, second = make_job(tmp_path, "first", total=40, held=False), make_job(tmp_path, "second", total=4, held=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("VAE_LAB_FAULT", None)
    command = [sys.executable, SCRIPT, "--device", "cpu"]
    a = subprocess.Popen([*command, first], env=env)
    deadline = time.time() + 120
    while (jobs.read_json(os.path.join(first, "status.json"), {}) or {}).get(
        "state"
    ) != "running" and time.time() < deadline:
        time.sleep(0.1)
    b = subprocess.Popen([*command, second], env=env)
    seen = set()
    while b.poll() is None and time.time() < deadline + 120:
        status = jobs.read_json(os.path.join(second, "status.json"), {}) or {}
        seen.add((status.get("state"), status.get("message", "").startswith("waiting for the job running on cpu")))
        time.sleep(0.05)
    assert a.wait(timeout=120) == 0 and b.returncode == 0
    assert ("queued", True) in seen
    done_first = jobs.read_json(os.path.join(first, "status.json"))["updated"]
    second_rows = [json.loads(line) for line in read_text(os.path.join(second, "metrics.jsonl")).splitlines()]
    assert min(r["time"] for r in second_rows if r["kind"] == "step") >= done_first - 1e-3  # trained after the first


# ----------------------------------------------------------------------------------------------
# what the panel reads and asks


def test_the_panel_summary_series_and_preview_of_a_finished_job(reference):
    from PIL import Image

    summary = jobs.job_summary(reference)
    assert summary["state"] == "done" and summary["step"] == summary["total"] == TOTAL
    assert summary["actions"] == ["delete"] and summary["checkpoint_step"] == TOTAL and summary["eta_seconds"] is None
    assert summary["recipe"] == "furception-nolpips" and summary["family"] == "tiny"
    with Image.open(os.path.join(reference, "preview.png")) as preview:  # one row (one held-out image), three tiles
        assert preview.size[0] > 3 * 64 and preview.size[1] >= 64
    tail = jobs.MetricsTail(os.path.join(reference, "metrics.jsonl"))
    assert tail.update()
    series = tail.series()
    assert [r["step"] for r in series["steps"]] == [2, 4, 6, 8, 10, 12] and all("pixel" in r for r in series["steps"])
    base = [e for e in series["evals"] if e["weights"] == "base"]
    assert len(base) == 1 and base[0]["step"] == 0 and base[0]["psnr"] > 10
    assert [e["step"] for e in series["evals"] if e["weights"] == "ema"] == [6, 12]  # the end once, not twice
    assert tail.update() == []  # nothing new


def test_metrics_tail_waits_for_a_whole_line_thins_long_runs_and_rereads_a_truncated_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with open(path, "w") as f:
        f.write('{"kind": "step", "step": 1, "loss": 1.0}\n{"kind": "step", "step": 2, "lo')
    tail = jobs.MetricsTail(str(path), max_points=8)
    assert [r["step"] for r in tail.update()] == [1]
    with open(path, "a") as f:
        f.write('ss": 0.5}\n{"kind": "step", "step": 3, "loss": NaN, "skipped": true}\n')
    assert [r["step"] for r in tail.update()] == [2, 3]
    assert [r["step"] for r in tail.steps] == [1, 2]  # a skipped step is not charted
    with open(path, "a") as f:
        f.writelines(json.dumps({"kind": "step", "step": step, "loss": 1 / step}) + "\n" for step in range(4, 40))
    tail.update()
    kept = [r["step"] for r in tail.steps]
    assert 4 <= len(kept) <= 8 and kept == sorted(kept) and kept[0] == 1
    with open(path, "w") as f:  # a new file (job deleted and made again)
        f.write('{"kind": "eval", "step": 0, "weights": "base", "psnr": 20.0}\n')
    tail.update()
    assert tail.steps == [] and tail.evals == [{"kind": "eval", "step": 0, "weights": "base", "psnr": 20.0}]


def _fake_worker(folder):
    """A live process whose command line names the job folder, standing in for a running worker."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", folder])


def test_requests_stop_pause_and_delete_follow_the_state(tmp_path):
    folder = make_job(tmp_path, "asked", held=False)
    assert jobs.job_summary(folder)["state"] == "interrupted"  # 'queued' with no worker: it died before starting
    fake = _fake_worker(folder)
    try:
        jobs.write_status(folder, "running", pid=fake.pid, step=3)
        summary = jobs.job_summary(folder)
        assert summary["state"] == "running" and summary["actions"] == ["pause", "stop"]
        with pytest.raises(jobs.JobError, match="stop it first"):
            jobs.delete_job(folder)
        jobs.request(folder, "pause")
        assert jobs.read_json(os.path.join(folder, "control.json"))["command"] == "pause"
    finally:
        fake.kill()
        fake.wait()
    summary = jobs.job_summary(folder)  # the worker vanished while 'running'
    assert summary["state"] == "interrupted" and "Resume" in summary["message"] and "resume" in summary["actions"]
    with pytest.raises(jobs.JobError, match="nothing to pause"):
        jobs.request(folder, "pause")
    jobs.request(folder, "stop")
    assert jobs.job_summary(folder)["state"] == "stopped"
    with pytest.raises(jobs.JobError):
        jobs.request(folder, "explode")
    jobs.delete_job(folder)
    assert not os.path.exists(folder)


def test_a_pid_reused_by_another_program_is_not_taken_for_the_worker(tmp_path):
    folder = make_job(tmp_path, "reused", held=False)
    jobs.write_status(folder, "running", pid=os.getpid())  # alive, but pytest, not this job's worker
    assert jobs.job_summary(folder)["state"] == "interrupted"


def test_a_queued_job_obeys_stop_and_a_second_worker_for_one_job_leaves(tmp_path):
    import fcntl

    folder = make_job(tmp_path, "waiting", held=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("VAE_LAB_FAULT", None)
    with open(os.path.join(str(tmp_path), ".device-cpu.lock"), "a") as device:
        fcntl.flock(device, fcntl.LOCK_EX)  # another job holds the CPU
        worker = subprocess.Popen([sys.executable, SCRIPT, folder, "--device", "cpu"], env=env)
        deadline = time.time() + 120
        while jobs.job_summary(folder)["state"] != "queued" or not jobs.worker_alive(
            folder, (jobs.read_json(os.path.join(folder, "status.json")) or {}).get("pid")
        ):
            assert time.time() < deadline and worker.poll() is None
            time.sleep(0.1)
        second = run_worker(folder)  # the same job launched twice: the second leaves at once, touching nothing
        assert second.returncode == 0 and "another worker runs this job already" in second.stderr
        jobs.request(folder, "stop")
        assert worker.wait(timeout=60) == 0
    status = jobs.read_json(os.path.join(folder, "status.json"))
    assert status["state"] == "stopped" and status["message"] == "stopped while waiting for cpu"
    assert jobs.checkpoint_paths(folder) == []


def test_a_job_from_an_image_batch_keeps_its_images(tmp_path):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    arrays = [rng.random((40, 48, 3), dtype=np.float32) for _ in range(3)]
    model = taef2_model()
    config = finetune.FinetuneConfig(batch_size=1, crop_size=32)
    spec = jobs.JobSpec(
        recipe=recipes.RECIPES["furception-nolpips"].as_dict(),
        config=asdict(config),
        total_steps=2,
        checkpoint_interval=2,
        train_images=[],
        family="tiny",
    )
    folder = jobs.create_job(str(tmp_path), "batch", model.state_dict(), spec, arrays[:2], arrays[2:])
    saved = jobs.load_spec(folder)
    assert [os.path.basename(p) for p in saved.train_images] == ["train_00000.png", "train_00001.png"]
    assert [os.path.basename(p) for p in saved.held_out_images] == ["held_00000.png"]
    for path, array in zip(saved.train_images + saved.held_out_images, arrays):
        assert os.path.dirname(path) == os.path.join(folder, "images")
        pixels = np.asarray(Image.open(path), dtype=np.float32) / 255
        assert pixels.shape == array.shape and np.abs(pixels - array).max() <= 0.5 / 255 + 1e-6


def test_a_job_with_an_lpips_recipe_trains_with_the_backbone_found_at_start_and_fails_clearly_without_it(tmp_path):
    from test_lpips import _reference_and_backbone_file

    # a random AlexNet in torchvision's layout
    _, backbone = _reference_and_backbone_file("alex", str(tmp_path / "lpips"))
    recipe = recipes.recipe_with(recipes.RECIPES["ft-ema"], lpips_net="alex", warmup_steps=1)
    config = finetune.FinetuneConfig(batch_size=1, crop_size=32, crops_per_image=2, seed=3, eval_every=2, eval_size=64)
    spec = jobs.JobSpec(
        recipe=recipe.as_dict(),
        config=asdict(config),
        total_steps=2,
        checkpoint_interval=2,
        train_images=IMAGES,
        held_out_images=HELD,
        family="tiny",
        threads=1,
        log_every=1,
        lpips_backbone=backbone,
    )
    folder = jobs.create_job(str(tmp_path), "with_lpips", taef2_model().state_dict(), spec)
    result = run_worker(folder)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in read_text(os.path.join(folder, "metrics.jsonl")).splitlines()]
    assert all(r["lpips"] > 0 for r in rows if r["kind"] == "step")
    assert all("lpips_alex" in r for r in rows if r["kind"] == "eval")
    os.remove(backbone)  # the file went away before a resume
    os.remove(jobs.checkpoint_paths(folder)[0])
    jobs.write_status(folder, "stopped")
    assert run_worker(folder).returncode == 2
    status = jobs.read_json(os.path.join(folder, "status.json"))
    assert status["state"] == "failed"
    assert "needs LPIPS" in status["message"] and "furception-nolpips" in status["message"]


def test_a_job_continues_a_training_state_and_ends_where_one_run_would(tmp_path, reference):
    """A training state (as Decoder Finetune Steps outputs) becomes a new job's first checkpoint: the job resumes from
    its step and ends with the uninterrupted run's final checkpoint (every value). Wrong family, a state past
    total_steps and junk are refused."""
    state = jobs.load_checkpoint(jobs.checkpoint_paths(reference)[-1])  # step 4 of the reference run
    assert state["step"] == 4
    model = taef2_model()
    spec = jobs.load_spec(reference)
    folder = jobs.create_job(str(tmp_path), "continued", model.state_dict(), spec, initial_state=state)
    assert jobs.read_json(os.path.join(folder, "status.json"))["step"] == 4
    result = run_worker(folder)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from step 4" in read_text(os.path.join(folder, "metrics.jsonl"))
    assert_same_training(final_state(folder), final_state(reference))
    for bad, message in (
        ({**state, "family": "kl"}, "trains a kl decoder"),
        ({**state, "step": TOTAL}, "raise total_steps"),
        ({"format": "something"}, "not a VAE Lab training state"),
    ):
        with pytest.raises(jobs.JobError, match=message):
            jobs.create_job(str(tmp_path), "refused", model.state_dict(), spec, initial_state=bad)
        assert not os.path.exists(os.path.join(str(tmp_path), "refused"))


def test_locks_and_liveness_helpers(tmp_path):
    path = os.path.join(str(tmp_path), ".device-cpu.lock")
    with open(path, "a") as first, open(path, "a") as second:
        assert jobs.try_lock(first) and not jobs.try_lock(second)  # one holder at a time, even in one process
    with open(path, "a") as again:
        assert jobs.try_lock(again)  # released when the holder's file closed (or its process ended)
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    assert jobs.alive(os.getpid()) and not jobs.alive(ended.pid)
