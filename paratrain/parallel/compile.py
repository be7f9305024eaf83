"""Regional compilation (``train.compile = true``): ``torch.compile`` per Transformer block, and the loss.

As torchtitan does, each repeated block is compiled on its own rather than the whole model:
the blocks are identical, so Dynamo traces one and reuses its graph for the others (compile
time is that of one layer, not of the model), and the layout's wrappers stay outside the
compiled code.  Order of application (fixed, see :mod:`paratrain.parallel.model_parallel`):
pipeline split -> tensor parallel -> activation checkpointing -> float8 -> **compile** ->
FSDP2 / DDP.  Compiling after TP and AC traces the DTensor and checkpoint logic inside the
block; compiling before FSDP2 / DDP keeps their hooks (all-gather, reduce-scatter, bucketed
all-reduce) eager around each block.

Only the block's ``forward`` is compiled (``block.forward = torch.compile(block.forward)``),
so module hooks run eagerly and parameter names are unchanged (no ``_orig_mod.`` infix):
checkpoints stay interchangeable between compiled and eager runs of any layout.

The loss (paratrain's summed token cross-entropy) is compiled too; a user's ``loss_fn``
(which calls the model itself) is left as given.

Inductor's on-disk cache goes to ``RUN_DIR/compile_cache/rank<r>`` (``TORCHINDUCTOR_CACHE_DIR``,
set before compiling: a resumed run finds its kernels there), and Inductor compiles
with as many threads as the worker has intra-op threads.  On CPU Inductor generates C++ and
needs a C++ compiler (gcc / clang) on the PATH.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from paratrain.config import Config, ConfigError
from paratrain.models.loss import token_loss_sum
from paratrain.parallel.memory_policy import blocks_of

CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


def compile_cache_dir(run_dir: Path, rank: int) -> Path:
    """Where a rank's Inductor cache lives inside the run directory."""
    return Path(run_dir) / "compile_cache" / f"rank{rank}"


def prepare_compiler(cfg: Config, rank: int) -> Path:
    """Set up Inductor for this rank before anything is compiled; return the cache directory."""
    # Inductor builds C++ kernels on CPU, and Triton builds its launchers with a C compiler on GPU
    if not (shutil.which("g++") or shutil.which("clang++") or shutil.which("c++")):
        raise ConfigError("train.compile = true needs a C++ compiler (g++ or clang++) on the PATH; "
                          "install one or set train.compile = false")
    cache = compile_cache_dir(cfg.run_dir, rank)
    cache.mkdir(parents=True, exist_ok=True)
    os.environ[CACHE_ENV] = str(cache)
    import torch._inductor.config as inductor_config  # function-local: loads Inductor only when compiling

    # workers share the machine's cores: compile with the worker's own share of them
    inductor_config.compile_threads = max(1, torch.get_num_threads())
    return cache


def _is_compiled(block: nn.Module) -> bool:
    return getattr(block, "_paratrain_compiled", False)


def apply_compile(model: nn.Module, cfg: Config, rank: int = 0, blocks: list[nn.Module] | None = None) -> int:
    """Compile each repeated block's forward in place (``train.compile``); returns how many.

    ``blocks`` defaults to the model's Transformer blocks (``layer_modules()``, after any
    activation-checkpoint wrapping).  Idempotent; a no-op when ``train.compile`` is false.
    """
    if not cfg.train.compile:
        return 0
    blocks = blocks if blocks is not None else blocks_of(model)
    if not blocks:
        raise ConfigError("train.compile = true found no repeated Transformer blocks in the model to compile; "
                          "set parallel.fsdp_block to the blocks' class name, or train.compile = false")
    prepare_compiler(cfg, rank)
    n = 0
    for block in blocks:
        if _is_compiled(block):
            continue
        # fullgraph: a graph break inside a block is a bug to see, not a silent slowdown
        block.forward = torch.compile(block.forward, fullgraph=True)
        block._paratrain_compiled = True
        n += 1
    return n


_compiled_token_loss: Callable | None = None


def token_loss_for(cfg: Config) -> Callable:
    """The summed token cross-entropy paratrain's LM loss uses: compiled when ``train.compile`` is
    on (the model's blocks are compiled by :func:`apply_compile`).

    Left eager: vocabulary-parallel logits (``parallel.loss_parallel`` with tp > 1), whose DTensor
    cross-entropy runs inside ``loss_parallel()``; a user's own loss is never touched."""
    global _compiled_token_loss
    p = cfg.parallel
    if not cfg.train.compile or (p.loss_parallel and p.tp > 1):
        return token_loss_sum
    if _compiled_token_loss is None:
        _compiled_token_loss = torch.compile(token_loss_sum, fullgraph=True)
    return _compiled_token_loss
