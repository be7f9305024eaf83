"""Data parallel: DistributedDataParallel with bucketing; bytes on the wire counted per step."""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from paratrain.parallel.strategy import Strategy, make_optimizer


def keep_local(state, bucket):  # no annotations: DDP compares them to dist.GradBucket at run time
    """A DDP comm hook that sends nothing: each rank keeps its local gradient (1-bit Adam)."""
    fut: torch.futures.Future = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


def ring_allreduce_bytes(nbytes: int, world: int) -> int:
    """Bytes one rank sends in a ring all-reduce of ``nbytes`` (reduce-scatter + all-gather)."""
    return 2 * (world - 1) * nbytes // world


class DDPStrategy(Strategy):
    """Every rank holds the whole model; gradients are averaged with bucketed all-reduce."""

    name = "ddp"

    def wrap(self, model: nn.Module) -> nn.Module:
        d = self.dims
        model = model.to(d.device)
        ddp = DDP(
            model,
            device_ids=[d.device.index] if d.device.type == "cuda" else None,
            bucket_cap_mb=self.cfg.parallel.bucket_cap_mb,
            gradient_as_bucket_view=True,
            process_group=d.dp_group,
        )
        self.register_hook(ddp)
        return ddp

    def register_hook(self, ddp: DDP) -> None:
        """With ``[compression] gradient`` set, the compression hooks (built on the codecs)
        replace DDP's averaging all-reduce and count the bytes they send.  Otherwise DDP keeps
        its built-in C++ all-reduce (a Python hook costs time on every bucket) and
        :meth:`step` counts the ring all-reduce's bytes of every gradient, except under the
        hang watchdog (``train.hang_timeout_s`` > 0), which only sees collectives called from
        Python: then a hook makes the same all-reduce through ``dist.all_reduce``."""
        if self.onebit:
            ddp.register_comm_hook(None, keep_local)
            return
        if self.cfg.compression.gradient != "none":
            from paratrain.grad_compression.hooks import register_compression_hook

            self.compression = register_compression_hook(ddp, self)
            return
        world = self.dims.dp
        if self.cfg.train.hang_timeout_s <= 0:
            grads = sum(p.numel() * p.element_size() for p in ddp.module.parameters() if p.requires_grad)
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

        ddp.register_comm_hook(None, allreduce_counting)

    @property
    def onebit(self) -> bool:
        """1-bit Adam exchanges compressed momentum itself; DDP leaves the gradients local."""
        return self.cfg.train.optimizer == "onebit_adam"

    @property
    def sharded_optimizer(self) -> bool:  # 1-bit Adam's momentum and residuals differ per rank
        return self.onebit

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return make_optimizer(model, self.cfg, group=self.dims.dp_group)

    def step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> float:
        # without a hook, one synchronised backward per optimizer step (0 bytes when a hook counts);
        # 1-bit Adam clips the local gradient and communicates inside optimizer.step()
        self.comm_bytes += self._ring_bytes
        norm = super().step(model, optimizer)
        if self.onebit:
            self.comm_bytes += optimizer.take_comm_bytes()
        return norm

    def no_sync(self, model: nn.Module) -> contextlib.AbstractContextManager:
        return model.no_sync() if isinstance(model, DDP) else contextlib.nullcontext()

    compression = None  # CompressionHookState when gradients are compressed
    _ring_bytes = 0  # bytes one rank sends per gradient all-reduce DDP makes without a hook

    def observe_loss(self, loss_sum: torch.Tensor, n_global: float) -> None:
        if self.compression is not None:
            self.compression.observe_loss(loss_sum, n_global)

    def step_metrics(self) -> dict:
        return self.compression.step_metrics() if self.compression is not None else {}

    def extra_summary(self) -> dict:
        return {**super().extra_summary(), **(self.compression.summary() if self.compression is not None else {})}
