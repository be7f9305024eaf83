"""Parallel layouts: :func:`parallelize` applies one to a model (pipeline split, then tensor
parallel, then activation checkpointing, then FSDP / DDP on the data-parallel axis) and
:func:`make_sync` picks the gradient sync that goes with it; :class:`ParallelDims` owns the
layout (ranks, mesh, groups, collectives)."""

from __future__ import annotations

from paratrain.parallel.dims import ParallelDims
from paratrain.parallel.optim import make_optimizer
from paratrain.parallel.parallelize import make_sync, parallelize
from paratrain.parallel.sync import GradSync, unwrap

__all__ = ["GradSync", "ParallelDims", "make_optimizer", "make_sync", "parallelize", "unwrap"]
