"""Parallel layouts.  ``build_strategy`` picks the strategy a config asks for.

Order of application inside a strategy's ``wrap`` (documented in docs/architecture.md):
pipeline split first, then tensor parallel, then activation checkpointing, then
FSDP / DDP on the data-parallel axis.
"""

from __future__ import annotations

from paratrain.config import Config
from paratrain.parallel.data_parallel import DDPStrategy
from paratrain.parallel.dims import ParallelDims
from paratrain.parallel.strategy import Strategy, make_optimizer, unwrap

__all__ = ["ParallelDims", "Strategy", "DDPStrategy", "build_strategy", "make_optimizer", "unwrap"]


def build_strategy(cfg: Config, dims: ParallelDims) -> Strategy:
    """The strategy for this config (single process, DDP, ZeRO, TP/PP, parameter server)."""
    p = cfg.parallel
    if p.sync == "ps":
        from paratrain.ps.strategy import PSStrategy

        return PSStrategy(cfg, dims)
    if p.tp > 1 or p.pp > 1 or p.zero > 0:
        from paratrain.parallel.model_parallel import build_model_parallel_strategy

        return build_model_parallel_strategy(cfg, dims)
    if dims.world_size > 1:
        return DDPStrategy(cfg, dims)
    return Strategy(cfg, dims)
