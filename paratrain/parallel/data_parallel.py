"""Data parallel: DistributedDataParallel and its three gradient syncs; bytes on the wire counted per step."""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from paratrain.grad_compression.hooks import register_compression_hook, ring_allreduce_bytes
from paratrain.parallel.dims import ParallelDims
from paratrain.parallel.optim import make_optimizer
from paratrain.parallel.sync import GradSync


def keep_local(state, bucket):  # no annotations: DDP compares them to dist.GradBucket at run time
    """A DDP comm hook that sends nothing: each rank keeps its local gradient (1-bit Adam)."""
    fut: torch.futures.Future = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


def wrap_ddp(model: nn.Module, dims: ParallelDims, bucket_cap_mb: float) -> DDP:
    """DistributedDataParallel over the data-parallel group (gradients as bucket views)."""
    return DDP(model, device_ids=[dims.device.index] if dims.device.type == "cuda" else None,
               bucket_cap_mb=bucket_cap_mb, gradient_as_bucket_view=True, process_group=dims.dp_group)


class DDPSync(GradSync):
    """DDP's bucketed all-reduce of the gradients during backward.

    DDP keeps its built-in C++ all-reduce (a Python hook costs time on every bucket) and
    :meth:`step` counts the ring all-reduce's bytes of every gradient -- except under the hang
    watchdog (``train.hang_timeout_s`` > 0), which only sees collectives called from Python:
    then a hook makes the same all-reduce through ``dist.all_reduce``."""

    name = "ddp"
    _ring_bytes = 0  # bytes one rank sends per gradient all-reduce DDP makes without a hook

    def attach(self, model: nn.Module) -> None:
        world = self.dims.dp
        if self.cfg.train.hang_timeout_s <= 0:
            grads = sum(p.numel() * p.element_size() for p in model.module.parameters() if p.requires_grad)
            self._ring_bytes = ring_allreduce_bytes(grads, world)
            return

        # no annotations on purpose: DDP compares them to dist.GradBucket at run time, and this
        # module's postponed (string) annotations would not compare equal
        def allreduce_counting(state, bucket):
            buf = bucket.buffer()
            self.comm_bytes += ring_allreduce_bytes(buf.numel() * buf.element_size(), world)
            buf.div_(world)
            fut = dist.all_reduce(buf, group=self.dims.dp_group, async_op=True).get_future()
            return fut.then(lambda f: f.value()[0])

        model.register_comm_hook(None, allreduce_counting)

    def step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> float:
        # one synchronised backward per optimizer step (0 bytes counted here when a hook counts)
        self.comm_bytes += self._ring_bytes
        return super().step(model, optimizer)

    def no_sync(self, model: nn.Module) -> contextlib.AbstractContextManager:
        return model.no_sync() if isinstance(model, DDP) else contextlib.nullcontext()


class CompressedDDPSync(DDPSync):
    """``[compression] gradient`` set: a compression hook (built on the codecs) replaces DDP's
    averaging all-reduce, counts the bytes it sends and falls back when the loss rises."""

    def attach(self, model: nn.Module) -> None:

        self.compression = register_compression_hook(model, self)

    def observe_loss(self, loss_sum: torch.Tensor, n_global: float) -> None:
        self.compression.observe_loss(loss_sum, n_global)

    def step_metrics(self) -> dict:
        return self.compression.step_metrics()

    def extra_summary(self) -> dict:
        return {**super().extra_summary(), **self.compression.summary()}


class OneBitAdamSync(DDPSync):
    """``train.optimizer = "onebit_adam"``: DDP leaves gradients local; the optimizer exchanges
    its sign-compressed momentum itself (and clips each rank's own gradient)."""

    sharded_optimizer = True  # momentum and error residuals differ per rank

    def attach(self, model: nn.Module) -> None:
        model.register_comm_hook(None, keep_local)

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return make_optimizer(model, self.cfg, group=self.dims.dp_group)

    def step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> float:
        norm = super().step(model, optimizer)
        self.comm_bytes += optimizer.take_comm_bytes()
        return norm
