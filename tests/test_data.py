import io
import os
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from training import data


def _s15(v):
    return struct.pack(">i", round(v * 65536))


def _matrix_icc_profile(red_xyz, green_xyz, blue_xyz, description=b"swapped test profile"):
    """A minimal ICC v2 RGB matrix/TRC display profile (gamma 2.2), built from the spec by hand."""

    def xyz_tag(x):
        return b"XYZ " + b"\0" * 4 + b"".join(_s15(c) for c in x)

    curve = b"curv" + b"\0" * 4 + struct.pack(">I", 1) + struct.pack(">H", int(2.2 * 256)) + b"\0\0"
    desc = b"desc" + b"\0" * 4 + struct.pack(">I", len(description) + 1) + description + b"\0"
    desc += b"\0" * 8 + b"\0" * 3 + b"\0" * 67
    tags = [
        (b"desc", desc),
        (b"wtpt", xyz_tag((0.9642, 1.0, 0.8249))),
        (b"rXYZ", xyz_tag(red_xyz)),
        (b"gXYZ", xyz_tag(green_xyz)),
        (b"bXYZ", xyz_tag(blue_xyz)),
        (b"rTRC", curve),
        (b"gTRC", curve),
        (b"bTRC", curve),
    ]
    offset = 128 + 4 + 12 * len(tags)
    table, blob = b"", b""
    for sig, payload in tags:
        payload += b"\0" * (-len(payload) % 4)
        table += sig + struct.pack(">II", offset + len(blob), len(payload))
        blob += payload
    size = offset + len(blob)
    header = struct.pack(">I", size) + b"lcms" + bytes([2, 0x10, 0, 0]) + b"mntrRGB XYZ " + b"\0" * 12 + b"acsp"
    header += b"\0" * 24 + struct.pack(">I", 0) + _s15(0.9642) + _s15(1.0) + _s15(0.8249) + b"\0" * 48
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + table + blob


SRGB_RED_D50, SRGB_GREEN_D50, SRGB_BLUE_D50 = (
    (0.4361, 0.2225, 0.0139),
    (0.3851, 0.7169, 0.0971),
    (0.1431, 0.0606, 0.7141),
)


def _save(img, path, **kw):
    img.save(path, **kw)
    return str(path)


@pytest.fixture()
def folder(tmp_path):
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (80, 100, 3), dtype=np.uint8))
    _save(photo, root / "a.png")
    _save(photo, root / "sub" / "b.JPG", quality=95)
    _save(photo.convert("L"), root / "gray.png")
    _save(photo.convert("P", palette=Image.Palette.ADAPTIVE), root / "palette.png")
    _save(photo, root / "c.webp", lossless=True)
    _save(photo, root / "d.bmp")
    _save(photo, root / "e.tiff")
    (root / "notes.txt").write_text("not an image and not an image suffix")
    return root


def test_folder_is_scanned_recursively_with_all_formats(folder):
    images = data.ImageFolder(folder, min_side=64)
    names = sorted(os.path.basename(p) for p in images.paths)
    assert names == ["a.png", "b.JPG", "c.webp", "d.bmp", "e.tiff", "gray.png", "palette.png"]
    assert images.skipped.count == 0
    for i in range(len(images)):
        px = images.image(i)
        assert px.dtype == np.float32 and px.shape == (80, 100, 3) and px.min() >= 0 and px.max() <= 1


def test_bad_files_are_skipped_and_counted_never_fatal(folder):
    rng = np.random.default_rng(1)
    good = Image.fromarray(rng.integers(0, 256, (80, 100, 3), dtype=np.uint8))
    buf = io.BytesIO()
    good.save(buf, "PNG")
    (folder / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    jbuf = io.BytesIO()
    good.save(jbuf, "JPEG")
    (folder / "truncated.jpg").write_bytes(jbuf.getvalue()[: len(jbuf.getvalue()) // 2])
    (folder / "fake.png").write_text("hello, I am text")
    (folder / "empty.jpg").write_bytes(b"")
    _save(good.resize((40, 30)), folder / "tiny.png")
    Image.new("1", (15000, 15000)).save(folder / "bomb.png")  # 225 Mpx of zeros, a few KB on disk
    images = data.ImageFolder(folder, min_side=64)
    assert len(images) == 7
    counts = {reason: len(paths) for reason, paths in images.skipped.by_reason.items()}
    assert counts == {
        "truncated or corrupt": 2,
        "not an image": 1,
        "empty file": 1,
        "smaller than the crop": 1,
        "too large": 1,
    }
    assert "skipped 6 file(s)" in images.skipped.summary()


def test_all_bad_folder_is_a_clear_error(tmp_path):
    (tmp_path / "x.png").write_text("nope")
    Image.new("RGB", (10, 10)).save(tmp_path / "small.png")
    with pytest.raises(data.NoUsableImages) as info:
        data.ImageFolder(tmp_path, min_side=64)
    assert (
        str(tmp_path) in str(info.value)
        and "not an image" in str(info.value)
        and "at least 64 pixels" in str(info.value)
    )
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(data.NoUsableImages, match="no png/jpg"):
        data.ImageFolder(tmp_path / "emptydir")
    with pytest.raises(NotADirectoryError):
        data.ImageFolder(tmp_path / "missing")


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 10, 20))  # blue stripe on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img.save(tmp_path / "rot.jpg", exif=exif, quality=100)
    px = data.load_image01(tmp_path / "rot.jpg")
    assert px.shape == (40, 20, 3)
    assert px[:10, :, 2].mean() > 0.8 and px[-10:, :, 0].mean() > 0.8  # stripe is now on top


def test_icc_profile_is_converted_to_srgb(tmp_path):
    # A profile whose "red" channel has sRGB's green primary and vice versa: a correct conversion swaps them.
    profile = _matrix_icc_profile(SRGB_GREEN_D50, SRGB_RED_D50, SRGB_BLUE_D50)
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "p.png", icc_profile=profile)
    px = data.load_image01(tmp_path / "p.png")
    assert px[..., 1].mean() > 0.9 and px[..., 0].mean() < 0.1
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "broken.png", icc_profile=b"garbage profile")
    assert data.load_image01(tmp_path / "broken.png")[..., 0].mean() > 0.99  # unreadable profile: kept as sRGB


def test_sixteen_bit_grayscale_keeps_its_range(tmp_path):
    values = np.array([[0, 1000, 40000, 65535]], dtype=np.uint16).repeat(4, 0)
    Image.fromarray(values).save(tmp_path / "g16.png")
    px = data.load_image01(tmp_path / "g16.png")
    assert np.allclose(px[0, :, 0], values[0] / 65535, atol=1e-6)
    assert np.allclose(px[..., 0], px[..., 2])


def test_transparency_is_composited_on_white(tmp_path):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 255
    rgba[:, :2, 3] = 255  # left half opaque red, right half fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    px = data.load_image01(tmp_path / "t.png")
    assert np.allclose(px[:, :2], [1, 0, 0]) and np.allclose(px[:, 2:], [1, 1, 1])
    la = Image.fromarray(np.stack([np.full((4, 4), 0, np.uint8), np.full((4, 4), 128, np.uint8)], -1), "LA")
    la.save(tmp_path / "la.png")
    assert np.allclose(data.load_image01(tmp_path / "la.png"), 1 - 128 / 255, atol=1e-6)
    opaque = rgba.copy()
    opaque[..., 3] = 255
    Image.fromarray(opaque, "RGBA").save(tmp_path / "o.png")
    assert np.allclose(data.load_image01(tmp_path / "o.png"), [1, 0, 0])


def test_palette_with_transparency(tmp_path):
    img = Image.new("P", (4, 4), 0)
    img.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    img.putpixel((0, 0), 1)
    img.info["transparency"] = 0
    img.save(tmp_path / "p.png", transparency=0)
    px = data.load_image01(tmp_path / "p.png")
    assert np.allclose(px[0, 0], [0, 1, 0]) and np.allclose(px[1, 1], [1, 1, 1])


def test_crops_are_deterministic_under_a_seed(folder):
    images = data.ImageFolder(folder, min_side=32)
    a = data.CropSampler(images, 32, seed=7).batch(step=3, batch_size=4)
    b = data.CropSampler(images, 32, seed=7).batch(step=3, batch_size=4)
    c = data.CropSampler(images, 32, seed=8).batch(step=3, batch_size=4)
    d = data.CropSampler(images, 32, seed=7).batch(step=4, batch_size=4)
    assert a.shape == (4, 3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, d)


def test_random_crop_levels_and_augmentation():
    pixels = np.random.default_rng(0).random((300, 400, 3), dtype=np.float32)
    rng = np.random.default_rng(0)
    crops = [data.random_crop(pixels, 64, rng, downscales=(1,), augment=False) for _ in range(5)]
    # native level: every crop is an exact window of the source
    for crop in crops:
        y, x = np.argwhere((pixels == crop[0, 0]).all(-1))[0]
        assert np.array_equal(pixels[y : y + 64, x : x + 64], crop)
    down = data.random_crop(pixels, 64, np.random.default_rng(1), downscales=(4,), augment=False)
    assert down.shape == (64, 64, 3)
    assert down.std() < pixels.std() * 0.6  # 4x Lanczos downscale of noise averages it out (antialiased)
    with pytest.raises(ValueError, match="smaller than the 512px crop"):
        data.random_crop(pixels, 512, rng)


def test_center_crop_is_short_side_resize_then_centre():
    pixels = np.zeros((200, 400, 3), dtype=np.float32)
    pixels[:, 100:300] = 1.0  # the central square is white
    out = data.center_crop(pixels, 100)
    assert out.shape == (100, 100, 3) and out.mean() > 0.99


def test_held_out_split_is_deterministic_and_disjoint():
    train, held = data.split_held_out(10, 0.2, seed=3)
    assert len(held) == 2 and not set(train) & set(held) and sorted(train + held) == list(range(10))
    assert data.split_held_out(10, 0.2, seed=3) == (train, held)
    assert data.split_held_out(1, 0.5, seed=0) == ([0], [])
    assert len(data.split_held_out(2, 0.01, seed=0)[1]) == 1
