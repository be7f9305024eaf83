"""Meta-device builds for ZeRO-2/3: no rank ever holds the whole model's parameters.

Two ways in (see docs/python-api.md, *Meta-device build*):

* ``parallel.meta_init = true``: paratrain calls the model factory inside :func:`params_on_meta`,
  which moves every parameter to the meta device as it is registered.  Buffers stay real (they are
  small and often hold computed constants, such as causal masks).  A module that makes its
  parameter with ``torch.empty`` and initializes it after registering it (``nn.Linear``,
  ``nn.Embedding``, ...) never touches its memory; one that computes it first (``nn.Parameter(
  torch.randn(...))``) holds that one parameter briefly.
* the factory builds on the meta device itself (``with torch.device("meta"): ...``): buffers are
  then on meta too and must be set by the model's ``init_weights()`` (floating-point buffers left
  unset are an error; integer ones cannot be checked and need ``init_weights``).

After FSDP2 has sharded the meta model (``fully_shard`` per block, then the root),
:func:`materialize` allocates each rank's shards (``to_empty``), reseeds torch with ``run.seed``
and initializes them: the model's ``init_weights()`` when it has one (Hugging Face models, and
paratrain's own), else ``reset_parameters()`` of every submodule that has one, in ``modules()``
order.  Random initializers (``normal_``, ``uniform_``, ...) on a shard draw the numbers of the
*whole* parameter and keep the rank's slice (:class:`_FullTensorInit`): CPU generators cannot skip
ahead to a shard's numbers, and DTensor's own random ops on CPU give every rank the same numbers.
So at most one parameter is ever whole on a rank, transiently, and the weights do not depend on
the number of ranks.

Parity with a normal build: a model whose parameters are initialized once, by its modules'
``reset_parameters()`` at construction (``nn.Linear``, ``nn.Embedding``, ``nn.LayerNorm``, ...
registered in the order they are built), gets exactly the weights a normal build with the same
seed gives (tested).  A model that re-initializes in its constructor (Hugging Face ``post_init``,
paratrain's GPT) drew numbers twice in a normal build and once here, so its weights differ (same
distributions).  Every parameter is filled with NaN first; one still NaN afterwards had no
initializer and stops the run with its name.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.overrides import TorchFunctionMode

from paratrain.config import ConfigError


def has_meta(model: nn.Module) -> bool:
    """Whether any parameter or buffer of ``model`` is on the meta device."""
    return any(t.is_meta for t in (*model.parameters(), *model.buffers()))


@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Within the context, parameters registered on any module are moved to the meta device."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and not param.is_meta:
            p = module._parameters[name]
            extra = dict(p.__dict__)
            meta = type(p)(p.detach().to("meta"), requires_grad=p.requires_grad)
            meta.__dict__.update(extra)
            module._parameters[name] = meta

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def build_on_meta(factory: Callable[[], nn.Module]) -> nn.Module:
    """``factory()`` with its parameters on the meta device (see :func:`params_on_meta`)."""
    with params_on_meta():
        return factory()


def _local_slice(p: torch.Tensor) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """This rank's tensor of ``p`` and where it sits in the full tensor."""
    if not isinstance(p, DTensor):
        return p.data, tuple(slice(None) for _ in p.shape)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return p.to_local(), tuple(slice(o, o + s) for o, s in zip(offset, shape, strict=True))


_RANDOM = {"normal_", "uniform_", "bernoulli_", "exponential_", "geometric_", "log_normal_", "cauchy_", "random_"}


class _FullTensorInit(TorchFunctionMode):
    """``torch.nn.init`` functions and random in-place methods (``t.normal_()``) called on a shard
    run on the *whole* parameter's shape and keep this rank's slice (DTensor's own random ops on CPU
    repeat one shard's numbers on every rank).  Only the outermost call is seen: calls made inside
    a handler bypass the mode, so ``kaiming_uniform_`` is handled as a whole."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", "")
        in_kwargs = not args and "tensor" in kwargs  # nn.init passes everything by keyword
        dst = kwargs["tensor"] if in_kwargs else args[0] if args else None
        initializer = getattr(func, "__module__", "") == "torch.nn.init" or name in _RANDOM  # nn.init.*, t.normal_()
        src_plain = name == "copy_" and len(args) > 1 and not isinstance(args[1], DTensor)
        if not isinstance(dst, DTensor) or not (initializer or src_plain):
            return func(*args, **kwargs)
        full = torch.empty(dst.shape, dtype=dst.dtype)
        if in_kwargs:
            func(**{**kwargs, "tensor": full})
        else:
            func(full, *args[1:], **kwargs)
        local, where = _local_slice(dst)
        with torch.no_grad():
            local.copy_(full[where].to(local.device))
        return dst


def _init_weights(model: nn.Module) -> bool:
    """The model's ``init_weights()``, else ``reset_parameters()`` of each module; whether the former."""
    for m in (model, *model.parameters(), *model.modules()):  # Hugging Face skips "initialized" ones
        m.__dict__.pop("_is_hf_initialized", None)
    own = getattr(model, "init_weights", None)
    with _FullTensorInit():
        if callable(own):
            own()
            return True
        for m in model.modules():
            reset = getattr(m, "reset_parameters", None)
            if callable(reset) and m is not model:
                reset()
    return False


def materialize(model: nn.Module, device: torch.device, seed: int) -> None:
    """Allocate this rank's shards of a (sharded) meta model on ``device`` and initialize them."""
    real = {n: b for n, b in model.named_buffers() if not b.is_meta}
    meta_buffers = {n: b.dtype for n, b in model.named_buffers() if b.is_meta}
    model.to_empty(device=device)
    with torch.no_grad():
        for name, b in real.items():  # to_empty replaced them with uninitialized memory
            mod, _, leaf = name.rpartition(".")
            model.get_submodule(mod)._buffers[leaf] = b.to(device)
        for p in model.parameters():
            _local_slice(p)[0].fill_(float("nan"))
        for name, b in model.named_buffers():
            if name in meta_buffers and b.is_floating_point():
                b.fill_(float("nan"))
    torch.manual_seed(seed)
    has_init = _init_weights(model)
    _check_initialized(model, meta_buffers, has_init)


def _check_initialized(model: nn.Module, meta_buffers: dict[str, torch.dtype], has_init: bool) -> None:
    what = type(model).__name__
    for name, p in model.named_parameters():
        if bool(torch.isnan(_local_slice(p)[0]).any()):
            owner = name.rpartition(".")[0] or "the model itself"
            raise ConfigError(f"after a meta-device build, parameter {what}.{name} has no initializer: give "
                              f"{owner} a reset_parameters() method or the model an init_weights()")
    for name, b in model.named_buffers():
        if name not in meta_buffers:
            continue
        unset = bool(torch.isnan(b).any()) if b.is_floating_point() else not has_init
        if unset:
            raise ConfigError(f"buffer {what}.{name} was built on the meta device and never set; build with "
                              "parallel.meta_init = true (parameters on meta, buffers real) instead of a "
                              "meta-device factory, or give the model an init_weights() that sets it")
