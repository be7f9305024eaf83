"""AdamW with a frozen second moment, for runs whose gradients are compressed with error feedback.

1-bit Adam (Tang et al. 2021, "1-bit Adam: Communication Efficient Large-Scale Training
with Adam's Convergence Speed") and 0/1 Adam (Lu et al. 2022) observe that Adam's
variance ``v`` stabilises early, and freeze it after a warm-up.  From then on the update

    p <- p (1 - lr wd) - lr / (1 - beta1^t) * m / (sqrt(v_frozen / bc2_frozen) + eps)

is *linear* in the gradient (``m`` is a linear filter of the gradients), so what error
feedback delays (a residual sent many steps late) moves each weight as far as it would
have moved had it been sent at once, as with SGD.  With an adaptive ``v`` a coordinate
that receives its accumulated residual once is normalised by that spike itself and
moves about as far as one ordinary gradient would (docs/benchmarks.md, "Gradient
compression").

``freeze_after = N``: steps 1..N are exactly :class:`torch.optim.AdamW` (``foreach=False``
rounding); from step N+1 on ``exp_avg_sq`` and its bias correction ``1 - beta2^N`` stay
as they were after step N.  ``N = 0`` never freezes (plain AdamW).  The state
(``step``, ``exp_avg``, ``exp_avg_sq``) has AdamW's names and shapes, so checkpoints and
``state_dict`` / ``load_state_dict`` work as for AdamW, and ``freeze_after`` is part of
each param group.  ``variance_floor = c`` > 0 raises, once at the freeze, every entry of
``exp_avg_sq`` to at least ``c`` times its tensor's mean, so that no coordinate keeps a
near-zero frozen variance (its update would be ``m / eps``).

Status: an experiment, not wired into ``make_optimizer``.  ``benchmarks/compression_sim.py``
uses it (``freeze_v_after``, ``v_sync`` knobs); on the default GPT it did not bring top-k 1%
with error feedback closer to fp32 (docs/benchmarks.md, "Gradient compression").  What the
simulation found to work, sign-compressed local momentum with synced variance, is the
optimizer ``train.optimizer = "onebit_adam"`` (:mod:`paratrain.grad_compression.onebit_adam`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from paratrain.grad_compression.onebit_adam import run_closure


class FrozenVarianceAdamW(torch.optim.Optimizer):
    """AdamW whose second moment stops updating after ``freeze_after`` steps (1-bit Adam's rule)."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, freeze_after: int = 0,
                 variance_floor: float = 0.0):
        if lr < 0 or eps < 0 or weight_decay < 0 or freeze_after < 0:
            raise ValueError(f"bad FrozenVarianceAdamW parameters lr={lr} eps={eps} "
                             f"weight_decay={weight_decay} freeze_after={freeze_after}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
                    "freeze_after": int(freeze_after), "variance_floor": float(variance_floor)}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = run_closure(closure)
        for group in self.param_groups:
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            beta1, beta2 = group["betas"]
            freeze = group["freeze_after"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError("FrozenVarianceAdamW does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = int(state["step"].item())
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                p.mul_(1 - lr * wd)
                exp_avg.lerp_(grad, 1 - beta1)
                if freeze <= 0 or t <= freeze:  # AdamW; afterwards v and its bias correction stay put
                    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                    if t == freeze and group["variance_floor"] > 0:  # no coordinate frozen near 0
                        exp_avg_sq.clamp_(min=float(exp_avg_sq.mean()) * group["variance_floor"])
                bias_correction1 = 1 - beta1 ** t
                bias_correction2 = 1 - beta2 ** (t if freeze <= 0 else min(t, freeze))
                denom = (exp_avg_sq.sqrt() / bias_correction2 ** 0.5).add_(eps)
                p.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)
        return loss
