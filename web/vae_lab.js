// VAE Lab in the browser:
// - each VAE Lab node's text summary (the `text` of its UI output) in a read-only box on the node, the way
//   the numbers of a model card sit next to its pictures;
// - an A/B slider on Compare Reconstructions (core 0.3.64 has no image-compare node): two reconstructions
//   stacked, the top one clipped at a divider that follows the pointer or the range input.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const CATEGORY = "VAE Lab";
const SUMMARY_WIDGET = "vae_lab_summary";
const AB_WIDGET = "vae_lab_ab";

function isVaeLabNode(nodeData) {
  const category = nodeData?.category ?? "";
  return category === CATEGORY || category.startsWith(`${CATEGORY}/`);
}

function showSummary(node, text) {
  let widget = node.widgets?.find((w) => w.name === SUMMARY_WIDGET);
  if (!widget) {
    widget = ComfyWidgets.STRING(node, SUMMARY_WIDGET, ["STRING", { multiline: true }], app).widget;
    widget.options = { ...(widget.options ?? {}), serialize: false }; // never saved into workflows or prompts
    widget.serialize = false;
    if (widget.inputEl) {
      widget.inputEl.readOnly = true;
      widget.inputEl.style.fontFamily = "monospace";
      widget.inputEl.style.fontSize = "11px";
    }
  }
  widget.value = text;
  node.setSize([Math.max(node.size[0], 420), Math.max(node.size[1], node.computeSize()[1])]);
  node.setDirtyCanvas(true, true);
}

export function viewUrl(file) {
  const query = new URLSearchParams({ filename: file.filename, subfolder: file.subfolder ?? "", type: file.type ?? "temp" });
  return api.apiURL(`/view?${query}`);
}

// Moves the divider to `percent` (0 = all B, 100 = all A) and returns the clamped value.
export function setDivider(element, percent) {
  const value = Math.min(100, Math.max(0, Number(percent)));
  element.querySelector(".vae-lab-ab-a").style.clipPath = `inset(0 ${100 - value}% 0 0)`;
  element.querySelector(".vae-lab-ab-divider").style.left = `${value}%`;
  element.querySelector(".vae-lab-ab-range").value = String(value);
  element.dataset.divider = String(value);
  return value;
}

function buildSlider() {
  const root = document.createElement("div");
  root.className = "vae-lab-ab";
  root.style.cssText = "position:relative;width:100%;height:100%;min-height:160px;overflow:hidden;user-select:none;background:#222";
  root.innerHTML = `
    <img class="vae-lab-ab-b" draggable="false" style="position:absolute;inset:0;width:100%;height:100%;object-fit:contain">
    <img class="vae-lab-ab-a" draggable="false" style="position:absolute;inset:0;width:100%;height:100%;object-fit:contain">
    <div class="vae-lab-ab-divider" style="position:absolute;top:0;bottom:22px;width:2px;background:#fff;box-shadow:0 0 3px #000;pointer-events:none"></div>
    <span class="vae-lab-ab-label-a" style="position:absolute;left:4px;top:4px;font:11px monospace;color:#fff;background:#000a;padding:1px 4px"></span>
    <span class="vae-lab-ab-label-b" style="position:absolute;right:4px;top:4px;font:11px monospace;color:#fff;background:#000a;padding:1px 4px"></span>
    <input class="vae-lab-ab-range" type="range" min="0" max="100" step="0.5" value="50" style="position:absolute;left:0;right:0;bottom:0;width:100%">`;
  root.querySelector(".vae-lab-ab-range").addEventListener("input", (e) => setDivider(root, e.target.value));
  root.addEventListener("pointermove", (e) => {
    if (e.target.classList.contains("vae-lab-ab-range")) return;
    const box = root.getBoundingClientRect();
    if (box.width > 0) setDivider(root, ((e.clientX - box.left) / box.width) * 100);
  });
  return root;
}

function showSlider(node, pair) {
  let widget = node.widgets?.find((w) => w.name === AB_WIDGET);
  if (!widget) {
    widget = node.addDOMWidget(AB_WIDGET, "vae_lab_ab", buildSlider(), { serialize: false, hideOnZoom: false });
    widget.serialize = false;
    widget.computeSize = (width) => [width, 280];
  }
  const root = widget.element;
  root.querySelector(".vae-lab-ab-a").src = viewUrl(pair.a);
  root.querySelector(".vae-lab-ab-b").src = viewUrl(pair.b);
  const [labelA, labelB] = pair.labels ?? ["A", "B"];
  root.querySelector(".vae-lab-ab-label-a").textContent = `A: ${labelA}`;
  root.querySelector(".vae-lab-ab-label-b").textContent = `B: ${labelB}`;
  setDivider(root, 50);
  node.setSize([Math.max(node.size[0], 480), Math.max(node.size[1], node.computeSize()[1])]);
  node.setDirtyCanvas(true, true);
}

app.registerExtension({
  name: "VAELab.NodeSummary",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!isVaeLabNode(nodeData)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      if (message?.text) showSummary(this, [].concat(message.text).join("\n"));
      const pair = [].concat(message?.vae_lab_ab ?? [])[0];
      if (pair?.a && pair?.b) showSlider(this, pair);
    };
  },
});
