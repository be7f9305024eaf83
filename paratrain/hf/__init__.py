"""Hugging Face checkpoints in and out: per-family state-dict adapters (:mod:`.gpt2`, :mod:`.llama`),
``paratrain import-hf`` (:mod:`.convert`), ``paratrain export-hf`` (:mod:`.export`) and
``model.init_from = "hf:DIR"`` (:func:`init_from`).

Only local directories are read (``config.json`` + ``model.safetensors`` or a sharded
``model.safetensors.index.json``); nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from paratrain.errors import ConfigError
from paratrain.hf import gpt2, llama
from paratrain.hf.common import Adapter, check_model_config, iter_tensors, load_converted, model_dir, read_config

ADAPTERS: tuple[Adapter, ...] = (gpt2.ADAPTER, llama.ADAPTER)


def adapter_for(hf_config: dict[str, Any] | None = None, arch: str | None = None) -> Adapter:
    """The adapter of an HF ``config.json`` (by ``model_type``) or of a paratrain ``model.arch``."""
    for a in ADAPTERS:
        if (hf_config is not None and hf_config.get("model_type") in a.model_types) or a.arch == arch:
            return a
    if hf_config is not None:
        known = ", ".join(t for a in ADAPTERS for t in a.model_types)
        raise ConfigError(f"HF model_type {hf_config.get('model_type')!r} has no paratrain adapter "
                          f"(supported: {known})")
    raise ConfigError(f"model.arch = {arch!r} has no Hugging Face adapter "
                      f"(supported: {', '.join(a.arch for a in ADAPTERS)})")


def hf_dir_of(spec: str) -> Path:
    """The directory of an ``hf:DIR`` spec (as written in ``model.init_from``)."""
    if not spec.startswith("hf:"):
        raise ConfigError(f"model.init_from = {spec!r} must be 'hf:DIR' (a local Hugging Face model directory)")
    return model_dir(spec[3:])


def check_init_from(model_cfg: Any, vocab: int | None = None) -> tuple[Path, dict[str, Any], Adapter]:
    """Check ``model.init_from``'s checkpoint against ``[model]`` without reading weights; returns
    (directory, its config.json, adapter).  ``vocab``: the model's vocabulary when known (else
    ``model.vocab_size``, when set).  A mismatch (architecture, vocabulary, layers, widths, heads)
    is refused in one line naming it."""
    return _check(hf_dir_of(model_cfg.init_from), model_cfg, vocab)


def _check(d: Path, model_cfg: Any, vocab: int | None) -> tuple[Path, dict[str, Any], Adapter]:
    hf = read_config(d)
    a = adapter_for(hf)
    source = f"HF checkpoint {d}"
    if a.arch != model_cfg.arch:
        raise ConfigError(f"{source} is a {hf.get('model_type')} model (paratrain arch {a.arch!r}) but "
                          f"model.arch = {model_cfg.arch!r}; set model.arch = {a.arch!r}")
    want = {k: v for k, v in a.model_keys(hf).items() if k != "arch" and k not in a.free_keys}
    vocab = vocab or model_cfg.vocab_size
    if not vocab:
        want.pop("vocab_size")  # taken from the data: checked when the weights are loaded
    check_model_config(want, model_cfg, vocab, source)
    return d, hf, a


def load_hf_weights(model: nn.Module, model_cfg: Any, hf_dir: str | Path) -> None:
    """Fill a freshly built single-device paratrain ``model`` (built from ``model_cfg``) with the
    weights of a local HF model directory, one safetensors shard at a time (configs checked first,
    see :func:`check_init_from`)."""
    vocab = int(getattr(model, "vocab_size", 0) or model_cfg.vocab_size)
    d, hf, a = _check(model_dir(hf_dir), model_cfg, vocab)
    converted = ((pt, t) for name, t in iter_tensors(d) for pt, t in a.to_paratrain(name, t, hf))
    load_converted(model, converted, f"HF checkpoint {d}")


def init_from(model: nn.Module, model_cfg: Any) -> nn.Module:
    """Apply ``model.init_from`` to a freshly built model (no-op when it is empty); returns it."""
    spec = getattr(model_cfg, "init_from", "")
    if spec:
        load_hf_weights(model, model_cfg, hf_dir_of(spec))
    return model


__all__ = ["ADAPTERS", "Adapter", "adapter_for", "check_init_from", "hf_dir_of", "init_from", "load_hf_weights"]
