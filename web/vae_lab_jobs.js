// The "VAE Lab" sidebar panel: every background finetune job with its state, step / total, images/s, ETA, a loss
// chart per term, held-out PSNR / ΔE / detail ratio over time, the newest target | base | EMA preview, and
// stop / pause / resume / delete / open-result buttons. Loaded from the routes on open and on reconnect, then kept
// current by `vae_lab.job` events (sent by nodes/job_panel.py). The logic lives in vae_lab_jobs_logic.js.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import {
  applyEvent, entryFromDetail, lossSeries, METRICS, metricDeltas, metricSeries, progressLine, shownMessage, sortedJobs,
  svgPath,
} from "./vae_lab_jobs_logic.js";

const TAB_ID = "vae-lab-jobs";
const COLOURS = ["#f0aa3c", "#5aaaf0", "#96dc78", "#e66478", "#c88cf0", "#50d2c8", "#dcdc64"];
const ACTION_LABELS = { pause: "Pause", resume: "Resume", stop: "Stop", delete: "Delete" };

let jobs = {};
let container = null; // the open panel's element, or null while the tab is closed

async function getJson(path) {
  const response = await api.fetchApi(path, { cache: "no-store" });
  if (!response.ok) throw new Error(`${path}: ${response.status}`);
  return response.json();
}

async function loadAll() {
  try {
    const { jobs: summaries } = await getJson("/vae_lab/jobs");
    const details = await Promise.all(summaries.map((s) => getJson(`/vae_lab/jobs/${encodeURIComponent(s.job)}`)
      .catch(() => s)));
    jobs = Object.fromEntries(details.map((d) => [d.job, entryFromDetail(d)]));
  } catch (error) {
    console.warn("VAE Lab: could not load the jobs", error);
  }
  render();
}

async function act(name, action) {
  if (action === "delete" && !window.confirm(`Delete job ${name} and all its checkpoints?`)) return;
  const response = await api.fetchApi(`/vae_lab/jobs/${encodeURIComponent(name)}/${action}`, { method: "POST" });
  const answer = await response.json().catch(() => ({}));
  if (!response.ok) {
    setMessage(name, answer.error ?? `${action} failed (${response.status})`, true);
    return;
  }
  jobs = applyEvent(jobs, answer.deleted ? { job: name, deleted: true } : { job: name, summary: answer });
  render();
}

function openResult(name) {
  const node = globalThis.LiteGraph?.createNode("VAELab_LoadFinetuneJob");
  if (!node) return;
  const widget = node.widgets?.find((w) => w.name === "job");
  if (widget) {
    if (widget.options?.values && !widget.options.values.includes(name)) widget.options.values = [...widget.options.values, name];
    widget.value = name;
  }
  const offset = app.canvas?.ds?.offset ?? [0, 0];
  node.pos = [60 - offset[0], 60 - offset[1]];
  app.graph.add(node);
  app.graph.setDirtyCanvas(true, true);
}

function setMessage(name, text, isError) {
  const card = container?.querySelector(`.vae-lab-job[data-job="${CSS.escape(name)}"] .vae-lab-job-message`);
  if (card) {
    card.textContent = text;
    card.style.color = isError ? "#f77" : "";
  }
}

function chart(seriesByName, { width = 300, height = 90, log = false, legend = true } = {}) {
  const names = Object.keys(seriesByName);
  if (!names.length) return "";
  const all = names.flatMap((n) => seriesByName[n]);
  const xRange = [Math.min(...all.map((p) => p[0])), Math.max(...all.map((p) => p[0]))];
  const paths = names.map((n, i) => {
    const d = svgPath(seriesByName[n], width, height, { xRange, log });
    const colour = COLOURS[i % COLOURS.length];
    if (seriesByName[n].length === 1) { // one point: a dot, a lone "M" would draw nothing
      const [, x, y] = d.match(/^M([\d.-]+) ([\d.-]+)/);
      return `<circle cx="${x}" cy="${y}" r="2.5" fill="${colour}"><title>${n}</title></circle>`;
    }
    return `<path d="${d}" fill="none" stroke="${colour}" stroke-width="1.5"><title>${n}</title></path>`;
  }).join("");
  const keys = legend ? `<div class="vae-lab-legend">${names.map((n, i) => {
    const last = seriesByName[n][seriesByName[n].length - 1][1];
    return `<span style="color:${COLOURS[i % COLOURS.length]}">■ ${n} ${formatNumber(last)}</span>`;
  }).join(" ")}</div>` : "";
  return `<svg class="vae-lab-chart" viewBox="0 0 ${width} ${height}" width="100%" height="${height}" preserveAspectRatio="none"
    style="background:#1118;border-radius:3px">${paths}</svg>${keys}`;
}

function formatNumber(value) {
  if (!Number.isFinite(value)) return "–";
  const magnitude = Math.abs(value);
  return magnitude >= 100 ? value.toFixed(1) : magnitude >= 1 ? value.toFixed(3) : value.toPrecision(3);
}

function cardHtml(entry) {
  const s = entry.summary;
  const { text, percent } = progressLine(s);
  const losses = lossSeries(entry);
  const metrics = metricSeries(entry);
  const deltas = metricDeltas(entry);
  const buttons = (s.actions ?? []).map((a) => `<button class="vae-lab-job-action" data-action="${a}">${ACTION_LABELS[a] ?? a}</button>`);
  if (s.checkpoint_step != null) buttons.push(`<button class="vae-lab-job-open" title="Add a Load Finetune Job node for this job">Open result</button>`);
  const metricCharts = METRICS.filter(({ key }) => metrics[key]).map(({ key, label }) =>
    `<div class="vae-lab-metric" data-metric="${key}"><div class="vae-lab-small">${label}</div>${chart({ [label]: metrics[key] }, { height: 50, legend: false })}</div>`).join("");
  return `
    <div class="vae-lab-job-head"><b class="vae-lab-job-name"></b>
      <span class="vae-lab-job-state vae-lab-state-${s.state}">${s.state}</span>
      <span class="vae-lab-small">${s.recipe ?? ""} · ${s.device ?? ""}</span></div>
    <div class="vae-lab-bar"><div style="width:${percent.toFixed(1)}%"></div></div>
    <div class="vae-lab-job-progress">${text}</div>
    <div class="vae-lab-job-message vae-lab-small"></div>
    <div class="vae-lab-job-buttons">${buttons.join("")}</div>
    ${Object.keys(losses).length ? `<div class="vae-lab-small">losses (log scale)</div>${chart(losses, { log: true })}` : ""}
    ${deltas.length ? `<div class="vae-lab-job-deltas vae-lab-small">held-out, base → now: ${deltas.map((d) =>
      `${d.label} ${formatNumber(d.base)} → ${formatNumber(d.now)}`).join(" · ")}</div>` : ""}
    <div class="vae-lab-metrics">${metricCharts}</div>
    ${s.preview ? `<img class="vae-lab-job-preview" alt="target | base | EMA" style="width:100%;image-rendering:auto">` : ""}`;
}

function render() {
  if (!container) return;
  const list = container.querySelector(".vae-lab-jobs");
  const entries = sortedJobs(jobs);
  container.querySelector(".vae-lab-empty").style.display = entries.length ? "none" : "";
  const seen = new Set();
  for (const entry of entries) {
    const name = entry.summary.job;
    seen.add(name);
    let card = list.querySelector(`.vae-lab-job[data-job="${CSS.escape(name)}"]`);
    const oldPreview = card?.querySelector(".vae-lab-job-preview")?.src;
    if (!card) {
      card = document.createElement("div");
      card.className = "vae-lab-job";
      card.dataset.job = name;
      card.addEventListener("click", (e) => {
        const button = e.target.closest("button");
        if (!button) return;
        if (button.classList.contains("vae-lab-job-open")) openResult(name);
        else act(name, button.dataset.action);
      });
    }
    list.appendChild(card); // keeps the sorted order
    card.dataset.state = entry.summary.state;
    card.dataset.step = String(entry.summary.step ?? 0);
    card.innerHTML = cardHtml(entry);
    card.querySelector(".vae-lab-job-name").textContent = name;
    card.querySelector(".vae-lab-job-message").textContent = shownMessage(entry.summary);
    const img = card.querySelector(".vae-lab-job-preview");
    if (img) {
      const src = api.apiURL(`/vae_lab/jobs/${encodeURIComponent(name)}/preview.png?t=${entry.summary.preview}`);
      img.src = oldPreview && oldPreview.endsWith(src) ? oldPreview : src;
    }
  }
  for (const card of [...list.querySelectorAll(".vae-lab-job")]) if (!seen.has(card.dataset.job)) card.remove();
}

const STYLE = `
  .vae-lab-panel { padding: 8px; font-size: 12px; overflow-y: auto; height: 100%; box-sizing: border-box; }
  .vae-lab-job { border: 1px solid #8884; border-radius: 4px; padding: 6px; margin-bottom: 8px; }
  .vae-lab-job-head { display: flex; gap: 6px; align-items: baseline; flex-wrap: wrap; }
  .vae-lab-job-state { padding: 0 5px; border-radius: 3px; background: #666; color: #fff; }
  .vae-lab-state-running { background: #2a7a3a; } .vae-lab-state-queued { background: #7a6a2a; }
  .vae-lab-state-failed { background: #8a2a2a; } .vae-lab-state-done { background: #2a5a8a; }
  .vae-lab-state-interrupted, .vae-lab-state-paused { background: #8a5a2a; }
  .vae-lab-small { opacity: 0.75; font-size: 11px; }
  .vae-lab-bar { height: 4px; background: #8883; margin: 4px 0; } .vae-lab-bar > div { height: 100%; background: #4a9; }
  .vae-lab-job-buttons { display: flex; gap: 4px; margin: 4px 0; flex-wrap: wrap; }
  .vae-lab-job-buttons button { font-size: 11px; padding: 1px 8px; cursor: pointer; }
  .vae-lab-legend { display: flex; gap: 8px; flex-wrap: wrap; font-size: 10px; }
  .vae-lab-metrics { display: grid; grid-template-columns: repeat(3, 1fr); gap: 4px; margin-top: 4px; }`;

function mount(element) {
  container = element;
  element.innerHTML = `<style>${STYLE}</style><div class="vae-lab-panel">
    <div style="display:flex;justify-content:space-between;align-items:center"><b>VAE Lab jobs</b>
      <button class="vae-lab-refresh" title="Reload from the server">↻</button></div>
    <div class="vae-lab-empty vae-lab-small">No jobs yet: queue a workflow with Start Finetune Job
      (example: background_finetune_job).</div>
    <div class="vae-lab-jobs"></div></div>`;
  element.querySelector(".vae-lab-refresh").addEventListener("click", loadAll);
  loadAll();
}

app.registerExtension({
  name: "VAELab.JobsPanel",
  async setup() {
    api.addEventListener("vae_lab.job", ({ detail }) => {
      jobs = applyEvent(jobs, detail);
      render();
    });
    api.addEventListener("reconnected", () => loadAll());
    app.extensionManager?.registerSidebarTab?.({
      id: TAB_ID,
      icon: "pi pi-chart-line",
      title: "VAE Lab",
      tooltip: "VAE Lab: background finetune jobs",
      type: "custom",
      render: mount,
      destroy: () => { container = null; },
    });
  },
});
