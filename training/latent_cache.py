"""A fixed pool of augmented training crops and their latents, each encoded once.

The encoder is frozen, so a crop's latent never changes: computing it once and reusing it saves the
encoder's share of every step. The pool is finite (``crops_per_image`` augmented crops of every training
image, each a function of (seed, index) only); batches draw from it by (seed, step). Crops are encoded
in fixed chunks of the pool, so a latent is bit-identical however the run is split into pieces.

Memory is bounded: past ``max_bytes`` the oldest chunks are written to a private folder on disk and read
back when needed; ``close()`` (or leaving a ``with`` block) removes that folder.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Callable

import numpy as np
import torch

from .data import DEFAULT_DOWNSCALES, random_crop, to_tensor

CHUNK = 8


class LatentCache:
    def __init__(
        self,
        images: list[np.ndarray],
        crop_size: int,
        crops_per_image: int,
        seed: int,
        encode: Callable[[torch.Tensor], torch.Tensor],
        max_bytes: int = 1 << 30,
        spill_dir: str | None = None,
        downscales=DEFAULT_DOWNSCALES,
    ):
        """``images``: float32 (H, W, 3) arrays in [0, 1]; ``encode``: images01 (B,3,H,W) -> latents."""
        if not images:
            raise ValueError("no training images")
        self.images = images
        self.crop_size = crop_size
        self.size = len(images) * crops_per_image
        self.seed = seed
        self.encode = encode
        self.max_bytes = max_bytes
        self.downscales = tuple(downscales)
        self._spill_parent = spill_dir
        self._spill: str | None = None
        self._memory: OrderedDict[int, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._on_disk: set[int] = set()
        self.encoded_crops = 0  # how many crops went through the encoder (for tests and logs)
        self.reference: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.reference_energy: dict[int, float] = {}  # per crop: high-frequency energy of a reference decode

    def __len__(self) -> int:
        return self.size

    def __enter__(self) -> LatentCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def crop(self, index: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, 0xC209, index])
        return random_crop(self.images[index % len(self.images)], self.crop_size, rng, self.downscales)

    @property
    def fingerprint(self) -> str:
        """Identifies the pool: the same images, crop size, pool size and seed give the same crops."""
        import hashlib

        digest = hashlib.sha256(repr((self.seed, self.crop_size, self.size, self.downscales)).encode())
        for image in self.images:
            digest.update(repr(image.shape).encode())
            digest.update(np.ascontiguousarray(image[::7, ::7]).tobytes())
        return digest.hexdigest()[:16]

    def set_reference(
        self, decode: Callable[[torch.Tensor], torch.Tensor], known: dict[int, float] | None = None
    ) -> None:
        """Record, for every crop, the high-frequency energy of ``decode(latents)`` (e.g. the decoder before
        training); ``known`` values (from an earlier run on the same pool) are used as they are. Fills the
        whole pool now, so every crop's reference comes from the same decoder."""
        from .metrics import high_frequency_energy

        self.reference_energy = {int(k): float(v) for k, v in (known or {}).items()}
        self.reference = decode
        for chunk in range((self.size + CHUNK - 1) // CHUNK):
            first = chunk * CHUNK
            missing = [i for i in range(first, min(first + CHUNK, self.size)) if i not in self.reference_energy]
            if missing:
                latents, _ = self._chunk(chunk)
                with torch.no_grad():
                    energies = high_frequency_energy(decode(latents).float().clamp(0, 1).cpu())
                for i in missing:
                    self.reference_energy[i] = float(energies[i - first])
        self.reference = None

    def reference_energies(self, step: int, batch_size: int) -> torch.Tensor:
        return torch.tensor([self.reference_energy[i] for i in self.indices(step, batch_size)])

    def indices(self, step: int, batch_size: int) -> list[int]:
        rng = np.random.default_rng([self.seed, 0xBA7C, step])
        return rng.integers(self.size, size=batch_size).tolist()

    def batch(self, step: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents, target images01) for a training step: a function of (seed, step) only."""
        latents, targets = zip(*(self.item(i) for i in self.indices(step, batch_size)))
        return torch.stack(latents), torch.stack(targets)

    def item(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = index // CHUNK
        latents, targets = self._chunk(chunk)
        return latents[index % CHUNK], targets[index % CHUNK]

    @property
    def bytes_in_memory(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self._memory.values())

    def _chunk(self, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
        if chunk in self._memory:
            self._memory.move_to_end(chunk)
            return self._memory[chunk]
        if chunk in self._on_disk:
            pair = torch.load(self._path(chunk), weights_only=True)
        else:
            first = chunk * CHUNK
            targets = to_tensor([self.crop(i) for i in range(first, min(first + CHUNK, self.size))])
            with torch.no_grad():
                latents = self.encode(targets).detach().float().cpu()
            self.encoded_crops += targets.shape[0]
            pair = (latents, targets)
        self._memory[chunk] = pair
        self._evict()
        return pair

    def _evict(self) -> None:
        while len(self._memory) > 1 and self.bytes_in_memory > self.max_bytes:
            chunk, pair = self._memory.popitem(last=False)
            if chunk not in self._on_disk:
                if self._spill is None:
                    self._spill = tempfile.mkdtemp(prefix="vae_lab_latents_", dir=self._spill_parent)
                torch.save(pair, self._path(chunk))
                self._on_disk.add(chunk)

    def _path(self, chunk: int) -> str:
        return os.path.join(self._spill, f"chunk_{chunk:06d}.pt")

    def close(self) -> None:
        self._memory.clear()
        self._on_disk.clear()
        if self._spill is not None:
            shutil.rmtree(self._spill, ignore_errors=True)
            self._spill = None
