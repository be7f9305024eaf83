"""Pushes that leave during backward: a server's gradients go as soon as backward has made them.

DDP hides its all-reduce behind backward by sending each bucket once its gradients are ready.
Here the bucket is one server's share: :class:`EarlyPush` hooks every parameter
(``register_post_accumulate_grad_hook``, called once per backward after the gradient is
accumulated into ``.grad``) and keeps, per server, the parameters it still waits for.  When
the last one of a server arrives, that server's push goes out
(:meth:`~paratrain.ps.worker.PSWorker.push_early`) while backward computes the rest; the
server applies it meanwhile, and ``step`` pushes only the servers still missing.  The
``ordered`` placement deals the parameters out in backward's order, so the servers complete
one after another; more servers give finer buckets, and apply their shards in parallel.

It is only sound where a pushed gradient is final and nothing else is in flight, so
:class:`~paratrain.ps.strategy.PSSync` arms it only

* in sync and ssp mode (in async the previous push is still in flight, and installing its
  reply during backward would change tensors autograd saved);
* without worker-side clipping (ssp with ``train.grad_clip > 0`` needs the global norm first;
  sync clips on the servers, after the pushes);
* on a step's last micro-batch (the earlier ones accumulate: see :meth:`EarlyPush.paused`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from paratrain.ps.placement import KeySpec


class EarlyPush:
    """Calls ``push(server)`` during an armed backward once all of that server's gradients are final."""

    def __init__(self, params: list[torch.Tensor], keys_of: list[list[KeySpec]], push: Callable[[int], None]):
        self.push = push
        self.params_of = [frozenset(k.param for k in keys) for keys in keys_of]
        self.servers_of: list[list[int]] = [[] for _ in params]
        for i, mine in enumerate(self.params_of):
            for p in mine:
                self.servers_of[p].append(i)
        self.waiting: list[set[int]] | None = None  # armed: per server, the parameters not ready yet
        self.handles = [p.register_post_accumulate_grad_hook(lambda _, j=j: self._ready(j))
                        for j, p in enumerate(params)]

    def arm(self) -> None:
        """The next backward makes final gradients: push each server as its share completes."""
        self.waiting = [set(mine) for mine in self.params_of]

    def disarm(self) -> None:
        self.waiting = None

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """A micro-batch whose gradients are accumulated, not final."""
        waiting, self.waiting = self.waiting, None
        try:
            yield
        finally:
            self.waiting = waiting

    def _ready(self, j: int) -> None:
        if self.waiting is None:
            return
        for i in self.servers_of[j]:
            left = self.waiting[i]
            if left:
                left.discard(j)
                if not left:
                    self.push(i)

    def close(self) -> None:
        """Remove the hooks."""
        for h in self.handles:
            h.remove()
        self.handles = []
