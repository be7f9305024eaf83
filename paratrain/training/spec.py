"""What a run trains, independent of how it is laid out: :class:`RunSpec`.

One dataclass carries the model factory, the loss, this rank's data, the repeated blocks and
the model's tensor / pipeline parallel plans -- for paratrain's own models
(:meth:`RunSpec.from_config`) and for a Python caller's objects (:meth:`RunSpec.from_user`)
alike.  The trainer and :func:`paratrain.parallel.parallelize` read only the spec; nothing is
patched onto the user's module.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from paratrain.config import Config, ConfigError
from paratrain.data import build_data, val_batches
from paratrain.data.user_data import IterableBatches, UserData, train_source, user_val_batches
from paratrain.hf import init_from as hf_init_from
from paratrain.models import build_model
from paratrain.parallel.compile import token_loss_for
from paratrain.parallel.memory_policy import blocks_of
from paratrain.parallel.meta_init import build_on_meta
from paratrain.parallel.tensor_parallel import model_plan
from paratrain.training.user_model import (
    LogitsLoss,
    MeanLoss,
    check_meta,
    check_plans,
    find_repeated_blocks,
    is_own_model,
    output_loss,
    resolve_model,
)


@dataclass
class RunSpec:
    """Everything about *what* is trained that the trainer and the parallel layout need.

    ``build_model()`` is called once per rank after seeding (every rank gets the same initial
    weights); ``loss(model, batch)`` returns a loss *sum* and ``loss.count(batch)`` its weight
    (labelled tokens or samples); ``blocks(model)`` lists the repeated blocks (FSDP and
    activation-checkpoint units); ``tp_plan(model, loss_parallel)`` maps module paths to
    ``ParallelStyle`` s (None: the model cannot be tensor-parallel); ``pp_split`` names the
    modules where pipeline stages 2, 3, ... start in a traced (foreign) model, and is None for
    paratrain's models, whose layer stack is split directly.
    """

    arch: str
    model_factory: Callable[[], nn.Module]
    data: Any  # DataBundle | UserData: this rank's training batches, vocab and task
    loss: Any = None
    blocks: Callable[[nn.Module], list[nn.Module]] = blocks_of  # paratrain's models: layer_modules()
    tp_plan: Callable[[nn.Module, bool], dict[str, Any]] | None = model_plan  # the plan paratrain's models share
    pp_split: list[str] | None = None
    val_source: Callable[[int, int], list | None] = field(default=lambda bs, n: None)
    settle: Callable[[RunSpec, nn.Module], None] | None = None  # completes a spec once its model exists

    def build_model(self) -> nn.Module:
        """This rank's single-device model (call after seeding); settles what depends on it."""
        model = self.model_factory()
        if self.settle is not None:
            self.settle(self, model)
        return model

    def count(self, batch: Any) -> int:
        """The weight of one batch in the loss: the loss's own ``count``, else its labelled tokens."""
        return getattr(self.loss, "count", LogitsLoss.count)(batch)

    def val_batches(self, batch_size: int, max_batches: int) -> list | None:
        """This rank's validation batches; None when there is nothing to evaluate."""
        return self.val_source(batch_size, max_batches)

    def eval_stats(self, model: nn.Module, batch: Any, sync: Any) -> torch.Tensor:
        """[loss sum, count, exact matches, samples] of one validation batch."""
        pipe = getattr(sync, "pipe", None)
        ev = getattr(self.loss, "eval_stats", None) or LogitsLoss().eval_stats
        if self.pp_split is not None and hasattr(pipe, "eval_stats"):  # a traced pipeline: the last stage
            return pipe.eval_stats(batch, self.loss, lambda m, b: ev(m, b, None))
        return ev(model, batch, sync)

    def first_batch(self) -> Any:
        """This rank's first training batch, read from a copy of the source (which is left as it was);
        a traced pipeline is built from it."""
        src = copy.copy(self.data.train)
        if isinstance(src, IterableBatches):
            if src.one_shot:
                raise ConfigError("pipeline parallel traces the model on the first batch: pass train_data as a "
                                  "re-iterable (a list, Dataset or DataLoader), not an iterator")
            src._it, src.epoch, src.group = None, 0, 0
        return next(src)

    # ---- constructors ---------------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: Config, dp_rank: int = 0, dp: int = 1) -> RunSpec:
        """paratrain's model from ``[model]`` on the data of ``[data]``."""
        return cls.from_user(cfg, dp_rank, dp)

    @classmethod
    def from_user(cls, cfg: Config, dp_rank: int = 0, dp: int = 1, *, model: Any = None, loss_fn: Any = None,
                  train_data: Any = None, val_data: Any = None, tp_plan: dict[str, Any] | None = None,
                  pp_split: list[str] | None = None) -> RunSpec:
        """A run with any of the Python API's pieces replaced (see :func:`paratrain.train`).

        ``loss_fn`` follows the trainer's convention (a loss sum with ``.count``);
        :func:`paratrain.train` wraps a user's mean loss in :class:`MeanLoss` first."""
        own_data = train_data is None
        if own_data:
            data: Any = build_data(cfg, dp_rank, dp)
            vals: Callable[[int, int], list | None] = lambda bs, n: val_batches(data, bs, dp_rank, dp, n)
        else:
            data = UserData(train=train_source(train_data, cfg.data.batch_size, dp_rank, dp, cfg.run.seed),
                            val=val_data)
            vals = lambda bs, n: None  # user data without val_data: nothing to evaluate
        if val_data is not None:
            vals = lambda bs, n: user_val_batches(val_data, bs, dp_rank, dp, n)
        spec = cls(arch=cfg.model.arch if model is None else "custom", model_factory=lambda: None, data=data,
                   loss=loss_fn or LogitsLoss(token_loss_for(cfg)), val_source=vals)
        spec.model_factory = _factory(cfg, spec, model)

        def settle(spec: RunSpec, m: nn.Module) -> None:
            check_meta(m, cfg)
            foreign = not is_own_model(m)
            spec.arch = "custom" if foreign else cfg.model.arch
            if not foreign:
                if model is not None and cfg.parallel.pp > 1:
                    cfg.check_model_layout()  # a factory that returned paratrain's own model
                return
            vocab = getattr(getattr(m, "config", None), "vocab_size", None)
            if own_data and isinstance(vocab, int) and vocab < data.vocab_size:
                raise ConfigError(f"the model's vocab_size = {vocab} is smaller than the tokenizer's "
                                  f"{data.vocab_size} (data.source = {cfg.data.source!r})")
            check_plans(cfg, type(m).__name__, tp_plan, pp_split)
            fsdp_block = cfg.parallel.fsdp_block
            if fsdp_block:
                find_repeated_blocks(m, fsdp_block)  # a name that matches nothing is a clear error now
            spec.blocks = lambda mod: find_repeated_blocks(mod, fsdp_block)
            spec.tp_plan = (lambda mod, lp: tp_plan) if tp_plan else None
            spec.pp_split = list(pp_split) if pp_split else None
            if loss_fn is None and not own_data:
                spec.loss = MeanLoss(output_loss, "the model's loss")

        spec.settle = settle
        return spec


def _factory(cfg: Config, spec: RunSpec, model: Any) -> Callable[[], nn.Module]:
    """The zero-argument builder of this rank's model (paratrain's, or the caller's)."""
    if model is None:
        def build_own() -> nn.Module:

            vocab = cfg.model.vocab_size or spec.data.vocab_size
            if vocab <= 0:
                raise ConfigError("set model.vocab_size to train paratrain's model on your own data")
            if vocab < spec.data.vocab_size:
                raise ConfigError(f"model.vocab_size = {vocab} is smaller than the tokenizer's "
                                  f"{spec.data.vocab_size}")
            if cfg.parallel.meta_init:  # parameters on the meta device; each rank fills its shards

                return build_on_meta(lambda: build_model(cfg.model, vocab, spec.data.pad_id))
            return hf_init_from(build_model(cfg.model, vocab, spec.data.pad_id), cfg.model)  # model.init_from

        return build_own
    if cfg.parallel.meta_init:
        if isinstance(model, nn.Module):
            raise ConfigError("parallel.meta_init = true needs a model factory (paratrain builds it on the meta "
                              "device), not a model instance")

        def build_meta() -> nn.Module:

            return build_on_meta(lambda: resolve_model(model))

        return build_meta
    return lambda: resolve_model(model)
