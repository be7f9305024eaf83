"""Pipeline parallel with ``torch.distributed.pipelining``.

The block stack of a decoder LM (GPT, Llama: :class:`~paratrain.models.blocks.DecoderLM`) is
cut into ``pp * v`` contiguous chunks (``v`` = virtual stages per rank, 1 unless the schedule
is interleaved), balanced by parameter count with the embeddings counted on the first chunk
and the final norm + LM head on the last.  Chunk ``s`` lives on pipeline rank ``s % pp`` (the
looped placement interleaved 1F1B expects).  Each chunk is the model itself with the other
layers deleted and its ``first_stage`` / ``last_stage`` modules set to None off the first /
last stage, so parameter names stay those of the single-device model.

Tied embeddings (Megatron's approach): the first stage holds ``tok_emb`` and the last stage
keeps it too, as the weight of its ``lm_head``.  After the backward pass the two copies'
gradients are summed between the first and last stage (:meth:`PipelineRunner.sync_tied_grads`),
which is the gradient of the single shared weight, so both copies take the same optimizer
step and stay identical.  The gradient norm counts the shared weight once
(:meth:`PipelineRunner.norm_params`).  Both copies are named ``tok_emb.weight``, as in the
single-device model, so checkpoints move between layouts.

Schedules: ``gpipe`` (all forwards, then all backwards), ``1f1b`` (one forward one
backward in steady state: at most ``pp`` microbatches of activations alive) and
``interleaved`` (1F1B over ``v`` chunks per rank).  The bubble is measured per rank as
idle time over busy (compute) time inside ``schedule.step`` and reported next to the
theory, ``(pp - 1) / (m * v)``.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B
from torch.distributed.tensor import DTensor

from paratrain.models.blocks import DecoderLM
from paratrain.models.loss import token_loss_sum


def _numel(m: nn.Module | None) -> int:
    return 0 if m is None else sum(p.numel() for p in m.parameters())


def partition(weights: list[int], n: int, first_extra: int = 0, last_extra: int = 0) -> list[tuple[int, int]]:
    """Split ``weights`` (one per layer) into ``n`` non-empty contiguous ranges ``[lo, hi)``
    minimising the heaviest chunk, chunk 0 carrying ``first_extra`` and the last ``last_extra``.

    Exact dynamic programme, O(n * L^2); ties go to the earliest cut.
    """
    L = len(weights)
    if not 1 <= n <= L:
        raise ValueError(f"cannot split {L} layers into {n} pipeline chunks")
    prefix = [0]
    for w in weights:
        prefix.append(prefix[-1] + w)

    def cost(c: int, lo: int, hi: int) -> int:
        return prefix[hi] - prefix[lo] + (first_extra if c == 0 else 0) + (last_extra if c == n - 1 else 0)

    inf = float("inf")
    best = [[inf] * (L + 1) for _ in range(n + 1)]  # best[c][i]: first i layers in c chunks
    cut = [[0] * (L + 1) for _ in range(n + 1)]
    best[0][0] = 0
    for c in range(1, n + 1):
        for i in range(c, L - (n - c) + 1):
            for j in range(c - 1, i):
                v = max(best[c - 1][j], cost(c - 1, j, i))
                if v < best[c][i]:
                    best[c][i], cut[c][i] = v, j
    bounds, i = [], L
    for c in range(n, 0, -1):
        j = cut[c][i]
        bounds.append((j, i))
        i = j
    return bounds[::-1]


def splits_natively(model: nn.Module) -> bool:
    """Whether ``model`` is one of paratrain's decoder LMs, which this module splits itself."""

    return isinstance(model, DecoderLM)


def is_tied(model: nn.Module) -> bool:
    """Whether the model's LM head shares its weight with the token embedding."""
    emb, head = getattr(model, "tok_emb", None), getattr(model, "lm_head", None)
    return emb is not None and head is not None and head.weight is emb.weight


def stage_chunk(model: nn.Module, lo: int, hi: int, first: bool, last: bool) -> nn.Module:
    """Prune a decoder LM in place to layers ``[lo, hi)`` (+ embeddings if first, norm/head if
    last; a tied last stage keeps ``tok_emb`` as its head's weight)."""
    tied = is_tied(model)
    for key in list(model.layers.keys()):
        if not lo <= int(key) < hi:
            del model.layers[key]
    if not first:
        for name in model.first_stage:
            if not (tied and last and name == "tok_emb"):
                setattr(model, name, None)
    if not last:
        for name in model.last_stage:
            setattr(model, name, None)
    return model


def split_model(model: nn.Module, n_chunks: int, wanted: list[int]) -> dict[int, nn.Module]:
    """The chunks with indices ``wanted`` of a decoder LM cut into ``n_chunks`` (copies but the last)."""
    if not splits_natively(model):
        raise TypeError(f"split_model cuts paratrain's decoder LMs (GPT, Llama), not {type(model).__name__}")
    layers = [_numel(m) for m in model.layers.values()]
    first_extra = sum(_numel(getattr(model, n)) for n in model.first_stage)
    last_extra = sum(_numel(getattr(model, n)) for n in model.last_stage)  # a tied head: its copy
    bounds = partition(layers, n_chunks, first_extra, last_extra)
    out = {}
    for i, s in enumerate(wanted):
        m = model if i == len(wanted) - 1 else copy.deepcopy(model)
        out[s] = stage_chunk(m, *bounds[s], first=s == 0, last=s == n_chunks - 1)
    return out


def tied_group(dims):
    """The process group joining this rank's first and last pipeline stage (same dp and tp
    coordinates), or None on a middle stage.  Collective: every rank creates every pair's group."""
    if dims.pp == 2:
        return dims.pp_group
    mine = None
    for d in range(dims.dp):
        for t in range(dims.tp):
            base = d * dims.pp * dims.tp + t
            pair = [base, base + (dims.pp - 1) * dims.tp]
            group = dist.new_group(pair)
            if dims.rank in pair:
                mine = group
    return mine


class PipelineRunner:
    """This rank's pipeline chunks, their stages and the schedule that drives them.

    ``transform`` is applied to every chunk before its stage is built (tensor parallel,
    activation checkpointing, ...).
    """

    calls_user_loss = False  # paratrain's decoder LMs: the last stage computes the token loss itself
    tied_weight: torch.Tensor | None = None  # this rank's copy of an embedding shared by first and last stage
    tied_group = None

    def __init__(self, model: nn.Module, dims, schedule: str, microbatches: int, virtual: int,
                 transform: Callable[[nn.Module], nn.Module] = lambda m: m) -> None:
        wanted = self._layout(dims, schedule, microbatches, virtual)
        tied = is_tied(model)
        self.chunks = {s: transform(c) for s, c in split_model(model, self.n_stages, wanted).items()}
        self.tied_group = tied_group(dims) if tied else None
        ends = [c for s, c in self.chunks.items() if s in (0, self.n_stages - 1)]
        # this rank's copy of the shared embedding (None: untied, or a middle stage)
        self.tied_weight = ends[0].tok_emb.weight if tied and ends else None
        self.stages = [PipelineStage(c, s, self.n_stages, dims.device, group=self.group)
                       for s, c in self.chunks.items()]
        self.has_first = 0 in self.chunks
        self.has_last = self.n_stages - 1 in self.chunks
        self.scale = 1.0
        self._unscaled = {}
        kw = {"n_microbatches": microbatches, "loss_fn": self._loss, "scale_grads": False}
        if schedule == "interleaved":
            self.schedule = ScheduleInterleaved1F1B(self.stages, **kw)
        else:
            cls = ScheduleGPipe if schedule == "gpipe" else Schedule1F1B
            self.schedule = cls(self.stages[0], **kw)
        self.busy_s = self._busy = 0.0
        self.wall_s = 0.0
        self.steps = 0
        for st in self.stages:
            for name in ("forward_one_chunk", "backward_one_chunk", "backward_weight_one_chunk"):
                setattr(st, name, self._timed(getattr(st, name)))

    def _layout(self, dims, schedule: str, microbatches: int, virtual: int) -> list[int]:
        """Set the pipeline geometry; return the stage indices this rank holds (looped: rank,
        rank + pp, ... for the interleaved schedule's ``virtual`` chunks)."""
        self.dims = dims
        self.pp, self.rank = dims.pp, dims.pp_rank
        self.v = virtual if schedule == "interleaved" else 1
        self.n_stages = dims.pp * self.v
        self.m = microbatches
        self.schedule_name = schedule
        self.group = dims.pp_group
        return [self.rank + i * self.pp for i in range(self.v)]

    def _timed(self, fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self._busy += time.perf_counter() - t0
        return wrapper

    def _loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        loss = token_loss_sum(output, target)
        scaled = loss * self.scale
        # keyed by the returned tensor: the schedule's first step also calls this for shape
        # inference, and only the losses it hands back in ``losses`` are real microbatches
        self._unscaled[id(scaled)] = loss.detach()
        self._busy += time.perf_counter() - t0
        return scaled

    def train_step(self, batch: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
        """Forward + backward of one batch over the pipeline; the loss sum (0 off the last stage)."""
        self.scale = scale
        self._busy = 0.0
        self._unscaled: dict[int, torch.Tensor] = {}
        args = (batch["input_ids"],) if self.has_first else ()
        target = batch["labels"] if self.has_last else None
        losses: list[torch.Tensor] = []
        t0 = time.perf_counter()
        self.schedule.step(*args, target=target, losses=losses if self.has_last else None)
        wall = time.perf_counter() - t0
        total = torch.zeros((), dtype=torch.float64)
        for scaled in losses:
            total += self._unscaled[id(scaled)].double().cpu()
        self._unscaled = {}
        self.steps += 1
        if self.steps > 1:  # the first step also infers shapes
            self.busy_s += self._busy
            self.wall_s += wall
        return total

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        """Whole-batch forward through every stage with blocking p2p; logits on the last stage."""
        x: torch.Tensor | None = None
        b, t = input_ids.shape
        d = self.dims
        for s in range(self.n_stages):
            owner = s % self.pp
            if owner != self.rank:
                continue
            if s == 0:
                x = input_ids
            else:
                x = torch.empty(b, t, self._width(), dtype=torch.float32, device=d.device)
                dist.recv(x, src=dist.get_global_rank(self.group, (s - 1) % self.pp))
            y = self.chunks[s](x)
            if s == self.n_stages - 1:
                return y
            dist.send(y.float().contiguous(), dst=dist.get_global_rank(self.group, (s + 1) % self.pp))
        return None

    def _width(self) -> int:
        return next(iter(self.chunks.values())).cfg.d_model

    def sync_tied_grads(self) -> None:
        """Sum the shared embedding's gradient between the first and last stage (once per step,
        after the last microbatch): both copies then hold the single-device gradient."""
        if self.tied_weight is None:
            return
        w = self.tied_weight
        g = w.grad
        if isinstance(g, DTensor):
            # tp: both copies are Shard(0) over the vocabulary, but a vocab-parallel embedding's
            # gradient may come back replicated; take this rank's rows so the pair's match
            if g.placements != w.placements:
                w.grad = g = g.redistribute(g.device_mesh, w.placements)
            g = g.to_local()
        dist.all_reduce(g, group=self.tied_group)

    def norm_params(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """``params`` without the last stage's copy of a shared embedding (counted once, on the first)."""
        if self.tied_weight is None or 0 in self.chunks:
            return params
        return [p for p in params if p is not self.tied_weight]

    def bubble(self) -> tuple[float, float]:
        """(measured idle/busy on this rank, theory (pp - 1) / (m * v))."""
        measured = (self.wall_s - self.busy_s) / self.busy_s if self.busy_s > 0 else float("nan")
        return measured, (self.pp - 1) / (self.m * self.v)
