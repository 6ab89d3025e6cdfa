import json
import os
import shutil
import subprocess
import sys

import numpy as np
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_finetunes_writes_comparison_table_and_a_strict_loadable_decoder(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("astronaut.png", "rocket.jpg", "coffee.png"):
        shutil.copy(os.path.join(ROOT, "assets", "images", name), images / name)
    (images / "broken.png").write_text("not an image")
    out = tmp_path / "out"
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "tools", "demo.py"),
            "--images",
            str(images),
            "--out",
            str(out),
            "--size",
            "128",
            "--crop",
            "64",
            "--batch",
            "2",
            "--steps",
            "3",
            "--held-out",
            "0.34",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TORCH_HOME": str(tmp_path / "th")},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "skipped 1 file(s): 1 not an image" in result.stdout
    assert "furception-nolpips" in result.stdout and "LPIPS" in result.stdout  # the fallback is said out loud
    picture = Image.open(out / "comparison.png")
    assert picture.size[0] >= 5 * 128 and picture.size[1] >= 128
    assert np.asarray(picture).std() > 20  # real content, not a blank canvas
    with open(out / "metrics.json") as f:
        report = json.load(f)
    assert report["settings"]["steps"] == 3 and len(report["held_out_images"]) == 1
    assert set(report["held_out_images"]).isdisjoint(report["settings"]["train_images"])
    base, tuned = report["summary"].values()
    assert base["psnr"]["mean"] > 25 and tuned["psnr"]["mean"] > 25
    assert report["unavailable"] == ["lpips_alex", "lpips_vgg"]
    with open(out / "metrics.md") as f:
        assert "| TAEF2 (base) |" in f.read()
    # madebyollin's layout, strictly: the decoder Sequential's own indices, as taesd.py's
    # TAESD(decoder_path=...) loads it
    from training.taesd import tiny_decoder

    decoder = torch.load(out / "taef2_decoder.pth", weights_only=True)
    tiny_decoder(32, midblock_groupnorm=True).load_state_dict(decoder, strict=True)
    original = torch.load(os.path.join(ROOT, "assets", "taef2", "taef2_decoder.pth"), weights_only=True)
    assert set(decoder) == set(original) and any(
        not torch.equal(decoder[k].float(), original[k].float()) for k in decoder
    )


def test_demo_names_a_bad_images_argument(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "tools", "demo.py"),
            "--images",
            str(tmp_path / "nope"),
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode != 0 and "--images" in result.stderr
