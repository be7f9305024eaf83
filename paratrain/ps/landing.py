"""Where a server's PARAMS reply lands in a worker's model: in the parameters' own memory.

A reply is one frame of fp32 values, the server's keys in (group, offset) order.  The worker lays
every parameter that one server holds whole out the same way: consecutive such parameters
become views into one buffer (a *run*), so installing a reply costs one copy per run, however
many parameters the model has, instead of one small copy per parameter.  (The received
frame itself is not adopted as parameter memory: ZeroMQ's buffers are only 8-byte aligned,
and compiled kernels copy misaligned inputs.)  Chunks of parameters split over servers (and
parameters that are not fp32) are copied on their own, in one foreach call.  Something that
later replaces a parameter's storage (``p.data = ...``) is noticed at the next install (the
storage pointers changed) and the runs are laid out again.
"""

from __future__ import annotations

import numpy as np
import torch

from paratrain.ps.placement import KeySpec
from paratrain.ps.protocol import frame_tensor
from paratrain.ps.shard import group_slots


class Run:
    """Parameters held whole by one server, back to back at ``[start, end)`` of its reply."""

    def __init__(self, keys: list[KeySpec], start: int):
        self.keys, self.start = keys, start
        self.end = start + sum(k.numel for k in keys)
        self.buf: torch.Tensor | None = None
        self.np: np.ndarray | None = None  # buf's numpy view


class Landing:
    """The model's parameters as runs of the servers' reply layouts (built on first use)."""

    def __init__(self, params: list[torch.Tensor], keys_of: list[list[KeySpec]]):
        self.params, self.keys_of = params, keys_of
        self.runs: list[list[Run]] = []  # per server
        self.rest: list[tuple[list[torch.Tensor], list[tuple[int, int]]]] = []  # per server: (dst, spans)
        self.ptrs: tuple[int, ...] = ()

    def numel(self, server: int) -> int:
        """Elements of server ``server``'s PARAMS frame."""
        return sum(group_slots(self.keys_of[server])[0])

    def land(self, server: int, frame: memoryview) -> None:
        """Install server ``server``'s reply: ``frame``, the raw bytes of its fp32 values
        (numpy copies straight out of ZeroMQ's buffer, aligned or not)."""
        if self._pointers() != self.ptrs:
            self._lay_out()
        for run in self.runs[server]:
            np.copyto(run.np, np.frombuffer(frame, np.float32, run.end - run.start, 4 * run.start))
        dst, spans = self.rest[server]
        if dst:
            flat = frame_tensor(frame, torch.float32, (len(frame) // 4,))
            with torch.no_grad():
                torch._foreach_copy_(dst, [flat[a:b] for a, b in spans])

    def _pointers(self) -> tuple[int, ...]:
        return tuple(p.data_ptr() for p in self.params)

    def _whole(self, k: KeySpec) -> bool:
        p = self.params[k.param]
        return k.numel > 0 and k.numel == p.numel() and p.dtype == torch.float32 and p.is_contiguous()

    def _lay_out(self) -> None:
        self.runs, self.rest = [], []
        for keys in self.keys_of:
            sizes, slot = group_slots(keys)
            at = {k.id: slot[k.id][1] + (sizes[0] if slot[k.id][0] else 0) for k in keys}
            runs: list[Run] = []
            dst, spans = [], []
            for k in sorted(keys, key=lambda k: at[k.id]):
                if self._whole(k):
                    if runs and runs[-1].end == at[k.id]:
                        runs[-1].keys.append(k)
                        runs[-1].end += k.numel
                    else:
                        runs.append(Run([k], at[k.id]))
                elif k.numel:
                    dst.append(self.params[k.param].data.view(-1)[k.offset:k.offset + k.numel])
                    spans.append((at[k.id], at[k.id] + k.numel))
            with torch.no_grad():
                for run in runs:  # the current values move into the run's own buffer
                    buf = torch.cat([self.params[k.param].data.view(-1) for k in run.keys])
                    self._point(run, buf)
            self.runs.append(runs)
            self.rest.append((dst, spans))
        self.ptrs = self._pointers()

    def _point(self, run: Run, buf: torch.Tensor) -> None:
        """Make ``buf`` the memory of ``run``'s parameters (each a view of its part)."""
        off = 0
        for k in run.keys:
            p = self.params[k.param]
            p.data = buf[off:off + k.numel].view(p.shape)
            off += k.numel
        run.buf, run.np = buf, buf.numpy()
