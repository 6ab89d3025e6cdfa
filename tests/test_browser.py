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


def test_ab_slider_shows_both_reconstructions_and_follows_the_range(page):
    """Compare Reconstructions' A/B slider, in the real frontend: two images loaded from /view, labelled with the
    VAEs, and moving the range input moves the clip of side A and the divider."""
    with open(os.path.join(ROOT, "example_workflows", "compare_decoders_on_my_images.json")) as f:
        workflow = json.load(f)
    for node in workflow["nodes"]:  # 1 training step instead of 10: this test is about the widget
        if node["type"] == "VAELab_DecoderFinetuneSteps":
            node["widgets_values"][2] = 1
    page.evaluate(f"(async () => {{ await {APP}.loadGraphData({json.dumps(workflow)}); await {APP}.queuePrompt(0, 1); }})()")
    root = f"{_node_js('VAELab_CompareReconstructions')}?.widgets?.find(w => w.name === 'vae_lab_ab')?.element"
    loaded = page.wait_for(f"(() => {{ const r = {root}; if (!r) return false; const imgs = [...r.querySelectorAll('img')]; "
                           "return imgs.length === 2 && imgs.every(i => i.complete && i.naturalWidth > 0) && "
                           "imgs.map(i => i.getAttribute('src')); })()", 600)
    assert all("/view?" in src and "type=temp" in src for src in loaded), loaded
    labels = page.evaluate(f"(() => {{ const r = {root}; return [r.querySelector('.vae-lab-ab-label-a').textContent, "
                           "r.querySelector('.vae-lab-ab-label-b').textContent]; })()")
    assert labels == ["A: taef2", "B: finetuned ema"]
    moved = page.evaluate(f"(() => {{ const r = {root}; const range = r.querySelector('.vae-lab-ab-range'); range.value = '25'; "
                          "range.dispatchEvent(new Event('input', {bubbles: true})); "
                          "return [r.querySelector('.vae-lab-ab-a').style.clipPath, r.querySelector('.vae-lab-ab-divider').style.left, "
                          "r.dataset.divider]; })()")
    assert moved == ["inset(0px 75% 0px 0px)", "25%", "25"] or moved == ["inset(0 75% 0 0)", "25%", "25"], moved
    os.makedirs(ARTIFACTS, exist_ok=True)
    page.screenshot(os.path.join(ARTIFACTS, "compare_ab_slider.png"))
    saved = page.evaluate(f"(() => {{ const n = {APP}.graph.serialize().nodes.find(n => n.type === 'VAELab_CompareReconstructions'); "
                          "return n.widgets_values; })()")
    assert len(saved) == 9, saved  # the slider is display-only
