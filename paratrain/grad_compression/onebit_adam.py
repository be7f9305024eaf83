"""1-bit Adam for data parallel: AdamW whose gradient exchange is one bit per coordinate.

Top-k and the other gradient codecs compress what DDP all-reduces and leave AdamW as it is.
With AdamW that goes badly for sparse codecs (docs/compression.md): a residual that error
feedback sends late is normalised by Adam's per-coordinate variance as if it were one
ordinary gradient. 1-bit Adam (Tang et al. 2021) moves the compression into the optimizer
instead, where the update can be made linear in what is sent. Per step, on each rank r:

1. the local gradient ``g_r`` (DDP's all-reduce is switched off) updates a local variance
   ``u_r = b2 u_r + (1 - b2) g_r^2``; then it is clipped to ``clip`` by its own norm (no
   bytes needed for a global norm) and enters a local momentum ``m_r = b1 m_r + (1 - b1) g_r / W``;
2. the rank sends ``sign(m_r + e_r)`` (one bit per coordinate) and one fp32 scale per run of
   ``chunk`` = 1024 coordinates of a tensor, ``mean |m_r + e_r|`` over the run; the error
   feedback ``e_r`` keeps what the sign code lost;
3. every rank sums the W decoded messages into the same ``m`` (same order everywhere, so
   replicas stay identical) and steps ``p <- p (1 - lr wd) - lr m / (sqrt(v) + eps)``;
4. ``v`` is frozen between syncs, so the update is linear in ``m`` and what error feedback
   delays still arrives in full. After steps 1, 2, 4, 8, ... it becomes the ranks' mean
   ``u_r`` (bias-corrected), one bf16 all-reduce (0/1 Adam's schedule). Step 1, before any
   sync, divides by the decoded momentum's own magnitude: a sign step, as Adam's first is.

Three details decide the quality (2-rank runs on the default GPT, 300 steps; docs/benchmarks.md):
the variance comes from the unclipped gradient, it is synced after (not before) the update,
and scales cover 1024 coordinates rather than a whole tensor (val loss 1.088x -> 1.050x fp32).
benchmarks/compression_sim.py reproduces this class's 2-rank run (per-tensor scales) to 0.1%.
Bytes one rank sends per step: ``(W - 1) (4 ceil(numel / chunk) + numel / 8)`` summed over
tensors (all-gather), plus a ring all-reduce of the bf16 variance at the sync steps. The
local momentum, residual and variance differ between ranks, so each rank checkpoints its own
state.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist

from paratrain.grad_compression.codecs import pack_bits, unpack_bits
from paratrain.grad_compression.hooks import allgather_bytes, ring_allreduce_bytes


def pack_signs(x: torch.Tensor) -> torch.Tensor:
    """One bit per element of the flat ``x`` (1: ``x >= 0``), eight to a byte, zero-padded."""
    return pack_bits(x >= 0)


def unpack_signs(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The ±1.0 float vector of length ``n`` that :func:`pack_signs` encoded."""
    return unpack_bits(packed, n).float().mul_(2).sub_(1)


def is_sync_step(t: int) -> bool:
    """Steps at which the variance is all-reduced: 1, 2, 4, 8, ..."""
    return t > 0 and t & (t - 1) == 0



def run_closure(closure: Any) -> Any:
    """The loss of an optimizer ``step(closure)``: the closure re-evaluated with grad on, or None."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class OneBitAdam(torch.optim.Optimizer):
    """AdamW with sign-compressed momentum and error feedback, exchanged over ``group`` itself.

    Give it the *local* (un-averaged) gradients: under DDP the strategy installs a comm hook
    that leaves them local. ``group=None`` outside torch.distributed: one rank, no traffic.
    ``comm_bytes`` counts what this rank sent since the last :meth:`take_comm_bytes`."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-8, weight_decay: float = 0.0, clip: float = 0.0, chunk: int = 1024,
                 group: Any = None):
        if lr < 0 or eps < 0 or weight_decay < 0 or chunk < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"bad OneBitAdam parameters lr={lr} betas={betas} eps={eps} weight_decay={weight_decay}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})
        self.group, self.clip = group, float(clip)
        self.chunk = int(chunk)
        self.clips_locally = True  # the trainer must not clip first: the variance wants the raw gradient
        self.last_grad_norm = 0.0
        self.world = dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1
        self.comm_bytes = 0

    def take_comm_bytes(self) -> int:
        n, self.comm_bytes = self.comm_bytes, 0
        return n

    def _state(self, p: torch.Tensor) -> dict[str, Any]:
        st = self.state[p]
        if not st:
            st["step"] = torch.tensor(0.0)
            for key in ("exp_avg", "error", "local_sq", "exp_avg_sq"):
                st[key] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            st["var_step"] = torch.tensor(0.0)  # step of the last variance sync (its bias correction)
        return st

    def _scales(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean |x| over each run of ``chunk`` coordinates of the flat ``x`` (the last run may be
        shorter; ``chunk = 0``: one run), and the runs' lengths."""
        flat = x.reshape(-1)
        n = flat.numel()
        if n == 0:
            return flat.new_zeros(0, dtype=torch.float32), torch.zeros(0, dtype=torch.long, device=x.device)
        c = self.chunk if 0 < self.chunk < n else n
        k = -(-n // c)
        sums = torch.nn.functional.pad(flat.abs(), (0, k * c - n)).view(k, c).sum(1)
        counts = torch.full((k,), c, device=x.device)
        counts[-1] = n - (k - 1) * c
        return (sums / counts).float(), counts

    def _exchange(self, xs: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Sign-encode each ``x``, all-gather; return (the sum over ranks of the decoded tensors,
        what this rank's own message decodes to), both in ``xs``'s order and shapes."""
        flat = torch.cat([x.reshape(-1) for x in xs])
        parts = [self._scales(x) for x in xs]
        scales = torch.cat([sc for sc, _ in parts])
        runs = torch.cat([counts for _, counts in parts])
        msg = torch.cat([scales.view(torch.uint8), pack_signs(flat)])  # scales first: aligned for .view
        own = torch.where(flat >= 0, 1.0, -1.0) * torch.repeat_interleave(scales, runs)
        if self.world > 1:
            self.comm_bytes += allgather_bytes(msg.numel(), self.world)
            msgs = [torch.empty_like(msg) for _ in range(self.world)]
            dist.all_gather(msgs, msg, group=self.group)
            n, n_scale = flat.numel(), 4 * scales.numel()
            total = torch.zeros(n, dtype=torch.float32, device=flat.device)
            for m in msgs:  # the same order on every rank: identical sums, identical replicas
                total += unpack_signs(m[n_scale:], n) * torch.repeat_interleave(m[:n_scale].view(torch.float32), runs)
        else:
            total = own
        sizes = [x.numel() for x in xs]

        def shaped(t: torch.Tensor) -> list[torch.Tensor]:
            return [c.view_as(x).to(x.dtype) for c, x in zip(t.split(sizes), xs, strict=True)]

        return shaped(total), shaped(own)

    def _sync_variance(self, params: list[torch.Tensor], t: int) -> None:
        u = torch.cat([self.state[p]["local_sq"].reshape(-1) for p in params])
        if self.world > 1:  # in bf16: fp32's range, and sqrt(v) needs no more than its 3 digits
            wire = u.to(torch.bfloat16)
            self.comm_bytes += ring_allreduce_bytes(wire.numel() * wire.element_size(), self.world)
            dist.all_reduce(wire, group=self.group)
            u = wire.float() / self.world
        for p, v in zip(params, u.split([p.numel() for p in params]), strict=True):
            self.state[p]["exp_avg_sq"].copy_(v.view_as(p))
            self.state[p]["var_step"].fill_(t)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = run_closure(closure)
        params = [p for g in self.param_groups for p in g["params"]]
        if not params:
            return loss
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]  # all ranks send all
        self.last_grad_norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
        coef = min(1.0, self.clip / (self.last_grad_norm + 1e-6)) if self.clip > 0 else 1.0
        xs, i = [], 0
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                st, g = self._state(p), grads[i]
                st["step"] += 1
                st["local_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
                st["exp_avg"].mul_(beta1).add_(g, alpha=(1 - beta1) * coef / self.world)
                xs.append(st["exp_avg"] + st["error"])
                i += 1
        t = int(self.state[params[0]]["step"])
        decoded, own = self._exchange(xs)
        for p, x, mine in zip(params, xs, own, strict=True):
            self.state[p]["error"].copy_(x - mine)
        i = 0
        for group in self.param_groups:
            lr, eps, wd, beta2 = group["lr"], group["eps"], group["weight_decay"], group["betas"][1]
            for p in group["params"]:
                st = self.state[p]
                if int(st["var_step"]) == 0:  # no synced variance yet: a sign step, like Adam's first
                    denom = decoded[i].abs().add(eps)
                else:
                    denom = (st["exp_avg_sq"] / (1 - beta2 ** float(st["var_step"]))).sqrt_().add_(eps)
                p.mul_(1 - lr * wd)
                p.addcdiv_(decoded[i], denom, value=-lr)
                i += 1
        if is_sync_step(t):
            self._sync_variance(params, t)
        return loss
