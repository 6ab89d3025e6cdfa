"""Shared fixtures. The repository root goes on sys.path so ``import training`` works; the pack itself
(whose ``nodes/`` would shadow ComfyUI's ``nodes.py``) is never imported this way."""

from __future__ import annotations

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

BUNDLED_IMAGES = os.path.join(ROOT, "assets", "images")
TAEF2_DIR = os.path.join(ROOT, "assets", "taef2")


@pytest.fixture(scope="session")
def bundled_images_dir() -> str:
    return BUNDLED_IMAGES


@pytest.fixture(scope="session")
def taef2():
    from training.taesd import load_tiny_autoencoder

    return load_tiny_autoencoder(
        os.path.join(TAEF2_DIR, "taef2_encoder.pth"), os.path.join(TAEF2_DIR, "taef2_decoder.pth")
    ).eval()


@pytest.fixture(scope="session")
def photo_crops():
    """Four real 128x128 photo crops (B, 3, H, W) from the bundled images."""
    from training.data import center_crop, load_image01, to_tensor

    names = ["astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg"]
    return to_tensor([center_crop(load_image01(os.path.join(BUNDLED_IMAGES, n)), 128) for n in names])


def _host_params():
    from comfy_host import HOSTS

    return [pytest.param(host, id=host.release) for host in HOSTS] or [pytest.param(None, id="no-host")]


@pytest.fixture(scope="session", params=_host_params())
def comfy_host(request):
    """Each real ComfyUI the host tier runs against (every host test runs once per release)."""
    if request.param is None:
        pytest.skip(
            "host tier: no ComfyUI found (tools/test.sh sets both releases up from ../shared/comfyui, "
            "or set COMFYUI_DIR to a ComfyUI checkout with a venv)"
        )
    return request.param


@pytest.fixture(scope="session")
def comfy_server(comfy_host):
    """One real ComfyUI server per release for the whole host tier (booted on first use, stopped at the end)."""
    from comfy_host import ComfyServer

    server = ComfyServer(comfy_host)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def requires_release(host, release: str, feature: str) -> None:
    """The one allowed skip of a host test: the feature does not exist on this release."""
    if not host.at_least(release):
        pytest.skip(f"{RELEASE_GATED} ComfyUI {host.release} has no {feature} (needs {release} or newer)")


# With CI=true a skipped test fails the run: the host and browser tiers must really run in CI. The only skips
# allowed there are release-gated ones (a feature the release under test does not have).
RELEASE_GATED = "release-gated:"
_skips: list[tuple[str, str]] = []


def pytest_runtest_logreport(report):
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _skips.append((report.nodeid, reason))


def _forbidden_skips():
    if os.environ.get("CI", "").lower() not in ("true", "1"):
        return []
    return [(node, reason) for node, reason in _skips if RELEASE_GATED not in reason]


def pytest_terminal_summary(terminalreporter):
    forbidden = _forbidden_skips()
    if forbidden:
        terminalreporter.section("skips are failures in CI", sep="=", red=True)
        for node, reason in forbidden:
            terminalreporter.line(f"{node}: {reason}")


def pytest_sessionfinish(session, exitstatus):
    if _forbidden_skips() and session.exitstatus == 0:
        session.exitstatus = 1
