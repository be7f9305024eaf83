"""Pruning: global magnitude masks (one-shot, cubic schedule, N:M) and structured head/neuron removal.

Unstructured pruning zeroes individual weights of the prunable ``nn.Linear`` layers (every
Linear whose weight is not tied to an embedding table) and keeps a mask per weight; the
dense kernels do not get faster, but the zeros compress on disk (see
:mod:`paratrain.model_compression.export`).  Structured pruning removes whole FFN neurons
(rows of ``fc1`` and columns of ``fc2``) and attention heads (``head_dim`` rows of
``q/k/v_proj`` and columns of ``out_proj``) by replacing those Linears with smaller ones,
so the model really gets smaller and faster.  Attention derives its head count from the
``q_proj`` output width, so removing whole heads needs no change to the model code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from paratrain.config import ConfigError
from paratrain.models.blocks import FeedForward, MultiHeadAttention
from paratrain.models.loss import lm_loss_sum

LossFn = Callable[[nn.Module, dict[str, Tensor]], Tensor]


# ---- unstructured --------------------------------------------------------------------------


def prunable_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """(name, module) of every Linear whose weight is not shared with an embedding table."""
    emb = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and id(m.weight) not in emb]


def global_magnitude_masks(weights: list[Tensor], sparsity: float) -> list[Tensor]:
    """Boolean keep-masks that zero exactly ``round(sparsity * total)`` weights, the smallest
    in magnitude across all ``weights`` together (ties broken by position)."""
    if not 0.0 <= sparsity < 1.0:
        raise ConfigError(f"sparsity {sparsity} must be in [0, 1)")
    flat = torch.cat([w.detach().abs().flatten().float() for w in weights])
    k = round(sparsity * flat.numel())
    keep = torch.ones_like(flat, dtype=torch.bool)
    if k:
        # a stable sort makes the choice among equal magnitudes deterministic
        keep[torch.sort(flat, stable=True).indices[:k]] = False
    return [m.view_as(w) for m, w in zip(keep.split([w.numel() for w in weights]), weights, strict=True)]


def nm_mask(weight: Tensor, n: int = 2, m: int = 4) -> Tensor:
    """N:M keep-mask: in each group of ``m`` consecutive inputs of a row keep the ``n`` largest."""
    if not 0 < n < m:
        raise ConfigError(f"N:M sparsity needs 0 < N < M, got {n}:{m}")
    out_f, in_f = weight.shape
    if in_f % m:
        raise ConfigError(f"N:M sparsity {n}:{m} needs input width divisible by {m}, got {in_f}")
    groups = weight.detach().abs().reshape(out_f, in_f // m, m)
    idx = groups.topk(n, dim=-1).indices
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, idx, True)
    return keep.reshape(out_f, in_f)


def cubic_sparsity(step: int, final: float, begin: int, end: int, initial: float = 0.0) -> float:
    """Zhu & Gupta (2017) gradual schedule: ``s_t = s_f + (s_i - s_f) (1 - (t - t_0)/(t_1 - t_0))^3``,
    ``initial`` before ``begin``, ``final`` from ``end`` on."""
    if step <= begin:
        return initial
    if step >= end:
        return final
    frac = (step - begin) / max(1, end - begin)
    return final + (initial - final) * (1.0 - frac) ** 3


class MagnitudePruner:
    """Masks over the prunable Linears of ``model``, re-applied after every weight update.

    ``method`` is "magnitude" (global, exact count) or "nm" (``n``:``m`` per row group).
    With ``end_step > 0`` the magnitude sparsity follows :func:`cubic_sparsity` from 0 at
    ``begin_step`` to ``sparsity`` at ``end_step``; otherwise it is applied in one shot.
    """

    def __init__(self, model: nn.Module, sparsity: float = 0.5, method: str = "magnitude",
                 n: int = 2, m: int = 4, begin_step: int = 0, end_step: int = 0) -> None:
        if method not in ("magnitude", "nm"):
            raise ConfigError(f"unknown unstructured pruning method {method!r} (magnitude | nm)")
        self.model, self.method, self.n, self.m = model, method, n, m
        self.final = sparsity if method == "magnitude" else 1.0 - n / m
        self.begin, self.end = begin_step, end_step
        self.linears = prunable_linears(model)
        if not self.linears:
            raise ConfigError("the model has no prunable Linear layers")
        self.masks: list[Tensor] = [torch.ones_like(lin.weight, dtype=torch.bool) for _, lin in self.linears]
        self.current = 0.0
        self.calls = 0
        self.fixed = False

    @classmethod
    def keep_zeros(cls, model: nn.Module) -> MagnitudePruner:
        """A pruner with fixed masks: the current zeros of ``model`` stay zero while it trains
        (e.g. when a pruned model is distilled or fine-tuned with fake quantization)."""
        p = cls(model, 0.0)
        p.masks = [lin.weight.detach() != 0 for _, lin in p.linears]
        p.fixed = True
        return p

    def target(self, step: int) -> float:
        """Sparsity the schedule asks for at ``step``."""
        if self.method == "nm" or self.end <= 0:
            return self.final
        return cubic_sparsity(step, self.final, self.begin, self.end)

    @torch.no_grad()
    def update(self, step: int) -> float:
        """Recompute masks for ``step`` (zeroed weights stay smallest, so masks only grow) and apply."""
        s = self.target(step)
        if not self.fixed and (s != self.current or step == 0):
            weights = [lin.weight for _, lin in self.linears]
            if self.method == "nm":
                self.masks = [nm_mask(w, self.n, self.m) for w in weights]
            else:
                self.masks = global_magnitude_masks(weights, s)
            self.current = s
        self.apply()
        return s

    @torch.no_grad()
    def apply(self) -> None:
        """Zero the masked weights in place."""
        for (_, lin), mask in zip(self.linears, self.masks, strict=True):
            lin.weight.mul_(mask)

    def wrap_loss(self, loss_fn: LossFn = lm_loss_sum, grad_accum: int = 1) -> LossFn:
        """A trainer ``loss_fn`` that updates the schedule and applies the masks before every
        training forward, so pruning runs inside the ordinary training loop (single process
        or DDP; every rank computes the same masks from the same weights)."""

        def fn(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
            self.update(self.calls // grad_accum)
            self.calls += 1
            return loss_fn(model, batch)

        return fn


def prune_global(model: nn.Module, sparsity: float) -> MagnitudePruner:
    """One-shot global magnitude pruning of ``model`` to exactly ``sparsity`` of its prunable weights."""
    pruner = MagnitudePruner(model, sparsity)
    pruner.update(0)
    return pruner


def weight_sparsity(model: nn.Module) -> float:
    """Fraction of zeros among the prunable Linear weights."""
    ws = [lin.weight for _, lin in prunable_linears(model)]
    total = sum(w.numel() for w in ws)
    return sum(int((w == 0).sum()) for w in ws) / max(1, total)


# ---- structured ----------------------------------------------------------------------------


def shrink_linear(lin: nn.Linear, out_idx: Tensor | None = None, in_idx: Tensor | None = None) -> nn.Linear:
    """A new Linear holding only the ``out_idx`` rows / ``in_idx`` columns of ``lin``."""
    w = lin.weight.detach()
    b = lin.bias.detach() if lin.bias is not None else None
    if out_idx is not None:
        w = w[out_idx]
        b = b[out_idx] if b is not None else None
    if in_idx is not None:
        w = w[:, in_idx]
    new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if b is not None:
            new.bias.copy_(b)
    return new


def _head_rows(mha: MultiHeadAttention) -> int:
    return mha.q_proj.out_features // mha.head_dim


def _structured_units(model: nn.Module, what: str) -> list[tuple[str, nn.Module]]:
    cls = FeedForward if what == "ffn" else MultiHeadAttention
    return [(n, m) for n, m in model.named_modules() if isinstance(m, cls)]


def _unit_weight_groups(mod: nn.Module, what: str) -> list[tuple[Tensor, int]]:
    """(tensor, axis) pairs whose slices along ``axis`` belong to one neuron / head."""
    if what == "ffn":
        groups = [(mod.fc1.weight, 0), (mod.fc2.weight, 1)]
        if mod.fc1.bias is not None:
            groups.append((mod.fc1.bias, 0))
        return groups
    groups = [(mod.q_proj.weight, 0), (mod.k_proj.weight, 0), (mod.v_proj.weight, 0), (mod.out_proj.weight, 1)]
    groups += [(lin.bias, 0) for lin in (mod.q_proj, mod.k_proj, mod.v_proj) if lin.bias is not None]
    return groups


def _per_unit(t: Tensor, axis: int, units: int) -> Tensor:
    """Sum of ``t`` over everything except the unit index along ``axis`` -> (units,)."""
    t = t.movedim(axis, 0)
    return t.reshape(units, -1).sum(dim=1)


def norm_scores(model: nn.Module, what: str) -> list[Tensor]:
    """Importance by weight norm: for an FFN neuron ``||fc1 row, bias|| * ||fc2 column||``; for a
    head ``||v_proj rows|| * ||out_proj columns||`` (its whole contribution flows through both)."""
    scores = []
    for _, mod in _structured_units(model, what):
        with torch.no_grad():
            if what == "ffn":
                w_in = mod.fc1.weight.pow(2).sum(1)
                if mod.fc1.bias is not None:
                    w_in = w_in + mod.fc1.bias.pow(2)
                scores.append(w_in.sqrt() * mod.fc2.weight.pow(2).sum(0).sqrt())
            else:
                h = _head_rows(mod)
                v = _per_unit(mod.v_proj.weight.pow(2), 0, h).sqrt()
                o = _per_unit(mod.out_proj.weight.pow(2), 1, h).sqrt()
                scores.append(v * o)
    return scores


def sensitivity_scores(model: nn.Module, what: str, batches: Iterable[dict[str, Tensor]],
                       loss_fn: LossFn = lm_loss_sum) -> list[Tensor]:
    """Importance by loss sensitivity (first-order Taylor, Molchanov et al. 2019): per batch
    the estimated loss change from removing a unit is ``sum(grad * weight)`` over its weights;
    the score is the sum over batches of its square."""
    units = _structured_units(model, what)
    scores = [torch.zeros(m.fc1.out_features if what == "ffn" else _head_rows(m)) for _, m in units]
    was_training = model.training
    model.eval()
    for batch in batches:
        model.zero_grad(set_to_none=True)
        n = max(1, int((batch["labels"] != -100).sum()))
        (loss_fn(model, batch) / n).backward()
        with torch.no_grad():
            for i, (_, mod) in enumerate(units):
                k = scores[i].numel()
                est = sum(_per_unit(p.grad * p, axis, k) for p, axis in _unit_weight_groups(mod, what)
                          if p.grad is not None)
                scores[i] += est.detach().float().pow(2)
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return scores


def _keep_index(score: Tensor, fraction: float, multiple: int = 1) -> Tensor:
    """Sorted indices of the units to keep: the top ``(1 - fraction)``, at least one unit."""
    n = score.numel()
    keep = max(1, round(n * (1.0 - fraction)))
    if multiple > 1 and keep > multiple:
        keep = min(n, max(multiple, round(keep / multiple) * multiple))
    best = torch.sort(score, descending=True, stable=True).indices[:keep]
    return torch.sort(best).values


def prune_ffn(model: nn.Module, fraction: float, scores: list[Tensor] | None = None, multiple: int = 1) -> int:
    """Remove ``fraction`` of every FFN's hidden neurons (the lowest ``scores``, default norm);
    returns the number of neurons removed."""
    scores = scores if scores is not None else norm_scores(model, "ffn")
    removed = 0
    for (_, ffn), score in zip(_structured_units(model, "ffn"), scores, strict=True):
        keep = _keep_index(score, fraction, multiple)
        removed += ffn.fc1.out_features - keep.numel()
        ffn.fc1 = shrink_linear(ffn.fc1, out_idx=keep)
        ffn.fc2 = shrink_linear(ffn.fc2, in_idx=keep)
    return removed


def prune_heads(model: nn.Module, fraction: float, scores: list[Tensor] | None = None) -> int:
    """Remove ``fraction`` of every attention layer's heads (the lowest ``scores``, default norm),
    keeping ``head_dim``; returns the number of heads removed."""
    scores = scores if scores is not None else norm_scores(model, "heads")
    removed = 0
    for (_, mha), score in zip(_structured_units(model, "heads"), scores, strict=True):
        hd = mha.head_dim
        keep = _keep_index(score, fraction)
        rows = (keep[:, None] * hd + torch.arange(hd)[None, :]).flatten()
        removed += _head_rows(mha) - keep.numel()
        mha.q_proj = shrink_linear(mha.q_proj, out_idx=rows)
        mha.k_proj = shrink_linear(mha.k_proj, out_idx=rows)
        mha.v_proj = shrink_linear(mha.v_proj, out_idx=rows)
        mha.out_proj = shrink_linear(mha.out_proj, in_idx=rows)
        mha.n_head = keep.numel()
    return removed


def prune_structured(model: nn.Module, fraction: float, what: str = "ffn", rank_by: str = "norm",
                     batches: Iterable[dict[str, Tensor]] = (), loss_fn: LossFn = lm_loss_sum) -> dict[str, int]:
    """Physically remove ``fraction`` of FFN neurons and/or heads (``what``: ffn | heads | both),
    ranked by weight ``norm`` or loss ``sensitivity`` (needs ``batches``)."""
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"structured pruning fraction {fraction} must be in [0, 1)")
    if what not in ("ffn", "heads", "both"):
        raise ConfigError(f"structured pruning target {what!r} is not ffn | heads | both")
    if rank_by not in ("norm", "sensitivity"):
        raise ConfigError(f"rank_by {rank_by!r} is not norm | sensitivity")
    batches = list(batches)
    if rank_by == "sensitivity" and not batches:
        raise ConfigError("sensitivity ranking needs calibration batches")
    out = {}
    for kind in (("ffn", "heads") if what == "both" else (what,)):
        scores = sensitivity_scores(model, kind, batches, loss_fn) if rank_by == "sensitivity" else None
        out[f"{kind}_removed"] = prune_ffn(model, fraction, scores) if kind == "ffn" \
            else prune_heads(model, fraction, scores)
    return out
