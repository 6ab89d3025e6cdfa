// VAE Lab in the browser: shows each VAE Lab node's text summary (the `text` of its UI output) in a
// read-only box on the node, the way the numbers of a model card sit next to its pictures.
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const CATEGORY = "VAE Lab";
const SUMMARY_WIDGET = "vae_lab_summary";

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

app.registerExtension({
  name: "VAELab.NodeSummary",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!isVaeLabNode(nodeData)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      if (message?.text) showSummary(this, [].concat(message.text).join("\n"));
    };
  },
});
