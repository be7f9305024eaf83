"""Bring-your-own model, loss and data: what the trainer needs to know about them.

Loss convention.  paratrain's own losses return a *sum* over labelled tokens and the trainer
divides by the global count.  A user ``loss_fn(model, batch)`` (or a model's own loss, as
Hugging Face models return when the batch has ``labels``) returns a *mean* over its batch; it
is weighted by :func:`~paratrain.data.user_data.count_items` (labelled tokens for a dict batch
with ``labels``, else samples), so the trainer's arithmetic stays the same: with equal-sized
per-rank batches, DDP over ``n`` ranks with batch ``B`` takes the same steps as one process with
batch ``n * B``.

Without a loss_fn the loss is chosen by what is trained on what:

* your model on your data: the model's own loss (a scalar tensor, ``out.loss`` or ``out["loss"]``);
* your model on paratrain's data (``data.source``), or paratrain's model on your data: batches are
  ``{"input_ids", "labels"}`` with labels already shifted (label ``t`` is the token after input
  ``t``), so the model is called without labels and its logits (a tensor or ``out.logits``) are
  scored with summed token cross-entropy, exactly as for paratrain's own models.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from paratrain.config import Config, ConfigError
from paratrain.data.user_data import (
    count_items,
)
from paratrain.models import BERT, GPT, Llama, Seq2Seq
from paratrain.models.loss import IGNORE, eval_stats, token_loss_sum
from paratrain.parallel.meta_init import has_meta
from paratrain.parallel.pipeline_foreign import n_stages

LossFn = Callable[[nn.Module, Any], torch.Tensor]


# ---- models -------------------------------------------------------------------------------
def resolve_model(spec: Any) -> nn.Module:
    """An ``nn.Module`` as given, or the module a zero-argument factory (function or class) builds."""
    if isinstance(spec, nn.Module):
        return spec
    if not callable(spec):
        raise ConfigError(f"model must be an nn.Module or a zero-argument factory, got {type(spec).__name__}")
    try:
        model = spec()
    except TypeError as e:
        if "argument" not in str(e):
            raise
        raise ConfigError(f"model factory {_name(spec)} must take no arguments: {e}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model factory {_name(spec)} returned a {type(model).__name__}, not an nn.Module")
    return model


def _name(obj: Any) -> str:
    return getattr(obj, "__qualname__", None) or type(obj).__name__


def find_repeated_blocks(model: nn.Module, fsdp_block: str = "") -> list[nn.Module]:
    """The model's repeated Transformer blocks (the FSDP / activation-checkpoint wrapping units).

    ``fsdp_block`` names them: a submodule path (``"transformer.h"``: its children) or a module
    class name (``"GPT2Block"``: every module of that class).  Otherwise paratrain's own models
    answer ``layer_modules()``, and for any other model the largest ModuleList / ModuleDict /
    Sequential of two or more children of one class is taken; [] when there is none.
    """
    if fsdp_block:
        try:
            sub = model.get_submodule(fsdp_block)
            containers = (nn.ModuleList, nn.ModuleDict, nn.Sequential)
            return list(sub.children()) if isinstance(sub, containers) else [sub]
        except AttributeError:
            pass
        found = [m for m in model.modules() if type(m).__name__ == fsdp_block]
        if not found:
            raise ConfigError(
                f"parallel.fsdp_block = {fsdp_block!r} is neither a submodule path nor a module class of "
                f"{type(model).__name__}"
            )
        return found
    own = getattr(type(model), "layer_modules", None)
    if callable(own):
        return list(model.layer_modules())
    best: tuple[int, list[nn.Module]] | None = None
    for m in model.modules():
        if isinstance(m, (nn.ModuleList, nn.ModuleDict, nn.Sequential)):
            kids = list(m.children())
            if len(kids) >= 2 and len({type(k) for k in kids}) == 1:
                size = sum(p.numel() for p in m.parameters())
                if best is None or size > best[0]:
                    best = (size, kids)
    return best[1] if best else []


def check_plans(cfg: Config, model_name: str, tp_plan: Any, pp_split: Any) -> None:
    """TP / PP of a foreign model need the user's plan; say so in one line when it is missing."""
    p = cfg.parallel
    if p.tp > 1 and not tp_plan:
        raise ConfigError(
            f"parallel.tp = {p.tp} needs a tensor-parallel plan for {model_name}: "
            "paratrain.train(..., tp_plan={'module.path': ColwiseParallel(), ...})"
        )
    if p.pp > 1 and not pp_split:
        raise ConfigError(
            f"parallel.pp = {p.pp} needs split points for {model_name}: "
            "paratrain.train(..., pp_split=['module.name where stage 2 starts', ...])"
        )
    if p.pp > 1:

        if p.tp > 1:
            raise ConfigError(f"parallel.tp > 1 with pp > 1 is not supported for {model_name} (a traced pipeline "
                              "stage cannot hold DTensors); use pp_split or tp_plan, not both")
        if cfg.train.activation_checkpointing != "none":
            raise ConfigError(f"train.activation_checkpointing = {cfg.train.activation_checkpointing!r} does not "
                              f"apply to the traced pipeline stages of {model_name}; set it to 'none' with pp > 1")
        n = n_stages(cfg)
        if len(pp_split) != n - 1:
            raise ConfigError(f"pp_split has {len(pp_split)} names but {n} pipeline stages need {n - 1} "
                              "(the modules where stages 2, 3, ... start)")


def is_own_spec(spec: Any) -> bool:
    """Whether a ``model=`` argument is absent or one of paratrain's own classes / instances
    (then the ``[model]`` section describes it; a factory counts as foreign)."""
    own = own_models()
    return spec is None or isinstance(spec, own) or isinstance(spec, type) and issubclass(spec, own)


def check_meta(model: nn.Module, cfg: Config) -> None:
    """A model with parameters on the meta device needs a layout that materializes shards."""

    p = cfg.parallel
    if has_meta(model) and (p.zero < 2 or p.tp > 1 or p.pp > 1 or cfg.dp == 1):
        raise ConfigError(f"{type(model).__name__} was built on the meta device: that needs parallel.zero = 3 "
                          f"(or 2) over dp > 1 ranks with tp = pp = 1, where each rank fills its own shards; build "
                          "it on the CPU otherwise")


# ---- calling models and losses ---------------------------------------------------------------
def call_model(model: nn.Module, batch: Any) -> Any:
    """``model(**batch)`` for a dict, ``model(*batch)`` for a tuple/list, else ``model(batch)``."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (list, tuple)):
        return model(*batch)
    return model(batch)


def _describe(out: Any) -> str:
    if isinstance(out, torch.Tensor):
        return f"a tensor of shape {tuple(out.shape)}"
    return f"a {type(out).__name__}"


def output_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """The default loss of a user model on user data: the loss the model itself returns."""
    out = call_model(model, batch)
    loss = out
    if not isinstance(out, torch.Tensor):
        loss = getattr(out, "loss", None)
        if loss is None and isinstance(out, Mapping):
            loss = out.get("loss")
        if loss is None and isinstance(out, (list, tuple)) and out and isinstance(out[0], torch.Tensor):
            loss = out[0]
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise ConfigError(
            f"the model returned {_describe(out)} and no loss: pass paratrain.train(loss_fn=...) with "
            "loss_fn(model, batch) -> scalar loss, or return a scalar loss / an object with .loss "
            "(Hugging Face models do when the batch has 'labels')"
        )
    return loss


class MeanLoss:
    """A loss that is a mean over its batch, turned into a sum by its weight (:func:`count_items`)."""

    def __init__(self, fn: LossFn, name: str) -> None:
        self.fn, self.name = fn, name

    def __call__(self, model: nn.Module, batch: Any) -> torch.Tensor:
        loss = self.fn(model, batch)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0 or not loss.is_floating_point():
            raise ConfigError(f"{self.name} returned {_describe(loss)}; it must return a scalar float tensor "
                              "(the mean loss over the batch)")
        return loss * count_items(batch)

    count = staticmethod(count_items)

    @torch.no_grad()
    def eval_stats(self, model: nn.Module, batch: Any, strategy: Any = None) -> torch.Tensor:
        n = count_items(batch)
        return torch.tensor([float(self.fn(model, batch)) * n, n, 0.0, 0.0], dtype=torch.float64)


def _check_dict(batch: Any) -> Any:
    _labels(batch)
    return batch


def _labels(batch: Any) -> torch.Tensor:
    if not isinstance(batch, Mapping) or not isinstance(batch.get("labels"), torch.Tensor):
        raise ConfigError(
            "without a loss_fn, batches must be dicts with 'input_ids' and shifted 'labels' here; "
            "pass paratrain.train(loss_fn=...) for other batches"
        )
    return batch["labels"]


class LogitsLoss:
    """Summed token cross-entropy of the model's logits against shifted labels (paratrain's convention)."""

    name = "logits"

    def __init__(self, token_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = token_loss_sum) -> None:
        self.token_loss = token_loss  # the cross-entropy itself (compiled under train.compile)

    def logits(self, model: nn.Module, batch: Any, strategy: Any = None) -> torch.Tensor | None:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        if strategy is not None:  # pipeline stages: None on the ranks that produce no logits
            out = strategy.eval_logits(model, batch)
            if out is None:
                return None
        else:
            out = model(**inputs)
        logits = out if isinstance(out, torch.Tensor) else getattr(out, "logits", None)
        if not isinstance(logits, torch.Tensor) or logits.dim() < 2:
            raise ConfigError(
                f"the model returned {_describe(out)}, not logits (a tensor or an object with .logits); "
                "pass paratrain.train(loss_fn=...) with loss_fn(model, batch) -> scalar loss"
            )
        return logits

    def __call__(self, model: nn.Module, batch: Any) -> torch.Tensor:
        labels = _labels(batch)
        logits = self.logits(model, batch)
        assert logits is not None
        return self.token_loss(logits, labels)

    @staticmethod
    def count(batch: Any) -> int:
        return int((_labels(batch) != IGNORE).sum())

    @torch.no_grad()
    def eval_stats(self, model: nn.Module, batch: Any, strategy: Any = None) -> torch.Tensor:
        logits = self.logits(model, _check_dict(batch), strategy)
        return torch.zeros(4, dtype=torch.float64) if logits is None else eval_stats(logits, batch["labels"])


# ---- everything the trainer asks -------------------------------------------------------------
def own_models() -> tuple[type[nn.Module], ...]:
    """paratrain's own architectures (which carry their own TP/PP plans and block lists)."""

    return GPT, Llama, Seq2Seq, BERT


def is_own_model(model: nn.Module) -> bool:
    return isinstance(model, own_models())
