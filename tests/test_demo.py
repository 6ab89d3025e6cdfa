import json
import os
import shutil
import subprocess
import sys

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_writes_picture_and_table_and_skips_bad_files(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("astronaut.png", "rocket.jpg"):
        shutil.copy(os.path.join(ROOT, "assets", "images", name), images / name)
    (images / "broken.png").write_text("not an image")
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "demo.py"), "--images", str(images), "--out", str(out), "--size", "128"],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "TORCH_HOME": str(tmp_path / "th")})
    assert result.returncode == 0, result.stderr
    assert "skipped 1 file(s): 1 not an image" in result.stdout
    picture = Image.open(out / "reconstruction.png")
    assert picture.size[0] >= 3 * 128 and picture.size[1] >= 2 * 128
    assert np.asarray(picture).std() > 20  # real content, not a blank canvas
    report = json.load(open(out / "metrics.json"))
    assert report["images"] == ["astronaut.png", "rocket.jpg"]
    assert report["summary"]["psnr"]["mean"] > 25
    assert report["unavailable"] == ["lpips_alex", "lpips_vgg"]
    assert "| TAEF2 |" in open(out / "metrics.md").read()


def test_demo_names_a_bad_images_argument(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "demo.py"), "--images", str(tmp_path / "nope"), "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "--images" in result.stderr
