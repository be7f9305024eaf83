"""Pipeline parallel for a model of your own: ``paratrain.train(..., pp_split=[...])``.

The model is traced with ``torch.distributed.pipelining.pipeline`` (``torch.export`` under the
hood) on one microbatch and cut *before* each module named in ``pp_split``
(``SplitPoint.BEGINNING``); every rank traces the whole model and keeps its own stage(s).  The
stage modules keep the single-device parameter names (``blocks.2.mlp.0.weight``), so checkpoints
are layout independent as for paratrain's GPT.  Schedules, microbatches, the bubble measurement
and the gradient all-reduce over ``dp`` are those of :mod:`paratrain.parallel.pipeline`.

The loss.  paratrain's loss callables take ``(model, batch)``.  On the first stage the loss is
called with a *recorder* in place of the model: the arguments of its one ``model(...)`` call are
the pipeline's inputs (the loss stops there).  On the last stage it is called again per
microbatch with a *stand-in* whose call returns that microbatch's pipeline output, so the loss
is computed from the output exactly as without a pipeline.  Hence the limits: the loss must call
the model once, on inputs that are slices of the batch along dim 0, and use nothing of the model
but that call's output.  Tied parameters cannot span stages (the tracer would copy them).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B, SplitPoint, pipeline
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from paratrain.config import Config, ConfigError
from paratrain.parallel.pipeline import PipelineRunner

Loss = Callable[[nn.Module, Any], torch.Tensor]
_STEP_ARGS = ("target", "losses", "return_outputs", "loss_kwargs")


class _Captured(Exception):  # noqa: N818 - control flow, not an error
    """Raised by :class:`_Recorder` once it has the model's inputs."""


class _Recorder:
    """Stands in for the model on the first stage: records the call's arguments and stops the loss."""

    def __init__(self) -> None:
        self.args: tuple = ()
        self.kwargs: dict[str, Any] = {}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.args, self.kwargs = args, kwargs
        raise _Captured

    def __getattr__(self, name: str) -> Any:
        raise ConfigError(_no_attr(name))


class _Output:
    """Stands in for the model on the last stage: its one call returns the pipeline's output."""

    def __init__(self, output: Any) -> None:
        self._output, self._calls = output, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self._calls += 1
        if self._calls > 1:
            raise ConfigError("under pipeline parallel the loss may call the model only once per batch "
                              "(its output comes from the last stage); compute the loss from that one output")
        return self._output

    def __getattr__(self, name: str) -> Any:
        raise ConfigError(_no_attr(name))


def _no_attr(name: str) -> str:
    return (f"under pipeline parallel the loss gets a stand-in for the model that only returns its output "
            f"(it has no .{name}); compute the loss from model(...)'s output and the batch")


def model_inputs(loss_fn: Loss, batch: Any) -> tuple[tuple, dict[str, Any]]:
    """The positional and keyword arguments ``loss_fn(model, batch)`` passes to the model."""
    rec = _Recorder()
    try:
        loss_fn(rec, batch)
    except _Captured:
        return rec.args, rec.kwargs
    raise ConfigError("under pipeline parallel the loss must call the model (once) on the batch's inputs; "
                      "this loss returned without calling it")


def split_batch(batch: Any, n: int) -> list[Any]:
    """``batch`` cut into ``n`` microbatches along dim 0 (tensors of dim 0 and non-tensors are repeated)."""
    leaves, spec = tree_flatten(batch)
    parts = [list(torch.tensor_split(x, n)) if isinstance(x, torch.Tensor) and x.dim() else [x] * n
             for x in leaves]
    return [tree_unflatten([p[i] for p in parts], spec) for i in range(n)]


def batch_rows(args: tuple, kwargs: dict[str, Any]) -> int:
    """Rows (dim 0) of the model inputs; -1 when they have no tensor."""
    for x in tree_flatten((args, kwargs))[0]:
        if isinstance(x, torch.Tensor) and x.dim():
            return x.shape[0]
    return -1


def n_stages(cfg: Config) -> int:
    """Pipeline stages in all: ``pp``, times ``virtual_stages`` with the interleaved schedule."""
    p = cfg.parallel
    return p.pp * (p.virtual_stages if p.pp_schedule == "interleaved" else 1)


def check_split(model: nn.Module, names: list[str], n_stages: int) -> None:
    """Split names that name modules of ``model``, one per stage boundary, all different."""
    what = type(model).__name__
    if len(names) != n_stages - 1:
        raise ConfigError(f"pp_split has {len(names)} names but {n_stages} pipeline stages need {n_stages - 1} "
                          "(the modules where stages 2, 3, ... start)")
    if len(set(names)) != len(names):
        raise ConfigError(f"pp_split {names} names a module twice")
    for name in names:
        try:
            sub = model.get_submodule(name) if name else None
        except AttributeError:
            sub = None
        if sub is None or sub is model:
            containers = (nn.ModuleList, nn.ModuleDict)
            blocks = [n for n, m in model.named_modules() if n and n.count(".") <= 1
                      and not isinstance(m, containers)][:4]
            raise ConfigError(f"pp_split name {name!r} is not a submodule of {what} (e.g. {', '.join(blocks)})")
    tied: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in tied:
            raise ConfigError(f"{what}.{name} and .{tied[id(p)]} are one tied parameter, which pipeline stages "
                              "cannot share; untie them (e.g. tie_word_embeddings=False) to use pp > 1")
        tied[id(p)] = name


def _mode_dependent(model: nn.Module) -> bool:
    """Whether train and eval mode compute differently (dropout, batch norm): then eval gets its own trace."""
    norms = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
    return any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 or isinstance(m, norms)
               for m in model.modules())


def trace(model: nn.Module, names: list[str], args: tuple, kwargs: dict[str, Any]):
    """``pipeline()`` on one microbatch, leaving ``model`` as it was (the tracer patches forwards)."""
    args, kwargs = tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, (args, kwargs))
    try:
        return pipeline(model, mb_args=args, mb_kwargs=kwargs or None,
                        split_spec={n: SplitPoint.BEGINNING for n in names})
    except Exception as e:  # export failures are long multi-line reports
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"pp_split: {type(model).__name__} cannot be traced by torch.export for the pipeline "
                          f"({first}); remove data-dependent control flow from forward, or use tp / zero") from None
    finally:
        for n in names:
            m = model.get_submodule(n)
            m.__dict__.pop("forward", None)
            m.__dict__.pop("_orig_forward", None)


class ForeignPipelineRunner(PipelineRunner):
    """This rank's stages of a traced foreign model, and the schedule that drives them.

    ``example`` is one training batch (its microbatch fixes the traced shapes) and ``loss_fn``
    the trainer's loss (a sum over the batch, see :mod:`paratrain.training.user_model`).
    """

    calls_user_loss = True  # train_step takes the trainer's loss_fn

    def __init__(self, model: nn.Module, dims, schedule: str, microbatches: int, virtual: int,
                 split: list[str], example: Any, loss_fn: Loss) -> None:
        wanted = self._layout(dims, schedule, microbatches, virtual)
        split = list(split)
        check_split(model, split, self.n_stages)
        args, kwargs = model_inputs(loss_fn, example)
        clash = sorted(set(kwargs) & set(_STEP_ARGS))
        if clash:
            raise ConfigError(f"pipeline parallel cannot pass the model a keyword argument named {clash[0]!r}")
        self.rows = batch_rows(args, kwargs)
        if self.rows < 1 or self.rows % self.m:
            raise ConfigError(f"pipeline parallel needs model inputs with a batch dim divisible by "
                              f"parallel.microbatches = {self.m}; the first batch has {self.rows} rows")
        mb_args, mb_kwargs = split_batch((args, kwargs), self.m)[0]
        pipe = trace(model, split, mb_args, mb_kwargs)
        if pipe.num_stages != self.n_stages:
            raise ConfigError(f"pp_split {split} cut {type(model).__name__} into {pipe.num_stages} stages, not "
                              f"{self.n_stages}: name modules that forward calls once, in call order")
        self.chunks = {s: pipe.get_stage_module(s) for s in wanted}
        self.stages = [pipe.build_stage(s, dims.device, group=self.group) for s in wanted]
        self.has_first = 0 in self.chunks
        self.has_last = self.n_stages - 1 in self.chunks
        self._out_spec = None
        if self.has_last:  # the model's own output structure (the last stage returns its leaves)
            with torch.no_grad(), torch.random.fork_rng():
                self._out_spec = tree_flatten(model(*mb_args, **mb_kwargs))[1]
        kw = {"n_microbatches": microbatches, "loss_fn": self._loss, "scale_grads": False}
        self.schedule = self._schedule(self.stages, kw)
        self.eval_schedule = self.schedule
        if _mode_dependent(model):  # eval gets its own graph over the same parameters
            was = model.training
            model.eval()
            try:
                epipe = trace(model, split, mb_args, mb_kwargs)
            finally:
                model.train(was)
            self.eval_schedule = self._schedule([epipe.build_stage(s, dims.device, group=self.group)
                                                 for s in wanted], kw)
        del pipe
        self.scale = 1.0
        self.loss_fn: Loss = loss_fn
        self._micro: list[Any] = []
        self._unscaled: dict[int, torch.Tensor] = {}
        self._eval: Callable[[nn.Module, Any], torch.Tensor] | None = None
        self._stats = torch.zeros(4, dtype=torch.float64)
        self.busy_s = self._busy = self._wall = 0.0
        self.wall_s = 0.0
        self.steps = 0
        for st in self.stages:
            for name in ("forward_one_chunk", "backward_one_chunk", "backward_weight_one_chunk"):
                setattr(st, name, self._timed(getattr(st, name)))

    def _schedule(self, stages: list, kw: dict[str, Any]):
        if self.schedule_name == "interleaved":
            return ScheduleInterleaved1F1B(stages, **kw)
        return (ScheduleGPipe if self.schedule_name == "gpipe" else Schedule1F1B)(stages[0], **kw)

    def _output(self, output: Any) -> Any:
        if self._out_spec is None or self._out_spec.is_leaf():
            return output
        return tree_unflatten(list(output) if isinstance(output, (tuple, list)) else [output], self._out_spec)

    def _loss(self, output: Any, target: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        mb = self._micro[int(target.reshape(-1)[0])]  # the target is the microbatch's index
        stand_in = _Output(self._output(output))
        if self._eval is not None:
            self._stats += self._eval(stand_in, mb).to(self._stats)
            self._busy += time.perf_counter() - t0
            return torch.zeros(())
        loss = self.loss_fn(stand_in, mb)
        scaled = loss * self.scale
        self._unscaled[id(scaled)] = loss.detach()
        self._busy += time.perf_counter() - t0
        return scaled

    def _run(self, schedule, batch: Any, loss_fn: Loss, **kw: Any) -> list[torch.Tensor]:
        """One pass of ``batch`` through ``schedule`` (step or eval); the last stage's losses."""
        args: tuple = ()
        kwargs: dict[str, Any] = {}
        if self.has_first:
            args, kwargs = model_inputs(loss_fn, batch)
            rows = batch_rows(args, kwargs)
            if rows != self.rows:
                raise ConfigError(f"a batch of {rows} rows reached a pipeline traced for {self.rows}: every "
                                  "batch must have data.batch_size rows (a DataLoader: drop_last=True)")
        losses: list[torch.Tensor] = []
        if self.has_last:
            self._micro = split_batch(batch, self.m)
            kw.update(target=torch.arange(self.m), losses=losses)
        self._busy = 0.0
        t0 = time.perf_counter()
        schedule(*args, **kw, **kwargs)
        self._wall = time.perf_counter() - t0
        self._micro = []
        return losses

    def train_step(self, batch: Any, scale: float, loss_fn: Loss | None = None) -> torch.Tensor:
        """Forward + backward of one batch over the pipeline; the loss sum (0 off the last stage)."""
        self.scale = scale
        self.loss_fn = loss_fn or self.loss_fn
        self._unscaled = {}
        losses = self._run(self.schedule.step, batch, self.loss_fn, return_outputs=False)
        total = torch.zeros((), dtype=torch.float64)
        for scaled in losses:
            total += self._unscaled[id(scaled)].double().cpu()
        self._unscaled = {}
        self.steps += 1
        if self.steps > 1:  # the first step also sets up the stages
            self.busy_s += self._busy
            self.wall_s += self._wall
        return total

    @torch.no_grad()
    def eval_stats(self, batch: Any, loss_fn: Loss, stats: Callable[[nn.Module, Any], torch.Tensor]) -> torch.Tensor:
        """``stats(model, microbatch)`` summed over the batch's microbatches (zeros off the last stage)."""
        self._stats = torch.zeros(4, dtype=torch.float64)
        self._eval = stats
        try:
            self._run(self.eval_schedule.eval, batch, loss_fn)
        finally:
            self._eval = None
        return self._stats

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor | None:  # pragma: no cover - see eval_stats
        raise ConfigError("a traced pipeline of a foreign model is evaluated through its loss (eval_stats)")
