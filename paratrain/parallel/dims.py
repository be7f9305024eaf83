"""The one owner of the parallel layout: world, ranks, degrees, device and process groups.

Every other module asks a :class:`ParallelDims` for its rank, its data-parallel
coordinates and its groups; nothing keeps process groups in module globals.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from paratrain.config import Config


@dataclass
class ParallelDims:
    """World = dp x tp x pp.  Built from the environment torchrun (or our launcher) sets."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    local_world_size: int = 1
    dp: int = 1
    tp: int = 1
    pp: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str = "gloo"
    mesh: object = None  # DeviceMesh, built by the model-parallel layer when tp/pp > 1

    @classmethod
    def from_env(cls, cfg: Config, init: bool = True) -> ParallelDims:
        """Read RANK/WORLD_SIZE/LOCAL_RANK, pick device + backend, init the process group."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        p = cfg.parallel
        tp, pp = p.tp, p.pp
        if world % (tp * pp):
            raise ValueError(f"world size {world} is not divisible by tp * pp = {tp * pp}")
        dp = world // (tp * pp)
        use_cuda = torch.cuda.is_available() and p.backend != "gloo"
        if use_cuda:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
        backend = p.backend if p.backend != "auto" else ("nccl" if use_cuda else "gloo")
        dims = cls(world, rank, local_rank, local_world, dp, tp, pp, device, backend)
        if init and world > 1 and not dist.is_initialized():
            timeout = datetime.timedelta(seconds=max(60.0, cfg.train.hang_timeout_s * 4 or 600.0))
            dist.init_process_group(backend=backend, timeout=timeout, device_id=device if use_cuda else None)
        return dims

    # ---- coordinates ------------------------------------------------------------------
    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_rank(self) -> int:
        """Rank along the data-parallel axis (mesh order: dp outermost, then pp, then tp)."""
        return self.rank // (self.tp * self.pp)

    @property
    def dp_group(self):
        """Process group of the data-parallel axis (the default group when dp is the whole world)."""
        if self.mesh is not None and self.dp > 1 and (self.tp > 1 or self.pp > 1):
            return self.mesh["dp"].get_group()
        return None

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_sum(self, t: torch.Tensor, group=None) -> torch.Tensor:
        """Sum a small tensor over ranks (in place) and return it; no-op on one process."""
        if self.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
        return t

    def gather_floats(self, values: list[float]) -> list[list[float]]:
        """All-gather a short list of floats from every rank (tensor collective, no pickling)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if not self.distributed:
            return [t.tolist()]
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(out, t)
        return [o.tolist() for o in out]

    def shutdown(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()
