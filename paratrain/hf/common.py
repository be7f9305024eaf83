"""What every Hugging Face adapter shares: reading a local HF model directory one shard at a time,
checking a paratrain ``[model]`` config against it, copying converted tensors into a model, and
writing an HF directory.

An adapter (one module per model family, see :mod:`paratrain.hf.gpt2`, :mod:`paratrain.hf.llama`)
is an :class:`Adapter`: the HF ``model_type`` values it reads, paratrain's ``model.arch``, and four
pure functions converting configs and tensor names in both directions.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from paratrain.errors import ConfigError

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"

Named = Iterator[tuple[str, Tensor]]


@dataclass(frozen=True)
class Adapter:
    """State-dict adapter of one model family.

    ``model_keys(hf_config)`` -> paratrain ``[model]`` keys (refusing what paratrain's model cannot
    express); ``hf_config(model_cfg, vocab)`` -> the ``config.json`` dict; ``to_paratrain(name, t,
    hf_config)`` -> the paratrain tensors made from one HF tensor (none for buffers HF stores);
    ``to_hf(state, model_cfg)`` -> HF tensors from a full paratrain state dict.  ``free_keys`` may
differ between the checkpoint and the model it is loaded into.
    """

    arch: str
    model_types: tuple[str, ...]
    model_keys: Callable[[dict[str, Any]], dict[str, Any]]
    hf_config: Callable[[Any, int], dict[str, Any]]
    to_paratrain: Callable[[str, Tensor, dict[str, Any]], Named]
    to_hf: Callable[[dict[str, Tensor], Any], Named]
    free_keys: tuple[str, ...] = ()  # [model] keys that do not shape any weight (llama: max_seq_len)


def _regex(template: str) -> re.Pattern[str]:
    return re.compile(re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)"))


def rename(name: str, pairs: list[tuple[str, str]], to_hf: bool = False) -> str | None:
    """``name`` mapped through ``(hf template, paratrain template)`` pairs (``{i}`` is a layer
    index), paratrain -> HF with ``to_hf``; None when no template matches."""
    for hf, pt in pairs:
        src, dst = (pt, hf) if to_hf else (hf, pt)
        m = _regex(src).fullmatch(name)
        if m:
            return dst.replace("{i}", m.group("i")) if "{i}" in src else dst
    return None


# ---- reading ----------------------------------------------------------------------------------
def model_dir(path: str | Path) -> Path:
    """A local HF model directory (``config.json`` + safetensors); ConfigError naming what is missing."""
    d = Path(os.path.expanduser(str(path)))
    if not d.is_dir():
        raise ConfigError(f"HF model directory '{d}' does not exist; give a local directory saved by "
                          "save_pretrained (nothing is downloaded)")
    if not (d / CONFIG).is_file():
        raise ConfigError(f"'{d}' has no config.json; it is not a Hugging Face model directory")
    if not (d / SINGLE).is_file() and not (d / INDEX).is_file():
        raise ConfigError(f"'{d}' has neither {SINGLE} nor {INDEX}; save it with safe_serialization "
                          "(PyTorch .bin weights are not read)")
    return d


def read_config(d: Path) -> dict[str, Any]:
    """``config.json`` of an HF model directory."""
    try:
        return json.loads((d / CONFIG).read_text())
    except ValueError as e:
        raise ConfigError(f"{d / CONFIG} is not valid JSON ({e})") from None


def shard_files(d: Path) -> list[Path]:
    """The safetensors files of ``d`` in index order (one file when unsharded)."""
    if (d / INDEX).is_file():
        try:
            weight_map = json.loads((d / INDEX).read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{d / INDEX} is corrupt ({type(e).__name__}: {e})") from None
        names = list(dict.fromkeys(weight_map.values()))
        missing = [n for n in names if not (d / n).is_file()]
        if missing:
            raise ConfigError(f"{d / INDEX} lists {missing[0]}, which is not in {d}; copy every shard")
        return [d / n for n in names]
    return [d / SINGLE]


def iter_tensors(d: Path) -> Named:
    """Every tensor of an HF model directory, read one shard at a time (and one tensor at a time
    within a shard, through ``safe_open``'s memory map)."""
    from safetensors import SafetensorError, safe_open

    for path in shard_files(d):
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise ConfigError(f"{path} is not a readable safetensors file ({e}); copy it again") from None


# ---- checking and loading ---------------------------------------------------------------------
def check_model_config(expected: dict[str, Any], model_cfg: Any, vocab: int, source: str) -> None:
    """Refuse, in one line, the first ``[model]`` key that differs from what the checkpoint needs."""
    for key, want in expected.items():
        have = vocab if key == "vocab_size" else getattr(model_cfg, key, None)
        if key == "n_kv_head" and not have:  # 0 means one key/value head per query head
            have = model_cfg.n_head
        if have is None:
            raise ConfigError(f"{source} needs model.{key} = {want!r}, which this paratrain has no key for")
        if isinstance(want, float) and isinstance(have, (int, float)):
            same = abs(float(have) - want) <= 1e-9 * max(1.0, abs(want))
        else:
            same = have == want
        if not same:
            raise ConfigError(f"{source} has {key} = {want!r} but the model has {key} = {have!r}; set "
                              f"model.{key} = {want!r} (or `paratrain import-hf` for a matching config)")


def load_converted(model: nn.Module, tensors: Named, source: str) -> None:
    """Copy converted ``(paratrain name, tensor)`` pairs into ``model``'s parameters and buffers,
    in place; every parameter must be filled exactly once (a tied alias counts as filled)."""
    state = model.state_dict(keep_vars=True)
    owner: dict[str, str] = {}  # tied names -> the first name of the same tensor
    first: dict[int, str] = {}
    for name, t in state.items():
        owner[name] = first.setdefault(id(t), name)
    filled: set[str] = set()
    with torch.no_grad():
        for name, t in tensors:
            if name not in state:
                raise ConfigError(f"{source}: tensor {name} has no place in paratrain's "
                                  f"{type(model).__name__}; is the architecture right?")
            target = state[name]
            if tuple(target.shape) != tuple(t.shape):
                raise ConfigError(f"{source}: {name} has shape {tuple(t.shape)} but the model's is "
                                  f"{tuple(target.shape)}; the configs differ")
            target.copy_(t)
            filled.add(owner[name])
    params = {owner[n] for n, _ in model.named_parameters(remove_duplicate=False)}
    missing = sorted(params - filled)
    if missing:
        raise ConfigError(f"{source} has no weight for {missing[0]} ({len(missing)} missing); "
                          "the checkpoint is incomplete or of another architecture")


# ---- writing ----------------------------------------------------------------------------------
def write_hf_dir(out: Path, config: dict[str, Any], tensors: Named) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (contiguous fp tensors, ``format=pt``)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {name: t.detach().contiguous().clone() for name, t in tensors}
    save_file(state, str(out / SINGLE), metadata={"format": "pt"})
    (out / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out
