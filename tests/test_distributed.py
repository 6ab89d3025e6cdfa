"""Multi-process training on torch.distributed (CPU, gloo, 2 processes x 1 thread, launched by torchrun exactly as the
README says): a 2-rank job's steps equal one process's on the same global batch within bounds derived from float32
rounding, each with a negative control — with the LayerNorm critic, the gradient penalty and the adaptive GAN weight
all active —, a 2-rank job killed mid-step and resumed ends bit-identical to an uninterrupted 2-rank job, and no rank
aborts in its teardown, whatever the job's outcome."""

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

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="this torch build has no torch.distributed with gloo",
)


def make_job(root, name, total, interval, batch=2, initial_state=None) -> str:
    # the GAN from the first steps: critic from step 0, adaptive-weighted generator loss from step 1
    recipe = recipes.recipe_with(
        recipes.RECIPES["furception-nolpips"], warmup_steps=1, gan_start=1, critic_warmup_steps=1
    )
    assert recipe.disc_norm == "layer" and recipe.gp_weight > 0
    config = finetune.FinetuneConfig(batch_size=batch, crop_size=32, crops_per_image=4, seed=5, eval_every=0)
    spec = jobs.JobSpec(
        recipe=recipe.as_dict(),
        config=asdict(config),
        total_steps=total,
        checkpoint_interval=interval,
        train_images=IMAGES,
        family="tiny",
        threads=1,
        log_every=1,
    )
    return jobs.create_job(
        str(root),
        name,
        {k: v.clone() for k, v in taef2_model().state_dict().items()},
        spec,
        initial_state=initial_state,
    )


def _env(fault=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("VAE_LAB_FAULT", None)
    if fault:
        env["VAE_LAB_FAULT"] = fault
    return env


def torchrun(folder, processes=2, fault=None) -> subprocess.CompletedProcess:
    """The README's command: torchrun --standalone --nproc_per_node N tools/run_job.py <job folder>."""
    return _launch([f"--nproc_per_node={processes}", SCRIPT, folder, "--device", "cpu"], _env(fault))


def _launch(arguments: list[str], env: dict) -> subprocess.CompletedProcess:
    """torchrun --standalone with ``arguments``. Whatever the outcome, no rank may abort in its teardown (gloo's
    "terminate called without an active exception", SIGABRT, which torchrun reports as a failure)."""
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", *arguments],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    output = result.stdout + result.stderr
    assert "terminate called" not in output and "SIGABRT" not in output, output[-4000:]
    return result


def single(folder) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, SCRIPT, folder, "--device", "cpu"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def newest(folder) -> dict:
    return jobs.load_checkpoint(jobs.checkpoint_paths(folder)[0])


def steps_logged(folder) -> list[dict]:
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == "step"]


# ---------------------------------------------------------------------------------------------------------------
# How far apart may one process on the global batch and W ranks on its slices (all-reduced) be?
#
# Both compute the same function; they differ only in float32 rounding: the conv kernels are chosen per batch size
# (batch 2 in one process, batch 1 on each rank) and batch sums are grouped differently. Each comparison below
# states its bound from the two kinds of difference this gives, for the networks it runs (eps = 2**-23):
#
# forward values are continuous in the rounding. A dot product of F float32 terms is off by ~sqrt(F)·eps relative to
#   the magnitude of its terms (the probabilistic bound of Higham & Mary 2019, "A new approach to probabilistic
#   rounding error analysis"); independent layers add in quadrature, a mean over n terms adds sqrt(n)·eps:
#       tau_f = eps·sqrt(sum over the convs of F + n), relative to the magnitude of what is summed.
# gradients are not. A kink (ReLU, LeakyReLU, the clamp to [0, 1], the sign in the L1 part of the pixel loss) whose
#   input lies within rounding of 0 can take the other branch in one run, and its slope jumps by J (1 for ReLU and the
#   clamp, 1 - 0.2 for the critic's LeakyReLU, 2 for the sign): the unit's share of the backward signal changes by J
#   of itself, not by eps — the 1.14e-3 of "optimizer moment 6" that failed the old hard-coded 1e-3 was one such
#   flip. With the kink's input spread sigma and a density of at most 1/sigma at 0, a kink behind an F-term dot
#   product flips with probability <= 2·sqrt(F)·eps; k flips among the U units of a layer move ~J·sqrt(k/U) of a
#   gradient, so summing E[k]/U over the kinks a gradient crosses:
#       tau_g = sqrt(2·eps·sum over the kinks of J²·sqrt(F)) + sqrt(n)·eps, relative to the gradient,
#   the last term for the final sum over the n (batch × pixel) terms. It grows like sqrt(eps), not like eps.
#   (Measured: ~50 % of steps have no flip and agree to ~1e-5 of their gradient, the others to 1e-4 .. 3e-3.)
# A tensor whose gradient (nearly) cancels — a bias in front of a norm, the critic's last bias (exactly 0 under the
# Wasserstein loss) — has a small norm but not small terms, so its scale is floored at its even share of the
# optimizer's whole gradient norm (held at the clip value by gradient clipping once clipped, never near 0).
EPS32 = torch.finfo(torch.float32).eps
MARGIN = 10  # every negative control lands at least this many bounds away


class _Kinks(torch.nn.Module):
    """Kinks after ``module``'s last conv, as slope jumps: e.g. the clamp of the decoder's output (1) and the sign of
    the L1 part of the pixel loss (2). The 8-bit rounding of the fakes is straight-through for the gradient; for the
    critic it is a jump in an input pixel (see _log_bounds)."""

    def __init__(self, module: torch.nn.Module, *jumps: float):
        super().__init__()
        convs = [m for m in module.modules() if isinstance(m, torch.nn.Conv2d)]
        self.fan_in, self.jumps = _fan_in(convs[-1]), jumps


def _fan_in(conv: torch.nn.Conv2d) -> int:
    return conv.in_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1]


def _layers(*modules) -> tuple[list[int], list[tuple[int, float]]]:
    """The fan-in F of every conv, and (F, J) for every kink: F of the conv in front of it, J its slope jump."""
    convs, kinks, fan_in = [], [], 1
    for module in modules:
        if isinstance(module, _Kinks):
            kinks += [(module.fan_in, jump) for jump in module.jumps]
            continue
        for m in module.modules():
            if isinstance(m, torch.nn.Conv2d):
                fan_in = _fan_in(m)
                convs.append(fan_in)
            elif isinstance(m, torch.nn.ReLU):
                kinks.append((fan_in, 1.0))
            elif isinstance(m, torch.nn.LeakyReLU):
                kinks.append((fan_in, 1.0 - m.negative_slope))
    return convs, kinks


def _tau_forward(modules, n: int) -> float:
    return EPS32 * (sum(_layers(*modules)[0]) + n) ** 0.5


def _tau_gradient(modules, n: int) -> float:
    return (2 * EPS32 * sum(jump**2 * f**0.5 for f, jump in _layers(*modules)[1])) ** 0.5 + EPS32 * n**0.5


def _bounds(batch: int, crop: int) -> dict:
    """The relative bounds for the jobs make_job makes (TAEF2's decoder, the recipe's LayerNorm critic)."""
    from training import gan

    decoder = taef2_model().decoder
    critic = gan.PatchDiscriminator(norm="layer")
    clamp, sign = _Kinks(decoder, 1.0), _Kinks(decoder, 2.0)
    n = batch * crop * crop
    with torch.no_grad():
        patches = critic(torch.zeros(1, 3, crop, crop)).numel()
    return {
        "forward": _tau_forward([decoder], 3 * n),  # the pixel loss: decoder, then a mean over 3·n values
        "critic forward": _tau_forward([decoder, critic], batch * patches),  # mean D over the batch's patches
        # the decoder's weights: the pixel loss's gradient and the GAN term's, through the critic to the image
        "decoder": _tau_gradient([decoder, clamp, sign, critic], n),
        "critic": _tau_gradient([critic], n),  # the critic's weights, and its gradient at its input (the penalty)
        "rec at last layer": _tau_gradient([clamp, sign], n),  # the adaptive weight's two last-layer gradients
        "gan at last layer": _tau_gradient([clamp, critic], n),
        "batch": batch,
        "patches": patches,
    }


def _gradients(after: dict, before: dict | None, part: str) -> dict:
    """The (clipped) gradient each AdamW step applied: g = (m_t - beta1·m_(t-1)) / (1 - beta1), from the first
    moments of two consecutive checkpoints (m_0 = 0). Weight decay acts on the weights, not on m."""
    beta1 = after[part]["param_groups"][0]["betas"][0]
    out = {}
    for key, moments in after[part]["state"].items():
        m = moments["exp_avg"].double()
        if before is not None:
            m = m - beta1 * before[part]["state"][key]["exp_avg"].double()
        out[key] = m / (1 - beta1)
    return out


def _gradient_errors(reference: dict, other: dict) -> tuple[dict, float]:
    """Per tensor: ||other - reference|| / max(||reference||, ||all of reference|| · sqrt(numel / all numel));
    and over all tensors: ||other - reference|| / ||reference||."""
    total = sum(float((g**2).sum()) for g in reference.values()) ** 0.5
    count = sum(g.numel() for g in reference.values())
    per = {
        k: float((other[k] - g).norm()) / max(float(g.norm()), total * (g.numel() / count) ** 0.5)
        for k, g in reference.items()
    }
    whole = sum(float(((other[k] - g) ** 2).sum()) for k, g in reference.items()) ** 0.5 / total
    return per, whole


def _check_gradients(reference: dict, ranks: dict, alone: dict, tau: float, what: str, failures: list) -> dict:
    """The ranks' gradient within tau of one process's for every tensor; rank 0 alone's at least MARGIN·tau away
    over the whole optimizer. Returns error / bound (worst tensor, whole) and control / bound."""
    per, whole = _gradient_errors(reference, ranks)
    _, control = _gradient_errors(reference, alone)
    worst = max(per, key=per.get)
    if per[worst] > tau:
        failures.append(f"{what}: tensor {worst} is {per[worst]:.3g} off, the bound is {tau:.3g}")
    if control < MARGIN * tau:
        failures.append(f"{what}: the negative control is only {control / tau:.1f} bounds away")
    return {"worst tensor": per[worst] / tau, "whole": whole / tau, "control": control / tau}


def _log_bounds(row: dict, tau: dict, gp_weight: float) -> dict:
    """The bound on |ranks - one process| of each number one process logged in ``row``, from its own terms:

    pixel: a mean of non-negative terms, forward only: tau["forward"]·pixel.
    gp = lambda·E[(n - 1)^2], n = ||grad D|| per sample, s = sqrt(gp / lambda): n is a gradient (tau["critic"]
        relative), d gp = 2·lambda·E[|n - 1|·n]·tau <= 2·lambda·(s^2 + s)·tau (Cauchy-Schwarz, Minkowski).
    gan = -mean D(fake), critic = mean D(fake) - mean D(real): signed, they cancel; the critic's outputs are the
        terms: S = |mean D(fake)| + |mean D(real)| (read back from gan and critic), off by tau["critic forward"]·S;
        plus the 8-bit rounding of the fakes: a pixel within rounding (tau["forward"]) of a rounding edge flips
        with probability 2·255·tau and moves mean D by |dD/dpixel| / 255 / (B·P) (B samples, P patches): in all
        sqrt(2·tau / (255·B))·sqrt(E[n^2]) / P <= sqrt(2·tau / (255·B))·(1 + s) / P, n from the penalty.
    gan_weight = 0.5·||grad_W rec|| / ||grad_W gan|| at the last layer W: relative, the sum of the two gradients'.
    loss = rec + gan_weight·gan: tau["forward"]·|rec| + (error of gan_weight)·|gan| + gan_weight·(error of gan).
    The critic term before the GAN term starts (no gan logged) has no scale logged; the critic's gradients cover it."""
    bounds = {"pixel": tau["forward"] * abs(row["pixel"])}
    s = (row["gp"] / gp_weight) ** 0.5
    bounds["gp"] = 2 * gp_weight * (s * s + s) * tau["critic"]
    if "gan" not in row:
        bounds["loss"] = tau["forward"] * abs(row["loss"])
        return bounds
    fake = -row["gan"]
    scale = abs(fake) + abs(fake - row["critic"])
    rounding = (2 * tau["forward"] / (255 * tau["batch"])) ** 0.5 * (1 + s) / tau["patches"]
    bounds["gan"] = bounds["critic"] = tau["critic forward"] * scale + rounding
    weight = tau["rec at last layer"] + tau["gan at last layer"]
    bounds["gan_weight"] = weight * abs(row["gan_weight"])
    rec = row["loss"] - row["gan_weight"] * row["gan"]
    bounds["loss"] = (
        tau["forward"] * abs(rec) + bounds["gan_weight"] * abs(row["gan"]) + row["gan_weight"] * bounds["gan"]
    )
    return bounds


def _check_logs(reference: dict, ranks: dict, alone: dict, bounds: dict, what: str, failures: list) -> dict:
    """Each logged number of the ranks within its bound of one process's; rank 0 alone's at least MARGIN bounds away."""
    ratios = {}
    for term, bound in bounds.items():
        error, control = abs(ranks[term] - reference[term]), abs(alone[term] - reference[term])
        if error > bound:
            failures.append(f"{what} {term}: {ranks[term]!r} vs {reference[term]!r}, the bound is {bound:.3g}")
        if control < MARGIN * bound:
            failures.append(f"{what} {term}: the negative control is only {control / bound:.1f} bounds away")
        ratios[term] = {"error": error / bound, "control": control / bound}
    return ratios


def _relative(x: dict, y: dict, origin: dict) -> float:
    """||x - y|| / ||x - origin|| over all tensors."""
    num = sum(float(((x[k].double() - y[k].double()) ** 2).sum()) for k in x)
    den = sum(float(((x[k].double() - origin[k].double()) ** 2).sum()) for k in x)
    return (num / max(den, 1e-300)) ** 0.5


def test_two_processes_equal_one_on_the_same_global_batch(tmp_path):
    """A step of a 2-rank job applies the gradients (decoder and critic) and logs the numbers of one process on
    the same global batch, within the bounds derived above; each has a negative control — rank 0 training on its
    slice alone, no all-reduce — asserted to land at least MARGIN bounds away.

    Steps are compared from the same state: step 1 from the base weights, and step 3 — the generator's GAN term and
    the adaptive weight in play — by one process resumed from the 2-rank job's step-2 checkpoint. Weights after
    several steps get no tolerance: Adam turns a near-zero gradient element that rounding pushed across 0 into ±lr,
    and every later gradient depends on that, so runs part like the square root of the gradients' relative
    difference — a bound from tau_g (1.5 %) would allow tens of %, within a few x of the control (measured after 3
    steps: 9 % of the update apart, rank 0 alone 82 %). Only their order is checked there."""
    one, two, half = (
        make_job(tmp_path, "one", 3, 1),
        make_job(tmp_path, "two", 3, 1),
        make_job(tmp_path, "half", 3, 1, batch=1),
    )
    assert single(one).returncode == 0 and single(half).returncode == 0
    result = torchrun(two)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    status = jobs.read_json(os.path.join(two, "status.json"))
    assert status["state"] == "done" and status["device"] == "2 × cpu"
    at = {
        name: {s: jobs.load_checkpoint(jobs.checkpoint_path(folder, s)) for s in (1, 2, 3)}
        for name, folder in (("one", one), ("two", two), ("half", half))
    }
    assert at["two"][3]["world_size"] == 2 and len(at["two"][3]["rng"]) == 2 and at["one"][3]["world_size"] == 1
    rows = {name: steps_logged(folder) for name, folder in (("one", one), ("two", two), ("half", half))}
    assert [r["step"] for r in rows["one"]] == [r["step"] for r in rows["two"]] == [1, 2, 3]
    # step 3 again from the 2-rank job's step-2 state: one process on the global batch, and rank 0's slice alone
    for name, batch in (("resumed", 2), ("resumed_half", 1)):
        folder = make_job(tmp_path, name, 3, 1, batch=batch, initial_state=at["two"][2])
        assert single(folder).returncode == 0
        at[name], rows[name] = {3: newest(folder)}, steps_logged(folder)
        assert at[name][3]["step"] == 3 and [r["step"] for r in rows[name]] == [3]

    tau = _bounds(batch=2, crop=32)
    gp_weight = recipes.Recipe(**jobs.load_spec(one).recipe).gp_weight
    parts = {"optimizer": tau["decoder"], "critic_optimizer": tau["critic"]}
    report, failures = {"bounds": tau}, []
    for step, (reference, ranks, alone, before) in {
        1: ("one", "two", "half", None),
        3: ("resumed", "two", "resumed_half", at["two"][2]),
    }.items():
        for part, bound in parts.items():
            report[f"step {step} {part}"] = _check_gradients(
                *(_gradients(at[name][step], before, part) for name in (reference, ranks, alone)),
                bound,
                f"step {step} {part}",
                failures,
            )
        (row,) = (r for r in rows[reference] if r["step"] == step)
        (other,) = (r for r in rows[ranks] if r["step"] == step)
        (control,) = (r for r in rows[alone] if r["step"] == step)
        # step 1: the critic and its penalty (from step 0); step 3: the GAN term and its adaptive weight too
        assert {"gp", "gan_weight"} & set(row) == ({"gp"} if step == 1 else {"gp", "gan_weight"})
        report[f"step {step} logs"] = _check_logs(
            row, other, control, _log_bounds(row, tau, gp_weight), f"step {step}", failures
        )
    # after three steps each the 2-rank job is nearer to the one-process job than rank 0 alone is
    base = taef2_model().state_dict()
    drift = _relative(at["one"][3]["decoder"], at["two"][3]["decoder"], base)
    alone = _relative(at["one"][3]["decoder"], at["half"][3]["decoder"], base)
    report["3 steps: drift, rank 0 alone"] = [drift, alone]
    print(json.dumps(report, indent=1))  # the measured ratios (error / bound, control / bound): pytest -s shows them
    assert not failures, failures
    assert drift < alone, (drift, alone)


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


def test_a_rank_that_leaves_without_the_workers_teardown_does_not_abort(tmp_path):
    """A rank that raises after the collectives the trainer uses, before any destroy_process_group of its own (as
    one that fails in Worker() would), while the other rank still holds its connection: training.distributed's
    atexit hook tears its group down first. Without it ~35 % of such exits aborted (SIGABRT, "terminate called
    without an active exception")."""
    script = tmp_path / "rank.py"
    script.write_text(f"""import sys, time
sys.path.insert(0, {ROOT!r})
import torch
from training import distributed
collective, _ = distributed.from_environment("cpu")
for i in range(3):
    collective.mean_([torch.randn(1000)])
    collective.broadcast(i if collective.is_main else None)
    collective.gather(distributed.rng_state())
if collective.rank == 1:
    raise RuntimeError("rank 1 fails")
time.sleep(1)
""")
    result = _launch(["--nproc_per_node=2", str(script)], _env())
    assert result.returncode != 0 and "RuntimeError: rank 1 fails" in result.stderr, result.stderr[-4000:]


def test_a_headless_job_made_by_the_cli_and_a_global_batch_that_does_not_divide(tmp_path):
    """tools/make_job.py makes the same job folder as Start Finetune Job from a VAE file (here TAEF2's madebyollin pair)
    and refuses what it cannot use by name; torchrun refuses a global batch that does not divide by the processes."""
    make = [
        sys.executable,
        os.path.join(ROOT, "tools", "make_job.py"),
        "--root",
        str(tmp_path),
        "--steps",
        "2",
        "--crop-size",
        "64",
        "--threads",
        "1",
    ]
    taef2 = os.path.join(ROOT, "assets", "taef2")
    result = subprocess.run(
        [
            *make,
            "--name",
            "odd",
            "--batch-size",
            "3",
            "--vae",
            os.path.join(taef2, "taef2_decoder.pth"),
            "--encoder",
            os.path.join(taef2, "taef2_encoder.pth"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    folder = os.path.join(str(tmp_path), "odd")
    spec = jobs.load_spec(folder)
    assert spec.family == "tiny" and spec.config["batch_size"] == 3
    assert len(spec.train_images) + len(spec.held_out_images) == 8
    assert f"torchrun --standalone --nproc_per_node <GPUs> {SCRIPT} {folder}" in result.stdout
    again = subprocess.run([*make, "--name", "odd"], capture_output=True, text=True, check=False)
    assert again.returncode == 2 and "exists already" in again.stderr
    alone = subprocess.run(
        [*make, "--name", "alone", "--vae", os.path.join(taef2, "taef2_decoder.pth")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert alone.returncode == 2 and "holds a decoder only: give its encoder with --encoder" in alone.stderr
    result = torchrun(folder)
    assert result.returncode != 0
    status = jobs.read_json(os.path.join(folder, "status.json"))
    assert status["state"] == "failed"
    assert "batch_size 3 is the global batch and must divide by the 2 processes" in status["message"]
