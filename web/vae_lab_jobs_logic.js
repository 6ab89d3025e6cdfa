// The VAE Lab panel's logic, free of the DOM and of ComfyUI (tested with `node --test tests/js`):
// jobs as the panel holds them, built from the routes' answers and advanced by `vae_lab.job` events, and
// the numbers and chart paths the panel draws.

export const MAX_POINTS = 400;
export const LOSS_TERMS = ["loss", "pixel", "detail", "lpips", "gan", "critic", "gp"];
export const METRICS = [
  { key: "psnr", label: "PSNR (dB)", better: "higher" },
  { key: "delta_e", label: "Oklab ΔE", better: "lower" },
  { key: "detail_ratio", label: "detail ratio", better: "1.0" },
];
const ACTIVE = new Set(["queued", "running"]);

// A job entry from GET /vae_lab/jobs/{job} (summary fields plus steps / evals / logs) or from a bare summary.
export function entryFromDetail(detail) {
  const { steps = [], evals = [], logs = [], ...summary } = detail;
  return { summary, steps: [...steps], evals: [...evals], logs: [...logs] };
}

// Applies one `vae_lab.job` event to `jobs` (an object name -> entry) and returns the new object; the old one is
// left untouched. Rows already seen (a reload raced an event) are ignored by step.
export function applyEvent(jobs, event) {
  if (!event || typeof event.job !== "string") return jobs;
  const next = { ...jobs };
  if (event.deleted) {
    delete next[event.job];
    return next;
  }
  const entry = jobs[event.job] ?? { summary: {}, steps: [], evals: [], logs: [] };
  const updated = { ...entry, summary: { ...entry.summary, ...(event.summary ?? {}) },
                    steps: [...entry.steps], evals: [...entry.evals], logs: [...entry.logs] };
  for (const row of event.rows ?? []) addRow(updated, row);
  next[event.job] = updated;
  return next;
}

export function addRow(entry, row) {
  if (row.kind === "eval") {
    if (!entry.evals.some((e) => e.step === row.step && e.weights === row.weights)) entry.evals.push(row);
  } else if (row.kind === "log") {
    entry.logs = [...entry.logs, row].slice(-20);
  } else if (row.kind === "step" && !row.skipped) {
    const last = entry.steps[entry.steps.length - 1];
    if (last && row.step <= last.step) return;
    entry.steps.push(row);
    if (entry.steps.length > MAX_POINTS) entry.steps = entry.steps.filter((_, i) => i % 2 === 0);
  }
}

export function formatDuration(seconds) {
  if (seconds == null || !Number.isFinite(seconds) || seconds < 0) return "–";
  const s = Math.round(seconds);
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${String(s % 60).padStart(2, "0")}s`;
  return `${Math.floor(s / 3600)}h ${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`;
}

export function progressLine(summary) {
  const total = summary.total ?? 0;
  const step = summary.step ?? 0;
  const percent = total > 0 ? Math.min(100, (100 * step) / total) : 0;
  const parts = [`${summary.state ?? "?"}`, `step ${step} / ${total}`];
  if (summary.state === "running") {
    if (summary.images_per_second) parts.push(`${summary.images_per_second.toFixed(summary.images_per_second < 10 ? 2 : 1)} img/s`);
    parts.push(`ETA ${formatDuration(summary.eta_seconds)}`);
  }
  return { text: parts.join(" · "), percent };
}

// The worker's message unless it only repeats the progress line ("step n / N").
export function shownMessage(summary) {
  const message = summary?.message ?? "";
  return /^step \d+ \/ \d+$/.test(message) ? "" : message;
}

export function isActive(summary) {
  return ACTIVE.has(summary?.state);
}

// Per loss term, [step, value] points of the logged steps (terms absent from every row are left out).
export function lossSeries(entry) {
  const series = {};
  for (const term of LOSS_TERMS) {
    const points = entry.steps.filter((r) => Number.isFinite(r[term])).map((r) => [r.step, r[term]]);
    if (points.length) series[term] = points;
  }
  return series;
}

// Per held-out metric, [step, value] points of the EMA evaluations, starting with the base decoder at step 0 when
// the job logged it.
export function metricSeries(entry) {
  const series = {};
  for (const { key } of METRICS) {
    const points = entry.evals.filter((e) => Number.isFinite(e[key])).map((e) => [e.weights === "base" ? 0 : e.step, e[key]]);
    if (points.length) series[key] = points.sort((a, b) => a[0] - b[0]);
  }
  return series;
}

// An SVG path ("M x y L x y ...") of `points` in a width x height box; y grows downwards; the range of y is
// `yRange` ([min, max]) or the points' own (a flat series sits in the middle). Log scale for positive values
// when `log` is set.
export function svgPath(points, width, height, { xRange, yRange, log = false, pad = 2 } = {}) {
  if (!points.length) return "";
  const ys = points.map(([, y]) => (log ? Math.log10(Math.max(y, 1e-12)) : y));
  const [x0, x1] = xRange ?? [points[0][0], points[points.length - 1][0]];
  let [y0, y1] = yRange ? (log ? yRange.map((v) => Math.log10(Math.max(v, 1e-12))) : yRange) : [Math.min(...ys), Math.max(...ys)];
  if (y1 - y0 < 1e-12) { y0 -= 1; y1 += 1; }
  const sx = (x) => (x1 > x0 ? pad + ((x - x0) / (x1 - x0)) * (width - 2 * pad) : width / 2);
  const sy = (y) => pad + (1 - (y - y0) / (y1 - y0)) * (height - 2 * pad);
  return points.map(([x], i) => `${i ? "L" : "M"}${sx(x).toFixed(1)} ${sy(ys[i]).toFixed(1)}`).join(" ");
}

// The change of each held-out metric from the base decoder to the newest evaluation, as the panel prints it.
export function metricDeltas(entry) {
  const base = entry.evals.find((e) => e.weights === "base");
  const now = [...entry.evals].reverse().find((e) => e.weights !== "base");
  if (!base || !now) return [];
  return METRICS.filter(({ key }) => Number.isFinite(base[key]) && Number.isFinite(now[key])).map(({ key, label }) => ({
    key, label, base: base[key], now: now[key], delta: now[key] - base[key],
  }));
}

// Jobs in the order the panel lists them: active first, then the most recently updated.
export function sortedJobs(jobs) {
  return Object.values(jobs).sort((a, b) => (isActive(b.summary) - isActive(a.summary))
    || (b.summary.updated ?? 0) - (a.summary.updated ?? 0));
}
