// The panel's logic (web/vae_lab_jobs_logic.js) under `node --test`: events applied to jobs from the routes,
// chart series and paths, the progress line. Run by tests/test_panel_logic.py (CI tier).
import assert from "node:assert/strict";
import { test } from "node:test";

import {
  addRow, applyEvent, entryFromDetail, formatDuration, lossSeries, MAX_POINTS, metricDeltas, metricSeries, progressLine,
  shownMessage, sortedJobs, svgPath,
} from "../../web/vae_lab_jobs_logic.js";

const detail = {
  job: "a", state: "running", step: 4, total: 10, images_per_second: 2.5, eta_seconds: 75, updated: 5,
  steps: [{ kind: "step", step: 2, loss: 0.5, pixel: 0.4 }, { kind: "step", step: 4, loss: 0.4, pixel: 0.3, gan: 0.7 }],
  evals: [{ kind: "eval", step: 0, weights: "base", psnr: 25, delta_e: 0.02, detail_ratio: 1.0 }],
  logs: [],
};

test("an event advances a job from the route without touching the old object", () => {
  const jobs = { a: entryFromDetail(detail) };
  const event = { job: "a", summary: { step: 6, state: "running" },
                  rows: [{ kind: "step", step: 6, loss: 0.3, pixel: 0.2 }, { kind: "eval", step: 6, weights: "ema", psnr: 26, delta_e: 0.018, detail_ratio: 0.99 }] };
  const next = applyEvent(jobs, event);
  assert.equal(next.a.summary.step, 6);
  assert.equal(next.a.summary.total, 10); // fields the event does not carry are kept
  assert.deepEqual(next.a.steps.map((r) => r.step), [2, 4, 6]);
  assert.equal(next.a.evals.length, 2);
  assert.equal(jobs.a.steps.length, 2, "the previous state is not mutated");
  assert.equal(jobs.a.summary.step, 4);
});

test("rows already seen (a reload raced an event) are not added twice", () => {
  let jobs = { a: entryFromDetail(detail) };
  const event = { job: "a", rows: [detail.steps[1], detail.evals[0]] };
  jobs = applyEvent(jobs, event);
  assert.equal(jobs.a.steps.length, 2);
  assert.equal(jobs.a.evals.length, 1);
});

test("a job first seen in an event is created, a deleted one removed, junk ignored", () => {
  let jobs = applyEvent({}, { job: "b", summary: { state: "queued", step: 0, total: 5 }, rows: [] });
  assert.equal(jobs.b.summary.state, "queued");
  jobs = applyEvent(jobs, { job: "b", deleted: true });
  assert.deepEqual(jobs, {});
  assert.equal(applyEvent(jobs, null), jobs);
  assert.equal(applyEvent(jobs, { nothing: 1 }), jobs);
});

test("skipped steps are not charted and long runs are thinned to at most MAX_POINTS", () => {
  const entry = entryFromDetail({ job: "c", steps: [] });
  addRow(entry, { kind: "step", step: 1, loss: NaN, skipped: true });
  assert.equal(entry.steps.length, 0);
  for (let step = 1; step <= 3 * MAX_POINTS; step++) addRow(entry, { kind: "step", step, loss: 1 / step });
  assert.ok(entry.steps.length <= MAX_POINTS && entry.steps.length > MAX_POINTS / 4, String(entry.steps.length));
  assert.equal(entry.steps[0].step, 1);
  const steps = entry.steps.map((r) => r.step);
  assert.deepEqual(steps, [...steps].sort((x, y) => x - y));
});

test("loss series hold only the terms present; metric series start at the base decoder", () => {
  const entry = entryFromDetail(detail);
  addRow(entry, { kind: "eval", step: 4, weights: "ema", psnr: 25.5, delta_e: 0.019, detail_ratio: 1.01 });
  const losses = lossSeries(entry);
  assert.deepEqual(Object.keys(losses), ["loss", "pixel", "gan"]);
  assert.deepEqual(losses.gan, [[4, 0.7]]);
  const metrics = metricSeries(entry);
  assert.deepEqual(metrics.psnr, [[0, 25], [4, 25.5]]);
  const deltas = metricDeltas(entry);
  assert.equal(deltas.length, 3);
  assert.ok(Math.abs(deltas[0].delta - 0.5) < 1e-12);
});

test("svg paths span the box, flip y, and survive a flat or single-point series", () => {
  const path = svgPath([[0, 0], [10, 1]], 100, 50, { pad: 0 });
  assert.equal(path, "M0.0 50.0 L100.0 0.0");
  assert.match(svgPath([[0, 3], [5, 3]], 100, 50), /^M2\.0 25\.0 L98\.0 25\.0$/);
  assert.match(svgPath([[7, 1]], 100, 50), /^M50\.0 /);
  assert.equal(svgPath([], 100, 50), "");
  const log = svgPath([[0, 1], [1, 10], [2, 100]], 100, 100, { log: true, pad: 0 });
  assert.equal(log, "M0.0 100.0 L50.0 50.0 L100.0 0.0");
});

test("the progress line shows rate and ETA only while running", () => {
  const running = progressLine({ state: "running", step: 25, total: 100, images_per_second: 3.21, eta_seconds: 3725 });
  assert.equal(running.percent, 25);
  assert.equal(running.text, "running · step 25 / 100 · 3.21 img/s · ETA 1h 02m");
  assert.equal(progressLine({ state: "stopped", step: 5, total: 10, eta_seconds: 9 }).text, "stopped · step 5 / 10");
  assert.equal(formatDuration(59.4), "59s");
  assert.equal(formatDuration(61), "1m 01s");
  assert.equal(formatDuration(null), "–");
});

test("active jobs are listed first, then the most recently updated", () => {
  const jobs = {
    old: { summary: { job: "old", state: "done", updated: 10 } },
    new: { summary: { job: "new", state: "stopped", updated: 20 } },
    live: { summary: { job: "live", state: "running", updated: 1 } },
  };
  assert.deepEqual(sortedJobs(jobs).map((e) => e.summary.job), ["live", "new", "old"]);
});

test("the worker's message is shown unless it only repeats the progress", () => {
  assert.equal(shownMessage({ message: "step 10 / 400" }), "");
  assert.equal(shownMessage({ message: "stopped at step 10 (checkpoint written)" }), "stopped at step 10 (checkpoint written)");
  assert.equal(shownMessage({}), "");
});
