"""Gradient synchronisation: how a rank's local gradients become an update.

The trainer is written once against :class:`GradSync`.  :func:`~paratrain.parallel.parallelize`
applies the layout to the model and picks the sync that goes with it; the trainer then asks
the sync to run forward + backward (skipping gradient sync on accumulation micro-steps), to
turn gradients into an optimizer step, and to reduce the few numbers it reports.  The syncs:

* :class:`GradSync` -- one process (this class);
* ``DDPSync``, ``CompressedDDPSync``, ``OneBitAdamSync`` (:mod:`.data_parallel`) -- DDP's
  all-reduce, a compressed all-reduce hook, or gradients kept local for 1-bit Adam;
* ``Zero1Sync`` (:mod:`.sharding`) -- DDP + a sharded optimizer;
* ``ModelParallelSync`` (:mod:`.model_parallel`) -- FSDP2, tensor and pipeline parallel;
* ``PSSync`` (:mod:`paratrain.ps.strategy`) -- push / pull to parameter servers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from paratrain.config import Config
from paratrain.parallel.dims import ParallelDims
from paratrain.parallel.memory_policy import LossScaler
from paratrain.parallel.optim import make_optimizer


class GradSync:
    """Single-process training; the base class of every gradient sync."""

    name = "single"
    sharded_optimizer = False  # True: each rank checkpoints its own optimizer state
    uses_dcp = False  # True: model + optimizer are checkpointed with DCP (any layout can resume them)
    loss_scaler: LossScaler | None = None  # set in __init__ when train.precision = "fp16"

    def __init__(self, cfg: Config, dims: ParallelDims):
        self.cfg = cfg
        self.dims = dims
        self.comm_bytes = 0  # bytes this worker sent since the last take_comm_bytes()
        # fp16: dynamic loss scaling, overflow agreed by all ranks (see parallel/memory_policy.py)
        t = cfg.train
        self.loss_scaler = (LossScaler(t.loss_scale, growth_interval=t.loss_scale_growth_interval)
                            if t.precision == "fp16" else None)

    # ---- setup ----------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        """Hook into the model once :func:`parallelize` has laid it out (DDP comm hooks, the
        parameter servers' placement)."""

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """The local optimizer over this rank's parameters."""
        return make_optimizer(model, self.cfg)

    # ---- per step -----------------------------------------------------------------------
    def no_sync(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """Context for accumulation micro-steps whose gradients must not be synced yet."""
        return contextlib.nullcontext()

    def forward_backward(
        self,
        model: nn.Module,
        micro_batches: list[dict[str, torch.Tensor]],
        loss_fn: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor],
        scale: float,
        autocast: Callable[[], contextlib.AbstractContextManager],
    ) -> torch.Tensor:
        """Forward + backward over the step's micro-batches; returns the summed (unscaled) loss.

        ``loss_fn`` returns a loss *sum*; gradients are of ``sum * scale`` where the trainer
        chose ``scale`` so that the data-parallel mean is the mean over the global batch.
        Gradient sync happens only on the last micro-batch.
        """
        total = torch.zeros((), dtype=torch.float64, device=self.dims.device)  # no host sync per micro-batch
        last = len(micro_batches) - 1
        if self.loss_scaler is not None:
            scale *= self.loss_scaler.scale
        for i, batch in enumerate(micro_batches):
            with self.no_sync(model) if i < last else contextlib.nullcontext():
                with autocast():
                    loss = loss_fn(model, batch)
                (loss * scale).backward()
            total += loss.detach().double().to(total.device)
        return total

    @torch.no_grad()
    def eval_logits(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Logits for one val batch (None on ranks that produce no logits, e.g. early pipeline stages)."""
        return model(**{k: v for k, v in batch.items() if k != "labels"})

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> float:
        """Clip the global gradient norm (all shards together); return the norm before clipping."""
        params = [p for p in model.parameters() if p.grad is not None]
        if max_norm <= 0:
            return 0.0
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    def step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> float:
        """Gradients are final on every rank: clip, step, zero.  Returns the grad norm."""
        if self.loss_scaler is not None and not self.loss_scaler.unscale_(model.parameters(), self.dims.distributed):
            optimizer.zero_grad(set_to_none=True)  # fp16 overflow somewhere: every rank skips
            return float("inf")
        if getattr(optimizer, "clips_locally", False):  # 1-bit Adam: each rank's own gradient norm
            optimizer.step()
            norm = optimizer.last_grad_norm
        else:
            norm = self.clip_grad_norm(model, self.cfg.train.grad_clip)
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm

    def observe_loss(self, loss_sum: torch.Tensor, n_global: float) -> None:
        """Once per step: this rank's loss sum and the global label count (compression safeguard)."""

    def take_comm_bytes(self) -> int:
        n, self.comm_bytes = self.comm_bytes, 0
        return n

    # ---- checkpoints -----------------------------------------------------------------------
    def model_state(self, model: nn.Module) -> dict[str, Any]:
        """Full (unsharded) model state dict; identical on every rank that returns it."""
        return unwrap(model).state_dict()

    def load_model_state(self, model: nn.Module, state: dict[str, Any]) -> None:
        unwrap(model).load_state_dict(state)

    def save_extra(self, tmp_dir: Path) -> None:
        """Write strategy-owned state (sharded files, server state) into a checkpoint being made."""

    def load_extra(self, ckpt_dir: Path) -> None:
        """Load what ``save_extra`` wrote."""

    def dcp_modules(self, model: nn.Module) -> list[nn.Module]:
        """The modules whose own parameter names are the single-device model's (DCP keys)."""
        return [unwrap(model)]

    # ---- collectives over the ranks (the parameter server's go through server 0) --------------
    def barrier(self) -> None:
        if self.dims.distributed:
            dist.barrier()

    def all_reduce_sum(self, t: torch.Tensor, group: Any = None) -> torch.Tensor:
        """Sum a small tensor over ranks (in place) and return it; no-op on one process."""
        if self.dims.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
        return t

    def gather_floats(self, values: list[float]) -> list[list[float]]:
        """All-gather a short list of floats from every rank (tensor collective, no pickling)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.dims.device)
        if not self.dims.distributed:
            return [t.tolist()]
        out = [torch.empty_like(t) for _ in range(self.dims.world_size)]
        dist.all_gather(out, t)
        return [o.tolist() for o in out]

    # ---- metrics ----------------------------------------------------------------------------
    def reduce_loss_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum this step's loss over the ranks that hold distinct data (in place; the reported loss).

        Pipeline layouts override this: only the last stage has a loss."""
        if self.dims.dp > 1:
            self.all_reduce_sum(t, self.dims.dp_group)
        return t

    def reduce_eval_stats(self, stats: torch.Tensor) -> torch.Tensor:
        """Sum eval statistics over the ranks that hold distinct data."""
        return self.all_reduce_sum(stats) if self.dims.distributed else stats

    def step_metrics(self) -> dict[str, Any]:
        """Extra per-step fields for metrics.jsonl (e.g. staleness, pull latency)."""
        return {}

    def extra_rss_mb(self) -> list[float]:
        """Peak RSS of helper processes (e.g. parameter servers), appended after the workers'."""
        return []

    def extra_summary(self) -> dict[str, Any]:
        """Strategy-specific fields for summary.json (a collective: every rank calls it)."""
        if self.loss_scaler is None:
            return {}
        # every rank must have taken the same skip decisions
        per_rank = self.gather_floats([self.loss_scaler.scale, self.loss_scaler.skipped])
        return {"fp16": {"loss_scale": [r[0] for r in per_rank], "skipped_steps": [int(r[1]) for r in per_rank]}}

    def close(self) -> None:
        """Release sockets, servers, hooks."""


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module under DDP / compile wrappers."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model
