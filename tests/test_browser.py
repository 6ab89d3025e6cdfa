"""Host tier, in the browser: the real ComfyUI frontend in headless Chromium shows a VAE Lab node's
summary after the example workflow runs. Skipped without COMFYUI_DIR or Chromium."""
from __future__ import annotations

import json
import os

import pytest
from browser import Browser, chromium_path
from comfy_host import ROOT, comfyui_dir

pytestmark = pytest.mark.skipif(comfyui_dir() is None or chromium_path() is None,
                                reason="browser test: needs COMFYUI_DIR and Debian's chromium")

ARTIFACTS = os.environ.get("VAE_LAB_ARTIFACTS", os.path.join(ROOT, "out", "test-artifacts"))
APP = "window.comfyAPI.app.app"


@pytest.fixture(scope="module")
def page(comfy_server):
    comfy_server.post("/settings/Comfy.TutorialCompleted", True)  # no first-run template dialog over the canvas
    browser = Browser()
    try:
        browser.call("Page.navigate", url=comfy_server.url)
        browser.wait_for(f"!!(window.comfyAPI && window.comfyAPI.app && {APP} && {APP}.graph)", 120)
        yield browser
    finally:
        browser.close()


def _node_js(node_type):
    return f"{APP}.graph._nodes.find(n => n.type === {json.dumps(node_type)})"


def test_summary_appears_on_the_node_and_is_never_saved(page):
    workflow = open(os.path.join(ROOT, "example_workflows", "oklab_loss_palette.json")).read()
    page.evaluate(f"(async () => {{ await {APP}.loadGraphData({workflow}); await {APP}.queuePrompt(0, 1); }})()")
    text = page.wait_for(f"(() => {{ const n = {_node_js('VAELab_OklabLoss')}; const w = n?.widgets?.find(w => w.name === 'vae_lab_summary'); return w?.value; }})()", 180)
    assert text.startswith("Oklab loss") and "mean ΔE" in text and "error split" in text
    os.makedirs(ARTIFACTS, exist_ok=True)
    page.screenshot(os.path.join(ARTIFACTS, "oklab_loss_palette.png"))
    saved = page.evaluate(f"(() => {{ const n = {APP}.graph.serialize().nodes.find(n => n.type === 'VAELab_OklabLoss'); return n.widgets_values; }})()")
    assert len(saved) == 6, saved  # the summary box is display-only: widget values keep their meaning
    prompt = page.evaluate(f"(async () => (await {APP}.graphToPrompt()).output)()")
    node = next(v for v in prompt.values() if v["class_type"] == "VAELab_OklabLoss")
    assert "vae_lab_summary" not in node["inputs"]
