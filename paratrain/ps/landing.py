"""Where a server's PARAMS reply lands in a worker's model: in the parameters' own memory.

A reply is one flat fp32 tensor, the server's keys in (group, offset) order.  The worker lays
every parameter that one server holds whole out the same way: consecutive such parameters
become views into one buffer (a *run*), so installing a reply is one copy per run, however
many parameters the model has, instead of one small copy per parameter.  Chunks of parameters
split over servers (and parameters that are not fp32) are copied on their own, in one foreach
call.  Something that later replaces a parameter's storage (``p.data = ...``) is noticed at
the next install (the storage pointers changed) and the runs are laid out again.
"""

from __future__ import annotations

import torch

from paratrain.ps.placement import KeySpec
from paratrain.ps.shard import group_slots


class Landing:
    """The model's parameters as runs of the servers' reply layouts (built on first use)."""

    def __init__(self, params: list[torch.Tensor], keys_of: list[list[KeySpec]]):
        self.params, self.keys_of = params, keys_of
        self.runs: list[list[tuple[int, int, torch.Tensor]]] = []  # per server: (start, end, buffer)
        self.rest: list[tuple[list[torch.Tensor], list[tuple[int, int]]]] = []  # per server: (dst, spans)
        self.ptrs: tuple[int, ...] = ()

    def numel(self, server: int) -> int:
        """Elements of server ``server``'s PARAMS frame."""
        return sum(group_slots(self.keys_of[server])[0])

    def land(self, server: int, flat: torch.Tensor) -> None:
        """Install server ``server``'s reply ``flat`` into the parameters."""
        if tuple(p.data_ptr() for p in self.params) != self.ptrs:
            self._lay_out()
        with torch.no_grad():
            for a, b, buf in self.runs[server]:
                buf.copy_(flat[a:b])
            dst, spans = self.rest[server]
            if dst:
                torch._foreach_copy_(dst, [flat[a:b] for a, b in spans])

    def _whole(self, k: KeySpec) -> bool:
        p = self.params[k.param]
        return k.numel > 0 and k.numel == p.numel() and p.dtype == torch.float32 and p.is_contiguous()

    def _lay_out(self) -> None:
        self.runs, self.rest = [], []
        for keys in self.keys_of:
            sizes, slot = group_slots(keys)
            at = {k.id: slot[k.id][1] + (sizes[0] if slot[k.id][0] else 0) for k in keys}
            runs: list[list[KeySpec]] = []
            dst, spans = [], []
            for k in sorted(keys, key=lambda k: at[k.id]):
                if self._whole(k):
                    if runs and at[runs[-1][-1].id] + runs[-1][-1].numel == at[k.id]:
                        runs[-1].append(k)
                    else:
                        runs.append([k])
                elif k.numel:
                    dst.append(self.params[k.param].data.view(-1)[k.offset:k.offset + k.numel])
                    spans.append((at[k.id], at[k.id] + k.numel))
            self.runs.append([self._adopt(run, at[run[0].id]) for run in runs])
            self.rest.append((dst, spans))
        self.ptrs = tuple(p.data_ptr() for p in self.params)

    def _adopt(self, run: list[KeySpec], start: int) -> tuple[int, int, torch.Tensor]:
        """One buffer for a run of whole parameters; each parameter becomes a view into it."""
        buf = torch.empty(sum(k.numel for k in run))
        off = 0
        with torch.no_grad():
            for k in run:
                p = self.params[k.param]
                view = buf[off:off + k.numel]
                view.copy_(p.data.view(-1))
                p.data = view.view(p.shape)
                off += k.numel
        return start, start + off, buf
