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
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.optim import ZeroRedundancyOptimizer

from paratrain.parallel.data_parallel import DDPSync
from paratrain.parallel.optim import optimizer_kwargs, param_groups
from paratrain.parallel.sync import unwrap

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


class Zero1Sync(DDPSync):
    """ZeRO stage 1: DDP gradients, optimizer state sharded with ZeroRedundancyOptimizer."""

    name = "zero1"
    uses_dcp = True

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        cls, kw = optimizer_kwargs(self.cfg, list(unwrap(model).parameters()))
        return ZeroRedundancyOptimizer(param_groups(unwrap(model), self.cfg), optimizer_class=cls,
                                       process_group=self.dims.dp_group, **kw)


def mixed_precision_policy(precision: str) -> MixedPrecisionPolicy:
    """FSDP2's policy for ``train.precision``: with ``bf16`` the gathered parameters (and so the
    block's compute) are bf16 while gradients are reduced and kept in fp32, over fp32 master
    weights; otherwise FSDP2 leaves dtypes alone (fp16 runs under autocast with loss scaling)."""
    if precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def apply_fsdp(model: nn.Module, blocks: list[nn.Module], dp_mesh, zero: int, cpu_offload: bool,
               precision: str = "fp32") -> nn.Module:
    """FSDP2 over ``dp_mesh``: one unit per block, then the root (embeddings, norm, head).

    ``zero`` 3 reshards parameters after the forward; 2 (and 0, the plain data-parallel axis
    of a dp x tp layout) keeps them gathered until the backward.  ``precision``: see
    :func:`mixed_precision_policy`.
    """
    kw = {
        "mesh": dp_mesh,
        "reshard_after_forward": zero == 3,
        "offload_policy": CPUOffloadPolicy(pin_memory=False) if cpu_offload else OffloadPolicy(),
        "mp_policy": mixed_precision_policy(precision),
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
