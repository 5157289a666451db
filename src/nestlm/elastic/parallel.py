"""Data-parallel elastic training under torchrun, with PyTorch's own DDP and FSDP2 (nothing home-made).

    torchrun --nproc_per_node 2 recipes/elastify.py --parallel ddp --tiny --out /tmp/elastic2
    nestlm.elastify(ecfg, parent, tokens, out, parallel="fsdp2")      # inside each torchrun worker

What N processes change, and what they don't:
- every rank builds the same student, teacher and router from the same seeds, so every rank draws the same
  budget and the same Gumbel noise each step. `DataParallel.check_same` verifies it: once the parent's
  fingerprint, then every step the step, data position, budget index and a checksum of the RNG state are
  all-gathered, and every rank stops with a RuntimeError if any differs (instead of hanging or drifting);
- each step's global batch (`ecfg.batch` rows) is split by rows: rank r takes rows [r*b/N, (r+1)*b/N). The
  KD loss is a mean over tokens, so the mean over ranks of the rank losses (and of their gradients) is the
  one-process loss (gradient), up to float summation order;
- the student is wrapped in DDP (replicated weights, averaged gradients) or FSDP2 (`fully_shard` on every
  block and on the root: parameters, gradients and optimizer state sharded; the teacher, in the compute
  dtype, is sharded too; bf16: all-gathers in bf16, gradients reduced in fp32 into the fp32 shards).
  A sliced forward (`w[:k]`) works on both: FSDP2 all-gathers a module's full parameters before its forward,
  and the slice's gradient is a full-size gradient with zeros outside the prefix. Every rank runs the same
  SubArch, so DDP's buckets see the same parameters each step (find_unused_parameters is not needed);
- the router is tiny and replicated: `average_grads_` all-reduces its gradients in one flat tensor. (It has
  no forward(): a step uses sample, probs and expected_loss, and DDP only syncs what goes through forward.);
- checkpoints are torch.distributed.checkpoint (DCP) folders (nestlm.elastic.checkpoint), each rank
  writing its own shards; DCP reshards on load, so a run may resume on another number of processes;
- only rank 0 writes the log, the progress bar and the exported checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import zlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from nestlm.errors import ConfigError

MODES = ("ddp", "fsdp2")
# ---------------------------------------------------------------------------------------------- process group
@dataclass
class DataParallel:
    """This process's place in the job. mode None: a single process (every method is then a no-op)."""

    mode: str | None = None  # None | "ddp" | "fsdp2"
    rank: int = 0
    world: int = 1
    device: torch.device | None = None  # where this rank computes (None: wherever the model is)
    owns_group: bool = False  # we created the process group, so we destroy it

    @property
    def distributed(self) -> bool:
        return self.mode is not None

    @property
    def main(self) -> bool:
        return self.rank == 0

    def rows(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global batch [b, t] -> [b / world, t]."""
        n = batch.shape[0] // self.world
        return batch[self.rank * n:(self.rank + 1) * n]

    def mean(self, x: float) -> float:
        """The mean of a number over ranks."""
        if not self.distributed:
            return x
        t = torch.tensor([x], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t) / self.world

    def all_true(self, flag: bool) -> bool:
        if not self.distributed:
            return flag
        t = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t)

    def check_same(self, what: str, values: list[int]) -> None:
        """Raise on every rank if `values` differ between ranks (a desynchronised job would hang or train wrong)."""
        if not self.distributed:
            return
        mine = torch.tensor(values, dtype=torch.long, device=self.device)
        every = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(every, mine)
        if any(not torch.equal(e, every[0]) for e in every):
            rows = "; ".join(f"rank {r}: {e.tolist()}" for r, e in enumerate(every))
            raise RuntimeError(f"{what} differ across ranks ({rows}); every rank must run the same seeds, "
                               "config, model and data")

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def setup(parallel: str | None = None) -> DataParallel:
    """The DataParallel of this process. parallel: None (auto: DDP when torch.distributed is initialised or
    torchrun set WORLD_SIZE > 1, else one process), "ddp" or "fsdp2". Initialises the process group from
    torchrun's environment (nccl on CUDA, else gloo) when nobody has yet."""
    if parallel not in (None, *MODES):
        raise ConfigError(f"parallel must be one of {MODES} (or None: automatic), got {parallel!r}")
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if parallel is None:
        if not (dist.is_available() and (dist.is_initialized() or launched)):
            return DataParallel()
        parallel = "ddp"
    owns = False
    if not dist.is_initialized():
        if not all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
            raise ConfigError(f"parallel={parallel!r} needs a torchrun launch (RANK, WORLD_SIZE, MASTER_ADDR and "
                              "MASTER_PORT in the environment) or an initialised torch.distributed process group")
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        owns = True
    device = torch.device("cpu")
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
        torch.cuda.set_device(device)
    return DataParallel(parallel, dist.get_rank(), dist.get_world_size(), device, owns)


def rng_checksum() -> int:
    """A checksum of torch's CPU RNG state (equal on every rank when they draw the same numbers)."""
    return zlib.crc32(torch.get_rng_state().numpy().tobytes())


# ---------------------------------------------------------------------------------------------- wrapping
def wrap(model: nn.Module, teacher: nn.Module, dp: DataParallel,
         dtype: torch.dtype = torch.float32) -> tuple[nn.Module, nn.Module]:
    """(student to call, teacher to call). DDP: the student in DistributedDataParallel, the teacher as is.
    FSDP2: both sharded in place (every block, then the root), so `model` itself becomes the FSDP module;
    build the optimizer after this call, on `model.parameters()` (DTensor shards). dtype bf16 (FSDP2): the
    student's fp32 shards are all-gathered in bf16 and its gradients reduce-scattered in fp32
    (MixedPrecisionPolicy); the teacher is sharded in the dtype it holds. Activation checkpointing
    (Decoder.checkpoint_blocks) recomputes a sharded block in the backward, FSDP2 all-gathering it again."""
    if dp.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [dp.device.index] if dp.device is not None and dp.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids), teacher
    if dp.mode == "fsdp2":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for m, kw in ((model, {"mp_policy": mp}), (teacher, {})):
            for block in m.layers:
                fully_shard(block, **kw)
            fully_shard(m, **kw)
    return model, teacher


@contextlib.contextmanager
def grad_sync(student: nn.Module, dp: DataParallel, sync: bool):
    """Around a micro-batch's forward and backward: reduce gradients across ranks only when `sync` (the last
    micro-batch of gradient accumulation); the others accumulate locally."""
    if dp.mode == "ddp" and not sync:
        with student.no_sync():
            yield
    elif dp.mode == "fsdp2":
        student.set_requires_gradient_sync(sync)
        try:
            yield
        finally:
            student.set_requires_gradient_sync(True)
    else:
        yield


def average_grads_(params, dp: DataParallel) -> None:
    """Average the gradients of replicated parameters over ranks, in one flat all_reduce. Every rank runs the
    same graph, so the same parameters have gradients everywhere."""
    if not dp.distributed:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])  # [sum of numel]
    dist.all_reduce(flat)
    flat /= dp.world
    for g, v in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
        g.copy_(v.view_as(g))


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (FSDP2), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def all_finite(tensors, dp: DataParallel) -> bool:
    """Whether every tensor is finite on every rank (FSDP2: every shard). One norm, one sync."""
    tensors = [local(t.detach()) for t in tensors]
    ok = not tensors or bool(torch.isfinite(torch.nn.utils.get_total_norm(tensors, norm_type=float("inf"))))
    return dp.all_true(ok)


@contextlib.contextmanager
def full_weights(model: nn.Module, dp: DataParallel):
    """FSDP2: every rank holds the full (unsharded) parameters inside the block, e.g. to export the model.
    A collective: every rank must enter. DDP and one process: nothing to do."""
    if dp.mode != "fsdp2":
        yield model
        return
    from torch.distributed.fsdp import FSDPModule

    mods = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in mods:
        m.unshard()
    try:
        yield model
    finally:
        for m in mods:
            m.reshard()
