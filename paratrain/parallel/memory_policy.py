"""Memory policies that work under every layout: activation checkpointing and fp16 loss scaling.

Activation checkpointing (``train.activation_checkpointing``):

- ``"full"``: every Transformer block is wrapped in a non-reentrant ``checkpoint_wrapper``;
  only its input is kept, everything inside is recomputed in the backward pass.
- ``"selective"``: only the attention ``core`` (scores, softmax, dropout, the product with V)
  is recomputed, the part Korthikanti et al. show is large in memory and cheap to redo.
- ``"selective_op"``: per-op selective checkpointing of every block (torchtitan's op-level
  SAC, ``torch.utils.checkpoint.create_selective_checkpoint_contexts``): the outputs of
  matmuls, attention kernels and reduce-scatters are saved, everything else (norms,
  activations, dropout, residual adds: cheap element-wise work) is recomputed, so the extra
  backward cost stays far below a full forward.

Mixed precision keeps fp32 parameters (the master weights), fp32 gradients and fp32
reductions: the forward runs under autocast; fp16 adds dynamic loss scaling, with the
overflow check agreed by every rank so that sharded gradients skip a step together.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    CheckpointWrapper,
    checkpoint_wrapper,
)
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from paratrain.config import ConfigError
from paratrain.models.blocks import AttentionCore, MultiHeadAttention

AC_PREFIX = "_checkpoint_wrapped_module."


def blocks_of(model: nn.Module) -> list[nn.Module]:
    """The repeated Transformer blocks: ``layer_modules()`` when the model has it (paratrain's
    models, pipeline chunks of them), else every ModuleDict entry holding one of paratrain's
    attention layers."""
    if callable(getattr(model, "layer_modules", None)):
        return [b for b in model.layer_modules() if b is not None]
    return [b for c in model.modules() if isinstance(c, nn.ModuleDict) for b in c.values()
            if b is not None and any(isinstance(m, MultiHeadAttention) for m in b.modules())]


def _replace(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    for parent in model.modules():
        for name, child in parent.named_children():
            if child is old:
                setattr(parent, name, new)
                return
    raise ValueError("block not found in model")


def apply_activation_checkpointing(model: nn.Module, mode: str, blocks: list[nn.Module] | None = None) -> int:
    """Wrap ``blocks`` (default: the model's own, see :func:`_blocks`) ("full") or attention cores
    ("selective") for recomputation; returns how many.

    Idempotent: modules already wrapped are left alone.  Parameter names gain the
    ``_checkpoint_wrapped_module.`` infix ("full"); state dicts do not (the wrapper strips it).
    """
    if mode == "none":
        return 0
    n = 0
    if mode == "full":
        for block in blocks if blocks is not None else blocks_of(model):
            if not isinstance(block, CheckpointWrapper):
                _replace(model, block, checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT))
                n += 1
        return n
    if mode == "selective_op":
        for block in blocks_of(model):
            if not isinstance(block, CheckpointWrapper):
                _replace(model, block, checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT,
                                                          context_fn=op_sac_context))
                n += 1
        return n
    if mode == "selective":
        attns = [m for m in model.modules() if isinstance(getattr(m, "core", None), (AttentionCore, CheckpointWrapper))
                 and not isinstance(m, CheckpointWrapper)]
        if not attns and any(True for _ in model.parameters()):
            raise ConfigError("train.activation_checkpointing = 'selective' needs paratrain's attention "
                              "layers (AttentionCore); use 'full' for this model")
        for m in attns:
            if not isinstance(m.core, CheckpointWrapper):
                m.core = checkpoint_wrapper(m.core, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
                n += 1
        return n
    raise ValueError(f"unknown activation_checkpointing {mode!r} (none | full | selective | selective_op)")


def _saved_ops() -> set:
    """The ops whose outputs op-level SAC keeps: matmuls, attention kernels, reduce-scatters."""
    aten = torch.ops.aten
    names = ["mm", "addmm", "bmm", "baddbmm", "_scaled_mm", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
             "_scaled_dot_product_flash_attention_for_cpu"]
    ops = {getattr(aten, n).default for n in names if hasattr(aten, n)}
    c10d = getattr(torch.ops, "_c10d_functional", None)
    if c10d is not None and hasattr(c10d, "reduce_scatter_tensor"):
        ops.add(c10d.reduce_scatter_tensor.default)
    return ops


def _op_policy(ctx, func, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if func in _SAVED else CheckpointPolicy.PREFER_RECOMPUTE


_SAVED = _saved_ops()


def op_sac_context():
    """Forward / recompute contexts of one op-level selective checkpoint (``selective_op``)."""
    return create_selective_checkpoint_contexts(_op_policy)


def clean_name(name: str) -> str:
    """A parameter name without the checkpoint-wrapper (and DDP) infixes: the model's own FQN."""
    name = name.replace(AC_PREFIX, "")
    return name[len("module."):] if name.startswith("module.") else name


class LossScaler:
    """Dynamic loss scaling for fp16 (the GradScaler rule), with a world-wide overflow vote.

    ``torch.amp.GradScaler`` decides on overflow per rank; with sharded gradients (ZeRO,
    TP, PP) ranks see different shards and could disagree, so one rank would skip a step
    the others take.  Here the "found inf" flag is all-reduced (MAX) before deciding.
    """

    def __init__(self, init_scale: float = 2.0**16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000) -> None:
        self.scale = init_scale
        self.growth_factor, self.backoff_factor = growth_factor, backoff_factor
        self.growth_interval = growth_interval
        self.good_steps = 0
        self.skipped = 0

    def unscale_(self, params: Iterable[torch.Tensor], distributed: bool) -> bool:
        """Divide gradients by the scale; return False (and back off) if any rank overflowed."""
        grads = [p.grad for p in params if p.grad is not None]
        local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
        found = torch.zeros(1)
        for g in local:
            if not torch.isfinite(g).all():
                found[0] = 1.0
                break
        if distributed:
            dist.all_reduce(found, op=dist.ReduceOp.MAX)
        if found[0] > 0:
            self.scale *= self.backoff_factor
            self.good_steps = 0
            self.skipped += 1
            return False
        inv = 1.0 / self.scale
        for g in local:
            g.mul_(inv)
        self.good_steps += 1
        if self.good_steps % self.growth_interval == 0:
            self.scale *= self.growth_factor
        return True

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps, "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.good_steps = float(state["scale"]), int(state["good_steps"])
        self.skipped = int(state.get("skipped", 0))
