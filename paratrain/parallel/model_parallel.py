"""ZeRO, tensor, pipeline parallel and their combinations: one strategy per layout.

Order of application in :meth:`ModelParallelStrategy.wrap` (fixed):

1. pipeline split (``pp > 1``): this rank keeps its chunk(s) of the layer stack;
2. tensor parallel (``tp > 1``) on every chunk, over the mesh's ``tp`` axis;
3. activation checkpointing (``train.activation_checkpointing``) per block;
3b. float8 linears (``train.float8``) and regional ``torch.compile`` (``train.compile``)
   per block (:mod:`paratrain.parallel.float8`, :mod:`paratrain.parallel.compile`);
4. the data-parallel axis: FSDP2 (ZeRO 2/3, and the dp axis of dp x tp), or - with a
   pipeline - a bucketed gradient all-reduce after the last microbatch.

ZeRO-1 alone is DDP + ZeroRedundancyOptimizer (:class:`Zero1Strategy`).  Every layout
checkpoints through DCP (see :mod:`paratrain.parallel.dist_checkpoint`), so a checkpoint
from one layout resumes under any other.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from paratrain.config import Config, ConfigError
from paratrain.parallel.compile import apply_compile
from paratrain.parallel.dims import ParallelDims
from paratrain.parallel.float8 import apply_float8
from paratrain.parallel.memory_policy import apply_activation_checkpointing
from paratrain.parallel.strategy import Strategy


def layout_name(cfg: Config, dims: ParallelDims) -> str:
    """The layout as a short name: zero1, zero2, fsdp, tp2, pp2-1f1b, dp2-tp2, dp2-tp2-pp2-gpipe, ..."""
    p = cfg.parallel
    offload = "-offload" if p.cpu_offload else ""
    if dims.tp == 1 and dims.pp == 1:
        return {1: "zero1", 2: "zero2", 3: "fsdp"}[p.zero] + offload
    parts = [f"dp{dims.dp}"] if dims.dp > 1 else []
    if dims.tp > 1:
        parts.append(f"tp{dims.tp}")
    if dims.pp > 1:
        parts.append(f"pp{dims.pp}-{p.pp_schedule}")
    if p.zero:
        parts.append(f"zero{p.zero}")
    return "-".join(parts) + offload


def allreduce_mean_(grads: list[torch.Tensor], group, world: int, bucket_bytes: int = 25 << 20) -> int:
    """Average gradients over ``group`` in flat buckets (in place); returns bytes sent per rank."""
    sent = 0
    bucket: list[torch.Tensor] = []
    size = 0

    def flush() -> None:
        nonlocal sent, bucket, size
        if not bucket:
            return
        flat = torch.cat([g.reshape(-1) for g in bucket])
        dist.all_reduce(flat, group=group)
        flat.div_(world)
        sent += 2 * (world - 1) * flat.numel() * flat.element_size() // world
        off = 0
        for g in bucket:
            g.copy_(flat[off: off + g.numel()].view_as(g))
            off += g.numel()
        bucket, size = [], 0

    for g in grads:
        if bucket and (g.dtype != bucket[0].dtype or size + g.numel() * g.element_size() > bucket_bytes):
            flush()
        bucket.append(g)
        size += g.numel() * g.element_size()
    flush()
    return sent


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def grad_norm_sharded(params: list[torch.Tensor], pp_group=None) -> float:
    """The global L2 norm of gradients that may be DTensor shards (FSDP, TP) or pipeline-local.

    Squares are summed locally per (mesh, sharded mesh dims), all-reduced over the mesh
    dims that shard them (replicated dims are not summed twice), then over the pipeline.
    """
    acc: dict[tuple, torch.Tensor] = {}
    for p in params:
        g = p.grad
        if g is None:
            continue
        if isinstance(g, DTensor):
            sdims = tuple(i for i, pl in enumerate(g.placements) if not pl.is_replicate())
            key = (g.device_mesh, sdims)
        else:
            key = (None, ())
        sq = _local(g).detach().float().pow(2).sum().double()
        acc[key] = acc[key] + sq if key in acc else sq
    total = torch.zeros((), dtype=torch.float64)
    for (mesh, sdims), v in acc.items():
        for i in sdims:
            dist.all_reduce(v, group=mesh.get_group(i))
        total += v
    if pp_group is not None:
        dist.all_reduce(total, group=pp_group)
    return math.sqrt(float(total))


class PipelineModel(nn.Module):
    """This rank's pipeline chunks as one module (for .parameters(), .train(), .eval())."""

    def __init__(self, chunks: dict[int, nn.Module]) -> None:
        super().__init__()
        self.chunks = nn.ModuleDict({str(s): c for s, c in chunks.items()})

    def forward(self, *args, **kwargs):  # pragma: no cover - the schedule drives the chunks
        raise RuntimeError("a pipeline-parallel model is driven by its schedule, not called directly")


class ModelParallelStrategy(Strategy):
    """ZeRO 2/3 (FSDP2), tensor parallel, pipeline parallel, and their combinations."""

    uses_dcp = True

    def __init__(self, cfg: Config, dims: ParallelDims) -> None:
        super().__init__(cfg, dims)
        self.name = layout_name(cfg, dims)
        self.pipe = None
        self.fsdp = False
        p = cfg.parallel
        self.loss_parallel = p.loss_parallel and dims.tp > 1 and dims.pp == 1
        # TP's gathered logits are a view; the trainer never modifies them in place
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")

    # ---- setup ---------------------------------------------------------------------------
    def prepare(self, model: nn.Module) -> nn.Module:
        return model  # activation checkpointing goes after tensor parallel, inside wrap()

    def _transform(self, model: nn.Module) -> nn.Module:
        """Tensor parallel, then activation checkpointing, on the whole model or one chunk."""
        d = self.dims
        if d.tp > 1:
            from paratrain.parallel.tensor_parallel import apply_tensor_parallel

            apply_tensor_parallel(model, d.axis_mesh("tp"), loss_parallel=self.loss_parallel)
        apply_activation_checkpointing(model, self.cfg.train.activation_checkpointing)
        apply_float8(model, self.cfg, d.device, fsdp=d.dp > 1)
        apply_compile(model, self.cfg, d.rank)
        return model

    def wrap(self, model: nn.Module) -> nn.Module:
        d, p = self.dims, self.cfg.parallel
        from paratrain.parallel.meta_init import has_meta, materialize

        meta = has_meta(model)  # a meta-device build (ZeRO-3): FSDP2 shards first, then each rank fills its shards
        if not meta:
            model = model.to(d.device)
        if d.pp > 1:
            from paratrain.models import GPT
            from paratrain.parallel.pipeline import PipelineRunner

            m = p.microbatches or d.pp
            split = getattr(model, "paratrain_pp_split", None)
            if split is not None and not isinstance(model, GPT):
                from paratrain.parallel.pipeline_foreign import ForeignPipelineRunner

                example, loss_fn = model.paratrain_pp_example
                self.pipe = ForeignPipelineRunner(model, d, p.pp_schedule, m, p.virtual_stages, split, example,
                                                  loss_fn)
                return PipelineModel(self.pipe.chunks)
            if not isinstance(model, GPT):
                raise ConfigError(f"pipeline parallel supports paratrain's GPT only, not {type(model).__name__}; "
                                  "use tp or zero for this model")
            self.pipe = PipelineRunner(model, d, p.pp_schedule, m, p.virtual_stages, self._transform)
            return PipelineModel(self.pipe.chunks)
        model = self._transform(model)
        if d.dp > 1:
            from paratrain.parallel.sharding import apply_fsdp

            apply_fsdp(model, model.layer_modules(), d.axis_mesh("dp"), p.zero, p.cpu_offload, self.cfg.train.precision)
            self.fsdp = True
        if meta:
            materialize(model, d.device, self.cfg.run.seed)
        return model

    def dcp_modules(self, model: nn.Module) -> list[nn.Module]:
        return list(model.chunks.values()) if isinstance(model, PipelineModel) else [model]

    # ---- per step ------------------------------------------------------------------------
    def no_sync(self, model: nn.Module) -> contextlib.AbstractContextManager:
        if self.fsdp:
            from paratrain.parallel.sharding import fsdp_no_sync

            return fsdp_no_sync(model)
        return contextlib.nullcontext()

    def forward_backward(self, model: nn.Module, micro_batches: list[dict[str, torch.Tensor]],
                         loss_fn: Callable, scale: float,
                         autocast: Callable[[], contextlib.AbstractContextManager]) -> torch.Tensor:
        if self.pipe is None:
            if not self.loss_parallel:
                return super().forward_backward(model, micro_batches, loss_fn, scale, autocast)
            from torch.distributed.tensor.parallel import loss_parallel

            def full_loss(m: nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
                loss = loss_fn(m, b)  # a replicated DTensor under loss_parallel
                return loss.full_tensor() if isinstance(loss, DTensor) else loss

            with loss_parallel():
                return super().forward_backward(model, micro_batches, full_loss, scale, autocast)
        total = torch.zeros((), dtype=torch.float64)
        ls = self.loss_scaler.scale if self.loss_scaler is not None else 1.0
        extra = (loss_fn,) if self.pipe.calls_user_loss else ()
        for batch in micro_batches:
            with autocast():
                total += self.pipe.train_step(batch, scale * ls, *extra)
        return total

    def step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> float:
        d = self.dims
        if self.pipe is not None and d.dp > 1:
            grads = [_local(p.grad) for p in model.parameters() if p.grad is not None]
            self.comm_bytes += allreduce_mean_(grads, d.dp_group, d.dp)
        return super().step(model, optimizer)

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> float:
        if max_norm <= 0:
            return 0.0
        params = [p for p in model.parameters() if p.grad is not None]
        norm = grad_norm_sharded(params, self.dims.pp_group)
        coef = max_norm / (norm + 1e-6)
        if coef < 1.0:
            for p in params:
                _local(p.grad).mul_(coef)
        return norm

    @torch.no_grad()
    def eval_logits(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        if self.pipe is not None:
            return self.pipe.forward(batch["input_ids"])
        out = model(**{k: v for k, v in batch.items() if k != "labels"})
        return out.full_tensor() if isinstance(out, DTensor) else out

    # ---- reductions over the ranks that hold distinct results ------------------------------
    def _reports(self) -> bool:
        """One rank per data-parallel replica reports: tp rank 0 of the last pipeline stage."""
        return self.dims.tp_rank == 0 and (self.pipe is None or self.pipe.has_last)

    def reduce_loss_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.pipe is None:
            return super().reduce_loss_sum(t)
        if not self._reports():
            t.zero_()
        dist.all_reduce(t)
        return t

    def reduce_eval_stats(self, stats: torch.Tensor) -> torch.Tensor:
        if not self._reports():
            stats.zero_()
        if self.dims.distributed:
            dist.all_reduce(stats)
        return stats

    def extra_summary(self) -> dict[str, Any]:
        d, p = self.dims, self.cfg.parallel
        out: dict[str, Any] = {"layout": {"dp": d.dp, "tp": d.tp, "pp": d.pp, "zero": p.zero,
                                          "cpu_offload": p.cpu_offload}, **super().extra_summary()}
        if self.pipe is not None:
            measured, theory = self.pipe.bubble()
            t = torch.tensor([measured if math.isfinite(measured) else 0.0, 1.0], dtype=torch.float64)
            dist.all_reduce(t)  # every rank calls extra_summary
            out["pipeline"] = {"schedule": p.pp_schedule, "stages": self.pipe.n_stages,
                               "microbatches": self.pipe.m, "virtual_stages": self.pipe.v,
                               "bubble_theory": theory, "bubble_measured": float(t[0] / t[1]),
                               "bubble_measured_rank0": measured}
        return out


def build_model_parallel_strategy(cfg: Config, dims: ParallelDims) -> Strategy:
    """The strategy for a config with ``tp > 1``, ``pp > 1`` or ``zero > 0``."""
    if cfg.parallel.zero == 1 and dims.tp == 1 and dims.pp == 1:
        from paratrain.parallel.sharding import Zero1Strategy

        return Zero1Strategy(cfg, dims)
    return ModelParallelStrategy(cfg, dims)
