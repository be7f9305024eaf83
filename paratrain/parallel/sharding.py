"""ZeRO on the data-parallel axis: optimizer state (1), + gradients (2), + parameters (3).

- ``zero = 1``: DDP all-reduces full gradients; :class:`ZeroRedundancyOptimizer` gives each
  rank the Adam moments of 1/N of the parameters, steps them and broadcasts the results.
- ``zero = 2``: FSDP2 ``fully_shard`` per block with ``reshard_after_forward=False``:
  gradients are reduce-scattered and the optimizer state is sharded; gathered parameters
  are kept from the forward to the backward (no second all-gather).
- ``zero = 3``: FSDP2 full shard (``reshard_after_forward=True``): parameters are gathered
  per block for the forward and again for the backward, and freed in between.

``parallel.cpu_offload`` keeps FSDP2's sharded parameters, gradients and optimizer state in
host memory (``CPUOffloadPolicy(pin_memory=False)``; pinning needs an accelerator).

Memory on CPU: with glibc's default allocator, buffers FSDP frees per block stay in the
heap and peak RSS hardly drops; the launcher gives ZeRO workers
``MALLOC_MMAP_THRESHOLD_=131072`` so large buffers are mmapped and really returned.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, OffloadPolicy, fully_shard
from torch.distributed.optim import ZeroRedundancyOptimizer

from paratrain.config import Config
from paratrain.parallel.data_parallel import DDPSync
from paratrain.parallel.sync import unwrap

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def optimizer_kwargs(cfg: Config) -> tuple[type[torch.optim.Optimizer], dict]:
    """The optimizer class and constructor arguments :func:`make_optimizer` uses."""
    t = cfg.train
    if t.optimizer == "sgd":
        return torch.optim.SGD, {"lr": t.lr, "momentum": t.momentum}
    return torch.optim.AdamW, {"lr": t.lr, "betas": (0.9, 0.95), "eps": 1e-8, "foreach": False}


def param_groups(model: nn.Module, cfg: Config) -> list[dict]:
    """Weight decay on matrices only (as make_optimizer does)."""
    params = [p for p in model.parameters() if p.requires_grad]
    wd = cfg.train.weight_decay
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": wd},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


class Zero1Sync(DDPSync):
    """ZeRO stage 1: DDP gradients, optimizer state sharded with ZeroRedundancyOptimizer."""

    name = "zero1"
    uses_dcp = True

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        cls, kw = optimizer_kwargs(self.cfg)
        return ZeroRedundancyOptimizer(param_groups(unwrap(model), self.cfg), optimizer_class=cls,
                                       process_group=self.dims.dp_group, **kw)


def apply_fsdp(model: nn.Module, blocks: list[nn.Module], dp_mesh, zero: int, cpu_offload: bool) -> nn.Module:
    """FSDP2 over ``dp_mesh``: one unit per block, then the root (embeddings, norm, head).

    ``zero`` 3 reshards parameters after the forward; 2 (and 0, the plain data-parallel axis
    of a dp x tp layout) keeps them gathered until the backward.
    """
    kw = {
        "mesh": dp_mesh,
        "reshard_after_forward": zero == 3,
        "offload_policy": CPUOffloadPolicy(pin_memory=False) if cpu_offload else OffloadPolicy(),
    }
    for block in blocks:
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    return model


@contextlib.contextmanager
def fsdp_no_sync(model: nn.Module):
    """Accumulate gradients locally (no reduce-scatter) for the duration of the context."""
    if not isinstance(model, FSDPModule):
        yield
        return
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)
