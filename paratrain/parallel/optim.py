"""The optimizer factory: one place that turns ``[train]`` into a torch optimizer for every layout.

- AdamW (decay on matrices only, as GPT-2 does), SGD with momentum, or 1-bit Adam.
- The implementation: on GPUs the fused AdamW kernel (one launch for all tensors); on CPUs
  the ``foreach`` (multi-tensor) path for plain tensors - element for element the same
  arithmetic as the per-tensor loop, so layouts stay in parity - and the per-tensor loop
  for DTensor shards (FSDP2, tensor parallel), whose meshes may differ within one group.
- ``train.optim_state_dtype = "bf16"`` keeps AdamW's two moments in bfloat16 (half of
  Adam's 8 bytes per parameter); the update itself is computed in fp32 from them.
- Float8 with FSDP2: the weight scales are recomputed after each step (see
  :mod:`paratrain.parallel.float8`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from paratrain.config import Config
from paratrain.grad_compression.onebit_adam import OneBitAdam
from paratrain.parallel.float8 import register_float8_step_hook

BETAS, EPS = (0.9, 0.95), 1e-8


def param_groups(model: nn.Module, cfg: Config) -> list[dict]:
    """Two AdamW groups: weight decay on matrices, none on vectors (biases, norms)."""
    params = [p for p in model.parameters() if p.requires_grad]
    wd = cfg.train.weight_decay
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": wd},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def optimizer_kwargs(cfg: Config, params: list[torch.Tensor] | None = None) -> tuple[type, dict[str, Any]]:
    """The optimizer class and its constructor arguments (besides the parameters) for ``params``."""
    t = cfg.train
    if t.optimizer == "sgd":
        return torch.optim.SGD, {"lr": t.lr, "momentum": t.momentum}
    if t.optim_state_dtype == "bf16":
        return AdamWBf16State, {"lr": t.lr, "betas": BETAS, "eps": EPS}
    params = params or []
    if params and all(p.device.type == "cuda" for p in params):
        impl = {"fused": True}
    else:
        impl = {"foreach": not any(isinstance(p, DTensor) for p in params)}
    return torch.optim.AdamW, {"lr": t.lr, "betas": BETAS, "eps": EPS, **impl}


def make_optimizer(model: nn.Module, cfg: Config, group: Any = None) -> torch.optim.Optimizer:
    """The local optimizer over ``model``'s trainable parameters; 1-bit Adam exchanges its
    compressed momentum over ``group`` itself."""
    t = cfg.train
    params = [p for p in model.parameters() if p.requires_grad]
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    groups = param_groups(model, cfg)
    if t.optimizer == "onebit_adam":

        return OneBitAdam(groups, lr=t.lr, betas=BETAS, eps=EPS, clip=t.grad_clip, group=group)
    cls, kw = optimizer_kwargs(cfg, params)
    opt = cls(groups, **kw)
    if t.float8 != "none":

        register_float8_step_hook(model, opt, cfg)
    return opt


class AdamWBf16State(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias-corrected) whose moments are stored in bfloat16.

    Each step reads the moments into fp32, updates them and the parameter in fp32, and
    stores them back rounded to bf16.  Works on plain tensors and DTensor shards alike.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = BETAS, eps: float = EPS,
                 weight_decay: float = 0.01) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - torch.optim.Optimizer.step
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            b1, b2 = group["betas"]
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = torch.zeros((), dtype=torch.float32)
                    st["exp_avg"] = torch.zeros_like(p, dtype=torch.bfloat16)
                    st["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.bfloat16)
                st["step"] += 1
                n = float(st["step"])
                g = p.grad.float()
                m = st["exp_avg"].float().lerp_(g, 1 - b1)
                v = st["exp_avg_sq"].float().mul_(b2).addcmul_(g, g, value=1 - b2)
                st["exp_avg"].copy_(m)
                st["exp_avg_sq"].copy_(v)
                p.mul_(1 - lr * wd)
                denom = (v / (1 - b2**n)).sqrt_().add_(eps)
                p.addcdiv_(m, denom, value=-lr / (1 - b1**n))
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """Load, then store the moments in bf16 again (the base class casts them to the parameter's dtype)."""
        super().load_state_dict(state_dict)
        for st in self.state.values():
            for key in ("exp_avg", "exp_avg_sq"):
                if key in st:
                    st[key] = st[key].to(torch.bfloat16)
