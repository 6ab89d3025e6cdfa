"""Images from a folder of the user's files -> float tensors in [0, 1], and random training crops.

One loader for every image this pack reads (``load_image01``):

* EXIF orientation is applied; an embedded ICC profile (Display P3, Adobe RGB, a camera's...) is
  converted to sRGB with LittleCMS; CMYK is converted through its profile or Pillow's default.
* Grayscale becomes three equal channels; palette images are expanded; 16-bit images keep their precision
  (``I;16`` PNG/TIFF are scaled by 1/65535, never clipped at 255).
* Transparency is composited onto white (what most viewers show for a transparent PNG), so a cut-out
  object is trained as it looks on a page; fully opaque alpha is simply dropped.

Bad files never stop a run: ``ImageFolder`` skips and counts files that are empty, not images, truncated
or corrupt, too large to decode safely (decompression bombs) or smaller than the crop; a folder with no
usable image at all is a clear error that says why each file was skipped.

Random crops (``CropSampler``) follow the Furception recipe: a square region at one of several downscale
levels (native pixels up to 4x more of the scene), Lanczos-downscaled (antialiased) to the crop size,
then a random rot90 and flip.
Every crop is a pure function of (seed, step, position in batch): the same seed gives the same data.
"""

from __future__ import annotations

import io
import os
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageCms, ImageFile, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")

# Decoding more pixels than this is refused (Pillow's own hard limit is 2x its warning threshold).
MAX_PIXELS = 2 * 89_478_485

# Never half-decode a truncated file into a grey-bottomed image.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageSkipped(Exception):
    """One file that cannot be used; ``reason`` is a short category for counting."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class NoUsableImages(ValueError):
    pass


_SRGB_PROFILE = ImageCms.createProfile("sRGB")


def _to_srgb(image: Image.Image) -> Image.Image:
    """Convert through the embedded ICC profile, if any and if it is not already sRGB."""
    icc = image.info.get("icc_profile")
    if not icc or image.mode not in ("RGB", "RGBA", "CMYK", "L"):
        return image
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        description = (ImageCms.getProfileDescription(source) or "").lower()
        if "srgb" in description and image.mode != "CMYK":
            return image
        alpha = image.getchannel("A") if image.mode == "RGBA" else None
        base = image.convert("RGB") if image.mode == "RGBA" else image
        converted = ImageCms.profileToProfile(base, source, _SRGB_PROFILE, outputMode="RGB")
        if alpha is not None:
            converted.putalpha(alpha)
        return converted
    except (ImageCms.PyCMSError, OSError, ValueError):
        return image  # an unreadable profile: treat the pixels as sRGB rather than lose the image


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    rgb, alpha = rgba[..., :3], rgba[..., 3:4]
    return rgb * alpha + (1.0 - alpha)


def _pixels01(image: Image.Image) -> np.ndarray:
    """Any Pillow mode -> float32 (H, W, 3) in [0, 1]."""
    mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        gray = np.asarray(image, dtype=np.float32) / 65535.0
        return np.repeat(np.clip(gray, 0, 1)[..., None], 3, axis=2)
    if mode == "F":
        gray = np.asarray(image, dtype=np.float32)
        return np.repeat(np.clip(np.nan_to_num(gray), 0, 1)[..., None], 3, axis=2)
    has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32) / 255.0
        if rgba[..., 3].min() >= 1.0:
            return np.ascontiguousarray(rgba[..., :3])
        return _composite_on_white(rgba)
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def load_image01(path: str | os.PathLike, min_side: int = 0) -> np.ndarray:
    """Decode one image file to float32 (H, W, 3) sRGB in [0, 1]. Raises :class:`ImageSkipped`."""
    path = os.fspath(path)
    try:
        if os.path.getsize(path) == 0:
            raise ImageSkipped("empty file")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if width * height > MAX_PIXELS:
                    raise ImageSkipped("too large", f"{width}x{height} pixels")
                if min(width, height) < min_side:
                    raise ImageSkipped("smaller than the crop", f"{width}x{height} < {min_side}")
                image.load()
                image = ImageOps.exif_transpose(image)
                image = _to_srgb(image)
                pixels = _pixels01(image)
    except ImageSkipped:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageSkipped("too large", str(exc)) from exc
    except UnidentifiedImageError as exc:
        raise ImageSkipped("not an image", str(exc)) from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # truncated / corrupt data
        raise ImageSkipped("truncated or corrupt", str(exc)) from exc
    if pixels.size == 0:
        raise ImageSkipped("empty image")
    return pixels


def image_files(folder: str | os.PathLike, recursive: bool = True) -> list[str]:
    """Image files under ``folder`` by suffix, sorted (case-insensitive suffixes, hidden files skipped)."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise NotADirectoryError(f"image folder {folder!r} does not exist or is not a folder")
    found = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if recursive else []
        found += [os.path.join(root, f) for f in files if f.lower().endswith(IMAGE_SUFFIXES) and not f.startswith(".")]
    return sorted(found)


@dataclass
class SkipReport:
    """Files that were skipped, grouped by reason."""

    by_reason: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, path: str) -> None:
        self.by_reason.setdefault(reason, []).append(path)

    @property
    def count(self) -> int:
        return sum(len(v) for v in self.by_reason.values())

    def summary(self) -> str:
        if not self.by_reason:
            return "no files skipped"
        parts = [f"{len(paths)} {reason}" for reason, paths in sorted(self.by_reason.items())]
        return f"skipped {self.count} file(s): " + ", ".join(parts)


class ImageFolder:
    """The usable images under a folder, decoded once and kept in a size-bounded cache.

    Every file is decoded during the scan, so the skip counts are final and a corrupt file is found
    before training starts rather than in the middle of it."""

    def __init__(
        self, folder: str | os.PathLike, min_side: int = 0, recursive: bool = True, cache_bytes: int = 1 << 30
    ):
        self.folder = os.fspath(folder)
        self.min_side = min_side
        self.skipped = SkipReport()
        self.paths: list[str] = []
        self.sizes: list[tuple[int, int]] = []
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cache_bytes = cache_bytes
        candidates = image_files(self.folder, recursive)
        for path in candidates:
            try:
                pixels = load_image01(path, min_side)
            except ImageSkipped as skip:
                self.skipped.add(skip.reason, path)
                continue
            self.paths.append(path)
            self.sizes.append(pixels.shape[:2])
            self._remember(len(self.paths) - 1, pixels)
        if not self.paths:
            why = self.skipped.summary() if candidates else f"no {'/'.join(s[1:] for s in IMAGE_SUFFIXES)} files found"
            raise NoUsableImages(
                f"no usable images in {self.folder!r} ({why})"
                + (
                    f"; every image must be at least {min_side} pixels on its short side"
                    if "smaller than the crop" in self.skipped.by_reason
                    else ""
                )
            )

    def __len__(self) -> int:
        return len(self.paths)

    def _remember(self, index: int, pixels: np.ndarray) -> None:
        self._cache[index] = pixels
        while len(self._cache) > 1 and sum(p.nbytes for p in self._cache.values()) > self._cache_bytes:
            self._cache.popitem(last=False)

    def image(self, index: int) -> np.ndarray:
        """float32 (H, W, 3) in [0, 1]."""
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        pixels = load_image01(self.paths[index], self.min_side)
        self._remember(index, pixels)
        return pixels


def _resize_region(pixels: np.ndarray, box: tuple[float, float, float, float], size: int) -> np.ndarray:
    """Lanczos-resample the region ``box`` (left, top, right, bottom) of an (H, W, 3) float image to
    size x size, per channel in float ('F' mode) so 16-bit sources keep their precision."""
    channels = [
        np.asarray(
            Image.fromarray(np.ascontiguousarray(pixels[..., c])).resize(
                (size, size), Image.Resampling.LANCZOS, box=box
            )
        )
        for c in range(pixels.shape[2])
    ]
    return np.clip(np.stack(channels, axis=-1), 0.0, 1.0)


def center_crop(pixels: np.ndarray, size: int) -> np.ndarray:
    """The evaluation view: Lanczos resize so the short side is ``size``, then the central size x size."""
    height, width = pixels.shape[:2]
    side = min(height, width)
    left, top = (width - side) / 2, (height - side) / 2
    return _resize_region(pixels, (left, top, left + side, top + side), size)


DEFAULT_DOWNSCALES = (1, 2, 4)


def random_crop(
    pixels: np.ndarray, size: int, rng: np.random.Generator, downscales=DEFAULT_DOWNSCALES, augment: bool = True
) -> np.ndarray:
    """A random square crop of ``size * level`` source pixels, Lanczos-downscaled to size x size.

    ``level`` is drawn uniformly from the ``downscales`` that fit in the image (1 is native-resolution
    detail, 4 shows four times more of the scene), so the decoder sees both the fine grain of the files
    and image-level structure; then a random rot90 and horizontal flip."""
    height, width = pixels.shape[:2]
    levels = [level for level in downscales if size * level <= min(height, width)]
    if not levels:
        raise ValueError(f"image {width}x{height} is smaller than the {size}px crop")
    side = size * levels[int(rng.integers(len(levels)))]
    left = int(rng.integers(width - side + 1))
    top = int(rng.integers(height - side + 1))
    if side == size:
        crop = pixels[top : top + size, left : left + size]
    else:
        crop = _resize_region(pixels, (left, top, left + side, top + side), size)
    if augment:
        crop = np.rot90(crop, k=int(rng.integers(4)))
        if rng.integers(2):
            crop = crop[:, ::-1]
    return np.ascontiguousarray(crop)


def to_tensor(pixels: np.ndarray | list[np.ndarray]) -> torch.Tensor:
    """(H, W, 3) array, or a list of them, -> float32 (B, 3, H, W) tensor."""
    batch = np.stack(pixels) if isinstance(pixels, list) else pixels[None]
    return torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).permute(0, 3, 1, 2).contiguous()


class CropSampler:
    """Deterministic random crops: ``batch(step, batch_size)`` depends only on (seed, step, images)."""

    def __init__(
        self,
        images: ImageFolder,
        size: int,
        seed: int,
        downscales=DEFAULT_DOWNSCALES,
        augment: bool = True,
        indices: list[int] | None = None,
    ):
        self.images = images
        self.size = size
        self.seed = seed
        self.downscales = tuple(downscales)
        self.augment = augment
        self.indices = list(range(len(images))) if indices is None else list(indices)
        if not self.indices:
            raise NoUsableImages("no images to crop from")

    def batch(self, step: int, batch_size: int) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, step])
        crops = []
        for _ in range(batch_size):
            index = self.indices[int(rng.integers(len(self.indices)))]
            crops.append(random_crop(self.images.image(index), self.size, rng, self.downscales, self.augment))
        return to_tensor(crops)


def split_or_all(count: int, held_out_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """:func:`split_held_out`, except that a fraction of 0 trains on everything and holds nothing out."""
    if held_out_fraction <= 0:
        return list(range(count)), []
    return split_held_out(count, held_out_fraction, seed)


def split_held_out(count: int, held_out_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic (train, held_out) index split; at least one of each when there are >= 2 images."""
    order = np.random.default_rng([seed, 0x5EED]).permutation(count).tolist()
    held = 0 if count < 2 else min(count - 1, max(1, round(count * held_out_fraction)))
    return sorted(order[held:]), sorted(order[:held])
