"""One server's parameters and optimizer state, kept as flat tensors.

The server's keys are laid out back to back in two flat parameters -- keys with weight decay
and keys without -- and an optimizer (AdamW or SGD with momentum, configured exactly as the
trainer's ``make_optimizer``) updates them, so a sync-mode step computes the
same numbers as DDP.  Gradients accumulate into flat buffers of the same layout.

The optimizer is written out here (not ``torch.optim``) with the exact operation order of
torch's single-tensor AdamW / SGD, so results match DDP bit for bit in practice, and a
(re)starting server does not pay torch.optim's heavy first-use imports.

Both groups live back to back in one flat tensor, and a PARAMS reply is that tensor as one
frame, sent zero-copy; ZeroMQ may still be reading it when the next update runs, so
:meth:`Shard.apply` first moves the parameters to fresh memory if any reply is still in
flight (copy-on-write, checked through pyzmq's message trackers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from paratrain.ps.placement import KeySpec


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | sgd
    weight_decay: float = 0.01
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8


def group_slots(keys: list[KeySpec]) -> tuple[list[int], dict[int, tuple[int, int]]]:
    """Sizes of the two flat groups (weight decay / none) and each key's (group, offset) in them."""
    sizes = [0, 0]
    slot: dict[int, tuple[int, int]] = {}
    for k in keys:
        g = 0 if k.decay else 1
        slot[k.id] = (g, sizes[g])
        sizes[g] += k.numel
    return sizes, slot


class Grads:
    """A validated push: ``runs`` of dense gradient ``(group, offset, values)``, ``keys`` decoded
    one by one (``(key, ("dense", values) | ("rows", idx, rows))``), ``nkeys`` covered."""

    def __init__(self, runs: list[tuple[int, int, torch.Tensor]], keys: list[tuple[KeySpec, tuple]], nkeys: int):
        self.runs, self.keys, self.nkeys = runs, keys, nkeys

    def __bool__(self) -> bool:
        return self.nkeys > 0


class Shard:
    """Parameters + gradient buffers + optimizer of one server's keys."""

    def __init__(self, keys: list[KeySpec], values: list[torch.Tensor], opt: OptimConfig):
        if len(keys) != len(values):
            raise ValueError("one value per key")
        self.keys = list(keys)
        self.by_id = {k.id: k for k in keys}
        self.opt_cfg = opt
        self.sizes, self.slot = group_slots(keys)
        self.flat = torch.zeros(sum(self.sizes))  # both groups back to back: one PARAMS frame
        self.params = list(self.flat.split(self.sizes))
        self.grads = [torch.zeros(n) for n in self.sizes]
        self.grad_view = {k.id: self.view(self.grads, k) for k in keys}  # (the buffers are never replaced)
        for k, v in zip(keys, values, strict=True):
            self.view(self.params, k).copy_(v.reshape(-1))
        self.optimizer = self._make_optimizer()
        self.alias: list[torch.Tensor | None] = [None] * len(self.grads)  # set_grads: received tensors used as-is
        self.version = 0
        self.trackers: list[Any] = []
        self._wire: tuple[torch.Tensor | None, Any] = (None, None)

    def _make_optimizer(self) -> ServerOptimizer:
        o = self.opt_cfg
        decay = [o.weight_decay, o.weight_decay if o.name == "sgd" else 0.0]
        return ServerOptimizer(o, decay)

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)

    def view(self, bufs: list[torch.Tensor], key: KeySpec) -> torch.Tensor:
        g, off = self.slot[key.id]
        return bufs[g][off:off + key.numel]

    # ---- gradients -------------------------------------------------------------------------
    def zero_grad(self) -> None:
        for g in self.grads:
            g.zero_()

    def add_grads(self, grads: Grads, weight: float = 1.0) -> None:
        """Add ``weight`` x a push's gradients to the buffers (dense parts in one foreach op)."""
        dst = [self.grads[g][off:off + len(t)] for g, off, t in grads.runs]
        src = [t for _, _, t in grads.runs]
        for k, d in grads.keys:
            if d[0] == "dense":
                dst.append(self.grad_view[k.id])
                src.append(d[1])
            else:
                _, idx, rows = d
                self.grad_view[k.id].view(k.shape).index_add_(0, idx, rows, alpha=weight)
        if dst:
            torch._foreach_add_(dst, src, alpha=weight)

    def set_grads(self, grads: Grads) -> None:
        """The next :meth:`apply`'s gradient := one push's.  When the push covers every key densely
        the received tensors are used as they are (one covering a whole group) or copied straight in."""
        self.alias = [None] * len(self.grads)
        if grads.nkeys != len(self.keys) or any(d[0] != "dense" for _, d in grads.keys):
            self.zero_grad()
            self.add_grads(grads)
            return
        dst, src = [], []
        for g, off, t in grads.runs:
            if off == 0 and len(t) == self.sizes[g]:  # the whole group: no copy at all
                self.alias[g] = t
            else:
                dst.append(self.grads[g][off:off + len(t)])
                src.append(t)
        for k, d in grads.keys:
            dst.append(self.grad_view[k.id])
            src.append(d[1])
        if dst:
            torch._foreach_copy_(dst, src)

    def scale_grad(self, factor: float) -> None:
        if factor != 1.0:
            for g in self.grads:
                g.mul_(factor)

    def grad_sqnorm(self) -> float:
        return float(sum(float(g.double().pow(2).sum()) for g in self.grads))

    # ---- update ------------------------------------------------------------------------------
    def _copy_on_write(self) -> None:
        self.trackers = [t for t in self.trackers if not t.done]
        if self.trackers:  # a reply still reads the current memory: update a fresh copy
            self.flat = self.flat.clone()
            self.params = list(self.flat.split(self.sizes))
            self.trackers = []

    def apply(self, lr: float, coef: float = 1.0) -> None:
        """One optimizer step with the accumulated gradient times ``coef``; version += 1."""
        self._copy_on_write()
        grads = [a if a is not None else g for a, g in zip(self.alias, self.grads, strict=True)]
        self.alias = [None] * len(self.grads)
        if coef != 1.0:
            torch._foreach_mul_(grads, coef)
        self.optimizer.step(self.params, grads, lr)
        self.version += 1

    def wire(self) -> Any:
        """:attr:`flat` as a byte array for a PARAMS frame (zero-copy; remade only after a copy-on-write)."""
        if self._wire[0] is not self.flat:
            self._wire = (self.flat, self.flat.view(torch.uint8).numpy())
        return self._wire[1]

    # ---- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"keys": [k.to_json() for k in self.keys], "params": [p.clone() for p in self.params],
                "optimizer": self.optimizer.state_dict(), "version": self.version,
                "opt_cfg": {"name": self.opt_cfg.name, "weight_decay": self.opt_cfg.weight_decay,
                            "momentum": self.opt_cfg.momentum, "betas": list(self.opt_cfg.betas),
                            "eps": self.opt_cfg.eps}}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Shard:
        keys = [KeySpec.from_json(k) for k in state["keys"]]
        o = state["opt_cfg"]
        opt = OptimConfig(o["name"], o["weight_decay"], o["momentum"], tuple(o["betas"]), o["eps"])
        shard = cls(keys, [torch.zeros(k.numel) for k in keys], opt)
        for p, v in zip(shard.params, state["params"], strict=True):
            p.copy_(v)
        shard.optimizer.load_state_dict(state["optimizer"])
        shard.version = int(state["version"])
        return shard


class ServerOptimizer:
    """AdamW / SGD-with-momentum over flat tensors, one state per group (decay, no decay)."""

    def __init__(self, cfg: OptimConfig, weight_decay: list[float]):
        self.cfg, self.weight_decay = cfg, weight_decay
        self.state: list[dict[str, Any]] = [{} for _ in weight_decay]

    def step(self, params: list[torch.Tensor], grads: list[torch.Tensor], lr: float) -> None:
        for param, grad, wd, st in zip(params, grads, self.weight_decay, self.state, strict=True):
            if not param.numel():  # (a group without keys: no state either)
                continue
            if self.cfg.name == "sgd":
                self._sgd(param, grad, wd, st, lr)
            else:
                self._adamw(param, grad, wd, st, lr)

    def _adamw(self, param: torch.Tensor, grad: torch.Tensor, wd: float, st: dict, lr: float) -> None:
        beta1, beta2 = self.cfg.betas
        if not st:
            st.update(step=0, exp_avg=torch.zeros_like(param), exp_avg_sq=torch.zeros_like(param))
        st["step"] += 1
        step = float(st["step"])
        if wd != 0:
            param.mul_(1 - lr * wd)
        st["exp_avg"].lerp_(grad, 1 - beta1)
        st["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1 = 1 - beta1**step
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        denom = (st["exp_avg_sq"].sqrt() / bias_correction2_sqrt).add_(self.cfg.eps)
        param.addcdiv_(st["exp_avg"], denom, value=-(lr / bias_correction1))

    def _sgd(self, param: torch.Tensor, grad: torch.Tensor, wd: float, st: dict, lr: float) -> None:
        if wd != 0:
            grad = grad.add(param, alpha=wd)
        if self.cfg.momentum != 0:
            if "momentum_buffer" not in st:
                st["momentum_buffer"] = grad.detach().clone()
            else:
                st["momentum_buffer"].mul_(self.cfg.momentum).add_(grad)
            grad = st["momentum_buffer"]
        param.add_(grad, alpha=-lr)

    def state_dict(self) -> list[dict[str, Any]]:
        return [dict(s) for s in self.state]

    def load_state_dict(self, state: list[dict[str, Any]]) -> None:
        self.state = [dict(s) for s in state]


def clip_coef(sqnorm: float, max_norm: float) -> float:
    """The factor ``clip_grad_norm_`` would scale gradients by (1.0 when not clipping)."""
    if max_norm <= 0:
        return 1.0
    return min(1.0, max_norm / (math.sqrt(sqnorm) + 1e-6))


def save_shard(path: Path, shard: Shard, extra: dict[str, Any]) -> None:
    """Write shard + server bookkeeping atomically (temp file, then rename)."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"shard": shard.state_dict(), **extra}, tmp)
    tmp.replace(path)
