"""``parallelize``: lay a single-device model out over the ranks, in one fixed order.

As torchtitan's per-model ``parallelize_*`` functions do, the order is:

1. **pipeline split** (``pp > 1``): this rank keeps its stage(s) of the model -- paratrain's
   layer stack split by parameters, or a user model traced at ``spec.pp_split``; steps 2-3 then
   apply to every stage;
2. **tensor parallel** (``tp > 1``): ``spec.tp_plan`` over the mesh's ``tp`` axis;
3. **activation checkpointing** (``train.activation_checkpointing``) on ``spec.blocks``;
4. **float8 linears** (``train.float8``, GPUs) and **regional compilation** (``train.compile``:
   each block's forward), after TP/AC and before data parallel, as torchtitan orders them;
5. **the data-parallel axis**: FSDP2 per block and root (ZeRO-2/3, or the dp axis of a dp x tp
   layout), DDP (plain data parallel, ZeRO-1), or nothing (one process; the parameter server;
   a pipeline, whose sync all-reduces gradients itself after the last micro-batch).

The gradient sync that goes with the layout (:mod:`paratrain.parallel.sync`) is chosen by
:func:`make_sync` and attached last.  Adding a parallel axis means one more step here, its
``apply_*`` function in its own module, and (if it changes how gradients meet) one sync class.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, Protocol

from torch import nn

from paratrain.config import Config, ConfigError
from paratrain.parallel.compile import apply_compile
from paratrain.parallel.data_parallel import CompressedDDPSync, DDPSync, OneBitAdamSync, wrap_ddp
from paratrain.parallel.dims import ParallelDims
from paratrain.parallel.float8 import apply_float8
from paratrain.parallel.memory_policy import apply_activation_checkpointing
from paratrain.parallel.meta_init import has_meta, materialize
from paratrain.parallel.model_parallel import ModelParallelSync, PipelineModel
from paratrain.parallel.pipeline import PipelineRunner, splits_natively
from paratrain.parallel.pipeline_foreign import ForeignPipelineRunner
from paratrain.parallel.sharding import Zero1Sync, apply_fsdp
from paratrain.parallel.sync import GradSync
from paratrain.parallel.tensor_parallel import apply_tensor_parallel


class LayoutSpec(Protocol):
    """What parallelize needs to know about the model (filled by ``training.spec.RunSpec``)."""

    blocks: Callable[[nn.Module], list[nn.Module]]
    tp_plan: Callable[[nn.Module, bool], dict[str, Any]] | None
    pp_split: list[str] | None
    loss: Any

    def first_batch(self) -> Any: ...


def make_sync(cfg: Config, dims: ParallelDims) -> GradSync:
    """The gradient sync of a collective layout (the parameter server's is ``ps.strategy.PSSync``)."""
    p = cfg.parallel
    if p.zero == 1 and p.tp == 1 and p.pp == 1:

        return Zero1Sync(cfg, dims)
    if p.tp > 1 or p.pp > 1 or p.zero > 0:

        return ModelParallelSync(cfg, dims)
    if dims.world_size == 1:
        return GradSync(cfg, dims)

    if cfg.train.optimizer == "onebit_adam":
        return OneBitAdamSync(cfg, dims)
    if cfg.compression.gradient != "none":
        return CompressedDDPSync(cfg, dims)
    return DDPSync(cfg, dims)


def parallelize(model: nn.Module, dims: ParallelDims, spec: LayoutSpec, cfg: Config, sync: GradSync) -> nn.Module:
    """Apply the layout to ``model`` (see the module docstring); returns what the sync drives."""

    meta = has_meta(model)  # a meta-device build (ZeRO-3): FSDP2 shards first, then each rank fills its shards
    if not meta:
        model = model.to(dims.device)
    if dims.pp > 1:  # 1. pipeline split; 2-3 per stage
        model = _pipeline(model, dims, spec, cfg, sync)
    else:
        model = _stage_steps(model, dims, spec, cfg, _uses_fsdp(dims, cfg, sync))  # 2-4
        model = _data_parallel(model, dims, spec, cfg, sync)  # 5
    if meta:
        materialize(model, dims.device, cfg.run.seed)
    sync.attach(model)
    return model


def _stage_steps(model: nn.Module, dims: ParallelDims, spec: LayoutSpec, cfg: Config, fsdp: bool = False) -> nn.Module:
    """Steps 2-4 on the whole model or on one pipeline stage (``fsdp``: step 5 will shard it)."""
    if dims.tp > 1:

        if spec.tp_plan is None:
            raise ConfigError(f"parallel.tp = {dims.tp} needs a tensor-parallel plan for {type(model).__name__}")
        lp = _loss_parallel(cfg, dims)
        apply_tensor_parallel(model, dims.axis_mesh("tp"), loss_parallel=lp, plan=spec.tp_plan(model, lp))
    apply_activation_checkpointing(model, cfg.train.activation_checkpointing, spec.blocks(model))
    apply_float8(model, cfg, dims.device, fsdp=fsdp)
    apply_compile(model, cfg, dims.rank, spec.blocks(model))  # the blocks as checkpointing left them
    return model


def _loss_parallel(cfg: Config, dims: ParallelDims) -> bool:
    return cfg.parallel.loss_parallel and dims.tp > 1 and dims.pp == 1


def _pipeline(model: nn.Module, dims: ParallelDims, spec: LayoutSpec, cfg: Config, sync: GradSync) -> nn.Module:

    p = cfg.parallel
    m = p.microbatches or dims.pp
    if spec.pp_split is not None:  # a user model, traced at the named split points

        runner = ForeignPipelineRunner(model, dims, p.pp_schedule, m, p.virtual_stages, spec.pp_split,
                                       spec.first_batch(), spec.loss)
    else:

        if not splits_natively(model):
            raise ConfigError(f"pipeline parallel splits paratrain's decoder LMs (GPT, Llama), not "
                              f"{type(model).__name__}; use tp or zero for this model")
        runner = PipelineRunner(model, dims, p.pp_schedule, m, p.virtual_stages,
                                lambda chunk: _stage_steps(chunk, dims, spec, cfg))
    sync.pipe = runner
    return PipelineModel(runner.chunks)


def _uses_fsdp(dims: ParallelDims, cfg: Config, sync: GradSync) -> bool:
    """Whether step 5 shards this (unpipelined) layout with FSDP2 rather than DDP or nothing."""
    return dims.dp > 1 and cfg.parallel.sync != "ps" and isinstance(sync, ModelParallelSync)


def _data_parallel(model: nn.Module, dims: ParallelDims, spec: LayoutSpec, cfg: Config, sync: GradSync) -> nn.Module:
    p = cfg.parallel
    if _uses_fsdp(dims, cfg, sync):
        # TP's gathered logits are a view; the trainer never modifies them in place
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        apply_fsdp(model, spec.blocks(model), dims.axis_mesh("dp"), p.zero, p.cpu_offload, cfg.train.precision)
        sync.fsdp = True
        return model
    if dims.dp == 1 or p.sync == "ps":
        return model
    return wrap_ddp(model, dims, p.bucket_cap_mb)
