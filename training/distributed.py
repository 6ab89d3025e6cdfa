"""Several processes training one decoder on torch.distributed (launched by ``torchrun``), kept exactly in step by
explicit collectives instead of DistributedDataParallel: the GAN recipes need ``autograd.grad`` (adaptive weight) and
double backward (gradient penalty), which DDP's reducer does not reliably support (PyTorch #47562, #63812).

The trainer's batch size is the *global* batch: every step, each of the W ranks takes its 1/W slice of the same global
batch (``batch_size`` must divide by W), and after each backward the gradients are averaged over the ranks
(``all_reduce``), so every rank applies the same update that one process would apply to the whole global batch. The
same holds for the adaptive GAN weight (computed from the averaged last-layer gradients), the gradient penalty's
random mixes (drawn for the global batch, sliced), the critic's gradients, the "skip this step" decision (any rank's
non-finite loss skips it everywhere) and the logged numbers (averaged).

A single process is ``Collective()`` with world size 1: every method is then the identity, so the trainer has one code
path.

Teardown: a rank must destroy its process group before the interpreter exits. One that exits with gloo's threads
still running aborts in C++ static teardown ("terminate called without an active exception", SIGABRT — reproduced
in ~40 % of 2-rank runs that skip ``destroy_process_group``), and torchrun then reports the job failed after it ran.
:func:`from_environment` registers :func:`shutdown` with ``atexit`` for every path that skips the worker's own
teardown, and ``tools/run_job.py`` ends a rank with :func:`exit_rank`: teardown, flush, ``os._exit``. No barrier
precedes the teardown: every collective is matched on all ranks before a rank can finish, and a rank that failed
must not wait there for one still inside a collective (that rank's next or pending collective fails at once with
"Connection closed by peer" when the failed one exits, and torchrun stops the others when any rank fails).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Collective:
    rank: int = 0
    world: int = 1
    device: str = "cpu"  # where the small tensors of any() / mean_numbers() live (NCCL reduces CUDA tensors only)

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's slice of a global batch (dimension 0)."""
        if not self.active:
            return batch
        size = batch.shape[0] // self.world
        return batch[self.rank * size : (self.rank + 1) * size]

    def check_batch(self, batch_size: int) -> None:
        if batch_size % self.world:
            raise ValueError(
                f"batch_size {batch_size} is the global batch and must divide by the {self.world} processes: "
                f"use a multiple of {self.world}"
            )

    def mean_(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Averages ``tensors`` over the ranks in place (one flat all_reduce), returns them."""
        if not self.active or not tensors:
            return tensors
        import torch.distributed as dist

        dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
        flat = torch.cat([t.detach().reshape(-1).to(dtype) for t in tensors])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for t in tensors:
            n = t.numel()
            t.copy_(flat[offset : offset + n].view_as(t))
            offset += n
        return tensors

    def mean_gradients(self, parameters) -> None:
        """Averages the ``.grad`` of ``parameters`` over the ranks (a missing grad counts as zeros)."""
        if not self.active:
            return
        params = list(parameters)
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.mean_([p.grad for p in params])

    def any(self, flag: bool) -> bool:
        """True on every rank when it is True on any rank."""
        if not self.active:
            return flag
        import torch.distributed as dist

        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item() > 0)

    def mean_numbers(self, values: dict) -> dict:
        """The float entries of ``values`` averaged over the ranks (same keys on every rank)."""
        keys = sorted(k for k, v in values.items() if isinstance(v, float))
        if not self.active or not keys:
            return values
        averaged = self.mean_([torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.device)])[
            0
        ].cpu()
        return {**values, **{k: float(v) for k, v in zip(keys, averaged.tolist())}}

    def broadcast(self, value):
        """Rank 0's ``value`` (any picklable object) on every rank."""
        if not self.active:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value) -> list:
        """Every rank's ``value``, in rank order, on every rank."""
        if not self.active:
            return [value]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()


def from_environment(device: str | None) -> tuple[Collective, torch.device]:
    """The collective and this rank's device. Under ``torchrun`` (WORLD_SIZE > 1): the process group is made here —
    NCCL with one GPU per local rank when CUDA is present and ``device`` is not 'cpu', else gloo on the CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Collective(), torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and (device or "cuda").startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
        atexit.register(shutdown)  # whatever way this rank leaves, the group is gone before interpreter teardown
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    return Collective(rank, world, str(device)), device


def shutdown() -> None:
    """Destroys this process' default process group if it is still up. Idempotent and never raises (it runs in
    ``finally`` blocks and at exit, where an error would hide the one that got there)."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception as exc:  # noqa: BLE001
        print(f"process group teardown: {type(exc).__name__}: {exc}", file=sys.stderr)


def exit_rank(main) -> None:
    """Runs ``main()`` (returning an exit code) as a torchrun rank and ends the process: the exit code (1 with the
    traceback for an exception, as Python would), after :func:`shutdown` and a flush of stdout and stderr, through
    ``os._exit`` — so no C++ static destructor can run with a communication thread left (gloo aborts then, see the
    module docstring) and a rank never lingers in interpreter teardown while the launcher waits for it."""
    code = 1
    try:
        code = main()
    except SystemExit as exc:  # sys.exit(): its code, as the interpreter would use it
        code = exc.code
        if code is not None and not isinstance(code, int):
            print(code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001  (KeyboardInterrupt included: the rank still ends cleanly)
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        shutdown()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):  # a closed stream: nothing left to flush
                stream.flush()
    os._exit(0 if code is None else code)


def rng_state() -> dict:
    """This process' torch RNG states (CPU, and CUDA when present), for the checkpoint."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
