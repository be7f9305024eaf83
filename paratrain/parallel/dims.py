"""The one owner of the parallel layout: world, ranks, named axes, device and process groups.

Every other module asks a :class:`ParallelDims` for its rank, its coordinate along an axis and
that axis's group; nothing keeps process groups in module globals.  The axes are named in
:data:`AXES` (mesh order, outermost first): a new parallel axis is one entry there plus its
degree in ``[parallel]``.  Collectives over the ranks belong to the gradient sync
(:class:`~paratrain.parallel.sync.GradSync`), since a parameter-server job has no process group.
"""

from __future__ import annotations

import datetime
import math
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from paratrain.config import Config, ConfigError

AXES = ("dp", "pp", "tp")  # mesh order, outermost first: tensor parallel innermost (fastest links)


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
    mesh: object = None  # DeviceMesh with the axes of AXES; built when tp, pp or zero need it

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

            self.mesh = init_device_mesh(self.device.type, tuple(self.degree(a) for a in AXES), mesh_dim_names=AXES)
        return self.mesh

    # ---- coordinates ------------------------------------------------------------------
    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def degree(self, axis: str) -> int:
        """How many ranks the named axis spans."""
        return getattr(self, axis)

    def coord(self, axis: str) -> int:
        """This rank's index along the named axis (ranks are laid out in AXES order, last innermost)."""
        inner = math.prod(self.degree(a) for a in AXES[AXES.index(axis) + 1:])
        return (self.rank // inner) % self.degree(axis)

    @property
    def dp_rank(self) -> int:
        """Rank along the data-parallel axis."""
        return self.coord("dp")

    @property
    def pp_rank(self) -> int:
        """Pipeline stage index of this rank (0 = first stage)."""
        return self.coord("pp")

    @property
    def tp_rank(self) -> int:
        """Rank inside this rank's tensor-parallel group."""
        return self.coord("tp")

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

    def shutdown(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()
