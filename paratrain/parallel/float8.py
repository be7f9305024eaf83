"""Float8 training on GPUs with fp8 tensor cores (``train.float8 = "tensorwise" | "rowwise"``).

The block's ``nn.Linear`` layers become torchao's ``Float8Linear``: inputs, weights and
output gradients are cast to float8 (e4m3) with dynamic scales - one per tensor
(``tensorwise``, cuBLAS's fp8 GEMM, the fastest) or one per row (``rowwise``, more
accurate) - and the matmuls run at the fp8 tensor-core rate; master weights, optimizer
state and everything outside the linears keep their precision.  Under FSDP2 (ZeRO-2/3) the
tensorwise recipe also all-gathers the weights in float8 (half the bytes of bf16), with the
scales of all weights computed in one pass after each optimizer step
(``precompute_float8_dynamic_scale_for_fsdp``).

Needs the ``gpu`` extra (``pip install -e ".[gpu]"``: torchao) and a CUDA GPU of compute
capability >= 8.9 (Ada, Hopper, Blackwell).  The LM head and linears whose sizes are not
multiples of 16 stay in high precision (fp8 GEMMs need 16-aligned dimensions).  Applied
before ``torch.compile`` (which fuses the casts and scales into the surrounding kernels)
and before FSDP2; not combined with tensor parallel.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from paratrain.config import Config, ConfigError

REFUSED = "train.float8 needs a CUDA GPU with compute capability >= 8.9"


def check_float8_device(device: torch.device) -> None:
    """Raise the one-line ConfigError unless ``device`` has fp8 tensor cores."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        raise ConfigError(f"{REFUSED} (this run's device is {device.type}); set train.float8 = \"none\"")


def _keep_high_precision(module: nn.Module, fqn: str) -> bool:
    """False for the layers float8 must not touch: the LM head, unaligned linears."""
    if fqn.split(".")[-1] == "lm_head":
        return False
    return module.in_features % 16 == 0 and module.out_features % 16 == 0


def apply_float8(model: nn.Module, cfg: Config, device: torch.device, fsdp: bool = False) -> int:
    """Swap the model's eligible ``nn.Linear`` layers for ``Float8Linear`` (``train.float8``);
    returns how many.  ``fsdp``: the model will be sharded with FSDP2 (float8 all-gather)."""
    if cfg.train.float8 == "none":
        return 0
    if not (cfg.debug.float8_on_cpu and device.type == "cpu"):
        check_float8_device(device)
    return swap_linears_to_float8(model, cfg.train.float8, fsdp)


def swap_linears_to_float8(model: nn.Module, recipe: str, fsdp: bool = False) -> int:
    """The swap of :func:`apply_float8` without its device check (torch's float8 matmul runs
    on the CPU too, slowly: tests use it there; training refuses the CPU unless
    ``debug.float8_on_cpu``)."""
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training  # optional: the gpu extra
    except ImportError as e:
        raise ConfigError('train.float8 needs torchao: pip install -e ".[gpu]"') from e
    if recipe == "tensorwise":
        f8cfg = Float8LinearConfig(enable_fsdp_float8_all_gather=fsdp)
    else:
        f8cfg = Float8LinearConfig.from_recipe_name(recipe)
    before = sum(isinstance(m, nn.Linear) for m in model.modules())
    convert_to_float8_training(model, config=f8cfg, module_filter_fn=_keep_high_precision)
    return before - sum(type(m) is nn.Linear for m in model.modules())


def register_float8_step_hook(model: nn.Module, optimizer: torch.optim.Optimizer, cfg: Config) -> Any:
    """Under FSDP2 with the tensorwise recipe (float8 all-gather): recompute all weight scales
    once after each optimizer step (one fused pass instead of one per all-gather).  Returns
    the hook handle, or None where nothing is needed."""
    from torch.distributed.fsdp import FSDPModule

    if cfg.train.float8 != "tensorwise" or not isinstance(model, FSDPModule):
        return None
    from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp  # optional: the gpu extra

    return optimizer.register_step_post_hook(lambda *_: precompute_float8_dynamic_scale_for_fsdp(model))
