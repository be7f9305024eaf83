"""The :class:`Checkpointer`: saving and restoring a rank's stateful pieces, under any layout.

A checkpoint is a directory ``checkpoints/step_N`` written atomically (see
:mod:`paratrain.checkpoint` for the file format: a temp dir, a sha256 manifest, a
rename).  What goes in:

* the model -- ``model.pt`` (full state dict, rank 0) for data-parallel layouts, or a DCP copy
  under ``dcp/`` written by every rank for sharded / model-parallel ones (any layout reloads it);
* the optimizer -- ``optim.pt`` (rank 0), or ``optim_rank{R}.pt`` where state differs per rank;
  the LR schedule travels with it;
* ``meta.json`` -- step, data position, world size, layout name, arch, productive time and the
  fp16 loss scale;
* ``rank{R}.pt`` -- each rank's torch RNG state (dropout streams resume exactly);
* whatever the gradient sync adds (``save_extra``: parameter-server shards).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from paratrain import checkpoint as ckpt
from paratrain.parallel import dist_checkpoint
from paratrain.parallel.dims import ParallelDims
from paratrain.parallel.sync import unwrap
from paratrain.processes import restart_count


class Checkpointer:
    """Saves and restores one rank's training state; every rank calls :meth:`save` together."""

    def __init__(self, root: Path, dims: ParallelDims, sync: Any, keep: int) -> None:
        self.root, self.dims, self.sync, self.keep = root, dims, sync, keep

    def _optim_file(self) -> str:
        return f"optim_rank{self.dims.rank}.pt" if self.sync.sharded_optimizer else "optim.pt"

    def save(self, step: int, model: torch.nn.Module, optimizer: Any, scheduler: Any,
             meta: dict[str, Any]) -> None:
        """Write ``step_{step}`` from every rank; ``meta`` holds rank 0's extra fields (data position, ...)."""
        d, sync = self.dims, self.sync
        if d.is_main:
            ckpt.begin(self.root, step)
        sync.barrier()
        tmp = ckpt.tmp_dir(self.root, step)
        if sync.uses_dcp:  # layout-independent: dcp/ from every rank

            dist_checkpoint.save(tmp, sync.dcp_modules(model), optimizer)
            model_state, optim_state = None, {}
        else:
            model_state = sync.model_state(model)
            optim_state = optimizer.state_dict() if optimizer else {}
        optim = {"optimizer": optim_state, "scheduler": scheduler.state_dict() if scheduler else {}}
        if d.is_main:
            if model_state is not None:
                ckpt.save_file(tmp, "model.pt", model_state)
            loss_scaler = sync.loss_scaler
            ckpt.save_file(tmp, "meta.json", {
                "step": step, "world_size": d.world_size, "strategy": sync.name, **meta,
                # fp16: every rank holds the same scale (the overflow vote is world-wide)
                **({"loss_scaler": loss_scaler.state_dict()} if loss_scaler else {}),
            })
        if d.is_main or sync.sharded_optimizer:
            ckpt.save_file(tmp, self._optim_file(), optim)
        ckpt.save_file(tmp, f"rank{d.rank}.pt", {"torch_rng": torch.get_rng_state()})
        sync.save_extra(tmp)
        sync.barrier()
        if d.is_main:
            ckpt.commit(self.root, step, self.keep)
        sync.barrier()

    def load(self, path: Path, model: torch.nn.Module, optimizer: Any, scheduler: Any) -> dict[str, Any]:
        """Restore everything :meth:`save` wrote into the live objects; returns ``meta.json``."""
        sync = self.sync
        ckpt.verify(path)
        meta = ckpt.load_file(path, "meta.json")
        name = self._optim_file()
        if (path / "dcp").is_dir():  # saved by a model-parallel layout: loads under any layout

            dist_checkpoint.load(path, sync.dcp_modules(model), optimizer)
            name = "optim.pt"  # the schedule only
        elif sync.uses_dcp:
            raise ckpt.CheckpointError(
                f"checkpoint {path} was saved by a '{meta.get('strategy')}' run without a DCP copy; "
                "resume it with a data-parallel layout (zero = 0, tp = pp = 1)")
        else:
            sync.load_model_state(model, ckpt.load_model(path, unwrap(model).state_dict()))
        if (path / name).exists() and optimizer:
            optim = ckpt.load_file(path, name)
            if optim["optimizer"]:
                optimizer.load_state_dict(optim["optimizer"])
            scheduler.load_state_dict(optim["scheduler"])
            for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr(), strict=True):
                group["lr"] = lr
        rank_file = f"rank{self.dims.rank}.pt"
        if (path / rank_file).exists():
            torch.set_rng_state(ckpt.load_file(path, rank_file)["torch_rng"])
        sync.load_extra(path)
        if sync.loss_scaler is not None and "loss_scaler" in meta:
            sync.loss_scaler.load_state_dict(meta["loss_scaler"])
        return meta

    def resume_point(self, path: str, resume: bool) -> Path | None:
        """The checkpoint to start from: ``checkpoint.path``, else the newest one when resuming
        (asked for, or after a restart by the supervisor)."""
        restarted = restart_count() > 0
        if path:
            return Path(path)
        if resume or restarted:
            return ckpt.latest(self.root)
        return None
