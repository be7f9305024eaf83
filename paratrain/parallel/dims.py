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

from paratrain.config import Config, ConfigError


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
    mesh: object = None  # DeviceMesh with axes ("dp", "pp", "tp"); built when tp, pp or zero need it
    # collectives provider when there is no torch.distributed group (parameter server: the
    # servers run barrier / all_reduce_sum / gather_floats, and a dead worker does not hang them)
    ops: object = None

    @classmethod
    def from_env(cls, cfg: Config, init: bool = True) -> ParallelDims:
        """Read RANK/WORLD_SIZE/LOCAL_RANK, pick device + backend, init the process group."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        p = cfg.parallel
        tp, pp = p.tp, p.pp
        dp = p.dp or world // (tp * pp)
        if dp * tp * pp != world:
            raise ConfigError(
                f"world size {world} != dp * tp * pp = {dp} * {tp} * {pp} = {dp * tp * pp}; "
                "make the product of the parallel degrees equal the number of processes"
            )
        use_cuda = torch.cuda.is_available() and p.backend != "gloo"
        if use_cuda:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
        backend = p.backend if p.backend != "auto" else ("nccl" if use_cuda else "gloo")
        dims = cls(world, rank, local_rank, local_world, dp, tp, pp, device, backend)
        if init and world > 1 and p.sync != "ps" and not dist.is_initialized():
            timeout = datetime.timedelta(seconds=max(60.0, cfg.train.hang_timeout_s * 4 or 600.0))
            dist.init_process_group(backend=backend, timeout=timeout, device_id=device if use_cuda else None)
        if init and world > 1 and (tp > 1 or pp > 1 or p.zero > 0):
            dims.build_mesh()
        return dims

    def build_mesh(self):
        """The DeviceMesh over all ranks, axes ("dp", "pp", "tp"), tp innermost (collective, once)."""
        if self.mesh is None:
            from torch.distributed.device_mesh import init_device_mesh

            self.mesh = init_device_mesh(self.device.type, (self.dp, self.pp, self.tp),
                                         mesh_dim_names=("dp", "pp", "tp"))
        return self.mesh

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
    def pp_rank(self) -> int:
        """Pipeline stage index of this rank (0 = first stage)."""
        return (self.rank // self.tp) % self.pp

    @property
    def tp_rank(self) -> int:
        """Rank inside this rank's tensor-parallel group."""
        return self.rank % self.tp

    @property
    def dp_group(self):
        """Process group of the data-parallel axis (the default group when dp is the whole world)."""
        if self.mesh is not None and self.dp > 1 and (self.tp > 1 or self.pp > 1):
            return self.mesh["dp"].get_group()
        return None

    @property
    def tp_group(self):
        """Process group of the tensor-parallel axis (None when tp = 1)."""
        return self.mesh["tp"].get_group() if self.mesh is not None and self.tp > 1 else None

    @property
    def pp_group(self):
        """Process group of the pipeline axis (None when pp = 1)."""
        return self.mesh["pp"].get_group() if self.mesh is not None and self.pp > 1 else None

    def axis_mesh(self, *names: str):
        """The sub-mesh of the named axes, e.g. ``axis_mesh("dp")`` or ``axis_mesh("dp", "tp")``."""
        mesh = self.build_mesh()
        return mesh[names[0]] if len(names) == 1 else mesh[names]

    def barrier(self) -> None:
        if self.ops is not None:
            self.ops.barrier()
        elif self.distributed:
            dist.barrier()

    def all_reduce_sum(self, t: torch.Tensor, group=None) -> torch.Tensor:
        """Sum a small tensor over ranks (in place) and return it; no-op on one process."""
        if self.ops is not None:
            return self.ops.all_reduce_sum(t, group)
        if self.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
        return t

    def gather_floats(self, values: list[float]) -> list[list[float]]:
        """All-gather a short list of floats from every rank (tensor collective, no pickling)."""
        if self.ops is not None:
            return self.ops.gather_floats(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if not self.distributed:
            return [t.tolist()]
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(out, t)
        return [o.tolist() for o in out]

    def shutdown(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()
