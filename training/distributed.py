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
"""
from __future__ import annotations

import os
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
        return batch[self.rank * size:(self.rank + 1) * size]

    def check_batch(self, batch_size: int) -> None:
        if batch_size % self.world:
            raise ValueError(f"batch_size {batch_size} is the global batch and must divide by the {self.world} processes: "
                             f"use a multiple of {self.world}")

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
            t.copy_(flat[offset:offset + n].view_as(t))
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
        averaged = self.mean_([torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.device)])[0].cpu()
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
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    return Collective(rank, world, str(device)), device


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
