"""One finetuning run, the same for every caller: the Decoder Finetune Steps node, the background worker, the demo and
the efficacy bench.

    with TrainingRun(model, recipe, config, train_images, encode, held_out_images=..., held_out_names=...) as run:
        run.run(steps=200, on_step=..., on_eval=...)
        report = run.report()

``TrainingRun`` sets a run up (the frozen encoder's latents of the held-out images, the pool of training crops
``LatentCache`` encodes on demand, the ``DecoderFinetune`` trainer with its base evaluation), steps it, evaluates the
held-out images every ``config.eval_every`` steps and at the end, stops when asked, and reports base -> now. What each
caller does with a step (a progress bar, a status file and checkpoints, console lines, a table) is a callback; the
step itself is ``DecoderFinetune.train_step``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .distributed import Collective
from .finetune import DecoderFinetune, FinetuneConfig, HeldOut
from .latent_cache import LatentCache
from .recipes import Recipe

Encode = Callable[[torch.Tensor], torch.Tensor]


def encode_held_out(images: Sequence[np.ndarray], names: Sequence[str], encode: Encode, size: int) -> HeldOut | None:
    """Held-out images as Lanczos short side ``size`` centre crops, and their latents (one image at a time)."""
    from .data import center_crop, to_tensor

    if not images:
        return None
    crops = to_tensor([center_crop(image, size) for image in images])
    with torch.no_grad():
        latents = torch.cat([encode(crops[i : i + 1]).float().cpu() for i in range(crops.shape[0])])
    return HeldOut(crops, latents, list(names))


@dataclass
class Report:
    """What a run did: steps, time, why it ended, and the held-out numbers before training and now."""

    steps: int
    steps_this_call: int
    seconds: float
    ended: str  # "done", "time", or what should_stop returned ("stop", "pause", ...)
    base: dict | None
    final: dict | None
    skipped_steps: int

    def change(self) -> dict[str, float]:
        """final - base for every shared metric (empty without held-out images)."""
        if not self.base or not self.final:
            return {}
        return {
            k: self.final[k] - self.base[k]
            for k in self.base
            if isinstance(self.base.get(k), float) and isinstance(self.final.get(k), float)
        }


class TrainingRun:
    """A finetuning run over a pool of training crops; a context manager (leaving it frees the crop pool's spill
    folder). ``model`` is trained in place; ``state`` (a ``DecoderFinetune.state_dict()``) continues a run."""

    def __init__(
        self,
        model: nn.Module,
        recipe: Recipe,
        config: FinetuneConfig,
        train_images: Sequence[np.ndarray],
        encode: Encode,
        *,
        held_out_images: Sequence[np.ndarray] = (),
        held_out_names: Sequence[str] = (),
        held_out_size: int | None = None,
        encode_held_out_with: Encode | None = None,
        lpips: nn.Module | None = None,
        state: dict | None = None,
        device: str | torch.device = "cpu",
        collective: Collective | None = None,
    ):
        self.config, self.device, self.collective, self.lpips = config, device, collective, lpips
        self.held_out = encode_held_out(
            held_out_images, held_out_names, encode_held_out_with or encode, held_out_size or config.eval_size
        )
        self.cache = LatentCache(
            list(train_images),
            config.crop_size,
            config.crops_per_image,
            config.seed,
            encode,
            max_bytes=config.cache_bytes,
        )
        try:
            self.trainer = self._trainer(model, recipe, state)
        except BaseException:
            self.cache.close()
            raise

    def _trainer(self, model: nn.Module, recipe: Recipe, state: dict | None) -> DecoderFinetune:
        return DecoderFinetune(
            model,
            recipe,
            self.config,
            self.cache,
            self.held_out,
            self.lpips if recipe.uses_lpips else None,
            state,
            self.device,
            self.collective,
        )

    def restart(self, model: nn.Module, recipe: Recipe, state: dict | None) -> DecoderFinetune:
        """A new trainer on the same crops and held-out images (e.g. rolled back to a checkpoint at a lower lr)."""
        self.trainer = self._trainer(model, recipe, state)
        return self.trainer

    def __enter__(self) -> TrainingRun:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.cache.close()

    @property
    def step(self) -> int:
        return self.trainer.step

    def run(
        self,
        steps: int | None = None,
        seconds: float | None = None,
        *,
        should_stop: Callable[[], str | None] | None = None,
        on_step: Callable[[dict], None] | None = None,
        on_eval: Callable[[dict], None] | None = None,
        around_step: Callable[[Callable[[], dict]], dict] | None = None,
    ) -> Report:
        """Train until ``steps`` more steps are done, ``seconds`` have passed, or ``should_stop()`` returns a reason.
        Held-out evaluation (EMA weights) every ``config.eval_every`` steps and once at the end, each handed to
        ``on_eval``; ``on_step(logs)`` follows each step and its evaluation. ``around_step(step_fn)`` wraps each step
        (fault injection, hooks) and returns the step's logs."""
        # eval mode throughout: the decoders have no mode-dependent layers, and the one model that has them (stage
        # A's encoder BatchNorm) is frozen — in train mode the cache's lazy encodes would use batch statistics
        # and overwrite its running ones
        self.trainer.model.eval()
        first = self.trainer.step
        end = first + steps if steps is not None else None
        start = time.perf_counter()
        ended = "done"
        while True:
            if end is not None and self.trainer.step >= end:
                break
            if seconds is not None and time.perf_counter() - start >= seconds:
                ended = "time"
                break
            reason = should_stop() if should_stop is not None else None
            if reason:
                ended = reason
                break
            trainer = self.trainer
            logs = around_step(trainer.train_step) if around_step is not None else trainer.train_step()
            every = self.config.eval_every
            if (
                trainer.held_out is not None
                and every
                and trainer.step % every == 0
                and (end is None or trainer.step < end)
            ):
                result = trainer.evaluate()
                if on_eval is not None:
                    on_eval(result)
            if on_step is not None:  # after the evaluation: a checkpoint written here holds it
                on_step(logs)  # may restart the trainer (self.trainer) from a checkpoint
        trainer = self.trainer
        if ended not in ("done", "time"):  # stopped on request: the caller checkpoints; evaluating would only delay it
            return self._report(first, start, ended)
        if trainer.held_out is not None and (
            not trainer.evaluations or trainer.evaluations[-1]["step"] != trainer.step
        ):
            result = trainer.evaluate()
            if on_eval is not None:
                on_eval(result)
        return self._report(first, start, ended)

    def _report(self, first: int, start: float, ended: str) -> Report:
        trainer = self.trainer
        return Report(
            steps=trainer.step,
            steps_this_call=trainer.step - first,
            seconds=time.perf_counter() - start,
            ended=ended,
            base=trainer.base_evaluation,
            final=trainer.evaluations[-1] if trainer.evaluations else None,
            skipped_steps=trainer.skipped_steps,
        )
