"""CI tier: the sidebar panel's logic (web/vae_lab_jobs_logic.js) under `node --test tests/js` — skipped, and said so,
on a machine without Node.js 20.19+ (the logic file is an ES module with a .js name)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _node() -> str | None:
    node = shutil.which("node")
    if node is None:
        return None
    version = subprocess.run([node, "--version"], capture_output=True, text=True, check=False).stdout.strip()
    match = re.match(r"v(\d+)\.(\d+)", version)
    return node if match and (int(match[1]), int(match[2])) >= (20, 19) else None


@pytest.mark.skipif(_node() is None, reason="needs Node.js >= 20.19 for `node --test` (Debian: apt install nodejs)")
def test_panel_logic_under_node_test():
    result = subprocess.run(
        [_node(), "--test", os.path.join(ROOT, "tests", "js")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert re.search(r"^# pass [1-9]", result.stdout, re.MULTILINE) and re.search(
        r"^# fail 0$", result.stdout, re.MULTILINE
    )
