"""Layout-independent checkpoints with ``torch.distributed.checkpoint`` (DCP).

A model-parallel run writes ``step_N/dcp/``: one flat state dict per rank, keyed by the
single-device model's parameter names, whatever the layout:

    model.<fqn>          parameters (DTensor shards under ZeRO-3/TP, a stage's own under PP)
    optim.<fqn>.<key>    optimizer state of that parameter (exp_avg, exp_avg_sq, step, ...)

DCP stores each shard once with its global offsets, so any other layout (one process,
DDP on 4 ranks, tp = 2, ...) can load it: every rank asks for the names it holds and gets
its slice.  Rank 0 also writes ``model.pt``, the full model state dict, so tools that read
a checkpoint's weights (``paratrain compress``) work on every layout.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.optim import ZeroRedundancyOptimizer

from paratrain.checkpoint import CheckpointError
from paratrain.parallel.memory_policy import clean_name

DIRNAME = "dcp"


def _inner(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer that holds state: ZeRO-1's local shard optimizer, or the optimizer itself."""
    return optimizer.optim if isinstance(optimizer, ZeroRedundancyOptimizer) else optimizer


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def _single_process_ok(quiet: bool):
    """Silence DCP's "assuming the intent is to ... in a single process" (it is, when ``quiet``)."""
    with warnings.catch_warnings():
        if quiet:
            warnings.filterwarnings("ignore", message=".*single process")
        yield


def portable_state(modules: list[nn.Module], optimizer: torch.optim.Optimizer | None) -> dict[str, torch.Tensor]:
    """This rank's model + optimizer state keyed by the single-device parameter names."""
    sd: dict[str, torch.Tensor] = {}
    names: dict[int, str] = {}
    for m in modules:
        sd.update({f"model.{k}": v for k, v in m.state_dict().items()})
        names.update({id(p): clean_name(n) for n, p in m.named_parameters()})
    if optimizer is not None:
        opt = _inner(optimizer)
        for group in opt.param_groups:
            for p in group["params"]:
                for key, value in opt.state.get(p, {}).items():
                    if isinstance(value, torch.Tensor):
                        sd[f"optim.{names[id(p)]}.{key}"] = value
    return sd


def ensure_optimizer_state(modules: list[nn.Module], optimizer: torch.optim.Optimizer) -> None:
    """Create the optimizer's lazily built state (a step with zero gradients at lr 0), so that
    a load has tensors to fill.  Collective under ZeRO-1 (the step broadcasts)."""
    opt = _inner(optimizer)
    if all(opt.state.get(p) for g in opt.param_groups for p in g["params"]):
        return
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)
    lrs = [g["lr"] for g in optimizer.param_groups]
    for g in optimizer.param_groups:
        g["lr"] = 0.0
    optimizer.step()
    for g, lr in zip(optimizer.param_groups, lrs, strict=True):
        g["lr"] = lr
    optimizer.zero_grad(set_to_none=True)


def save(ckpt_tmp: Path, modules: list[nn.Module], optimizer: torch.optim.Optimizer | None) -> None:
    """All ranks: write ``dcp/`` into the checkpoint being made; rank 0 then adds ``model.pt``."""
    path = ckpt_tmp / DIRNAME
    with _single_process_ok(not _distributed()):
        dcp.save(portable_state(modules, optimizer), checkpoint_id=str(path))
    if not _distributed() or dist.get_rank() == 0:
        torch.save(read_model(path), ckpt_tmp / "model.pt")


def read_model(path: Path) -> dict[str, torch.Tensor]:
    """The full model state dict from a ``dcp/`` directory, read by this process alone."""
    meta = FileSystemReader(str(path)).read_metadata()
    sd = {k: torch.empty(m.size, dtype=m.properties.dtype)
          for k, m in meta.state_dict_metadata.items()
          if k.startswith("model.") and isinstance(m, TensorStorageMetadata)}
    with _single_process_ok(True):
        dcp.load(sd, storage_reader=FileSystemReader(str(path)), no_dist=True)
    return {k[len("model."):]: v for k, v in sd.items()}


def load(ckpt_dir: Path, modules: list[nn.Module], optimizer: torch.optim.Optimizer | None) -> None:
    """All ranks: fill this rank's parameters and optimizer state from ``ckpt_dir/dcp``."""
    path = ckpt_dir / DIRNAME
    if optimizer is not None:
        ensure_optimizer_state(modules, optimizer)
    sd = portable_state(modules, optimizer)
    available = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    missing = sorted(k for k in sd if k not in available)
    if missing:
        raise CheckpointError(
            f"checkpoint {ckpt_dir} has no {missing[0]} ({len(missing)} entries missing): "
            "it was saved from a different model or optimizer"
        )
    with _single_process_ok(not _distributed()):
        dcp.load(sd, checkpoint_id=str(path))
