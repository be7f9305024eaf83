"""The Python API: ``paratrain.train(config, model=..., loss_fn=..., train_data=..., val_data=...)``.

See docs/python-api.md.  From a plain ``python script.py`` the call starts the local workers
itself (``parallel.nproc`` of them, plus parameter servers for ``parallel.sync = "ps"``); under
torchrun it runs as that one rank; with ``nproc = 1`` it trains in this process.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from paratrain.config import Config, ConfigError
from paratrain.data.user_data import precheck


class TrainingFailed(RuntimeError):
    """A run ended without finishing (a worker died, a hang was detected); ``.result`` holds its summary."""

    def __init__(self, result: RunResult) -> None:
        super().__init__(result.summary.get("error") or "training failed")
        self.result = result


@dataclass
class RunResult:
    """What a run left behind: its directory and ``summary.json`` (see CONTRACT.md for the keys)."""

    run_dir: Path
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.summary.get("status") == "ok"

    @property
    def final_loss(self) -> float | None:
        return self.summary.get("final_loss")

    @property
    def val_loss(self) -> float | None:
        return self.summary.get("val_loss")

    def metrics(self) -> list[dict[str, Any]]:
        """The rows of metrics.jsonl (one per logged step)."""
        import json

        path = self.run_dir / "metrics.jsonl"
        return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []

    def losses(self) -> dict[int, float]:
        """Training loss by step (the logged steps)."""
        return {r["step"]: r["loss"] for r in self.metrics() if "loss" in r}

    def checkpoint(self, step: int | None = None) -> Path:
        """The directory of checkpoint ``step`` (default: the newest)."""
        from paratrain.training import checkpoint as ckpt

        root = self.run_dir / "checkpoints"
        path = root / f"step_{step}" if step is not None else ckpt.latest(root)
        if path is None or not path.is_dir():
            raise ConfigError(f"no checkpoint {'step ' + str(step) if step is not None else ''} in {root}")
        return path

    def state_dict(self, step: int | None = None) -> dict[str, torch.Tensor]:
        """The full (unsharded) model state dict saved in a checkpoint; load it with
        ``model.load_state_dict(...)`` into a model built the same way."""
        from paratrain.training import checkpoint as ckpt

        path = self.checkpoint(step)
        ckpt.verify(path)
        return ckpt.load_file(path, "model.pt")

    def export_safetensors(self, path: str | os.PathLike, step: int | None = None) -> Path:
        """Write the checkpoint's full state dict to one ``.safetensors`` file (tied weights are
        stored once; the metadata names their aliases)."""
        import json

        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {}
        aliases: dict[str, str] = {}
        seen: dict[tuple, str] = {}
        for name, t in self.state_dict(step).items():
            if not isinstance(t, torch.Tensor):
                continue
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
            if t.numel() and key in seen:
                aliases[name] = seen[key]
                continue
            seen[key] = name
            tensors[name] = t.detach().contiguous().clone()
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(out), metadata={"format": "pt", "aliases": json.dumps(aliases)})
        return out


def _as_config(config: Config | str | os.PathLike | None, own_model: bool = True) -> Config:
    if config is None:
        return Config.default()
    if isinstance(config, Config):
        config.validate(own_model=own_model)
        return config
    if isinstance(config, (str, os.PathLike)):
        return Config.load(config, own_model=own_model)
    raise ConfigError(f"config must be a paratrain.Config or a TOML path, got {type(config).__name__}")


def _check_pieces(model: Any, loss_fn: Any, train_data: Any, val_data: Any) -> None:
    if model is not None and not (isinstance(model, nn.Module) or callable(model)):
        raise ConfigError(f"model must be an nn.Module or a zero-argument factory, got {type(model).__name__}")
    if loss_fn is not None and not callable(loss_fn):
        raise ConfigError(f"loss_fn must be callable as loss_fn(model, batch), got {type(loss_fn).__name__}")
    for name, data in (("train_data", train_data), ("val_data", val_data)):
        if data is None:
            continue
        if isinstance(data, (str, bytes, dict, torch.Tensor)) or not (
                hasattr(data, "__iter__") or hasattr(data, "__getitem__")):
            raise ConfigError(f"{name} is a {type(data).__name__}: pass a map-style Dataset or an iterable "
                              "of batches (a list, a DataLoader)")


def train(config: Config | str | os.PathLike | None = None, *, model: nn.Module | Callable[[], nn.Module] | None = None,
          loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None, train_data: Any = None,
          val_data: Any = None, tp_plan: dict[str, Any] | None = None,
          pp_split: Sequence[str] | None = None) -> RunResult:
    """Train per ``config`` (a :class:`Config`, a TOML path, or None for the defaults).

    ``model``: an ``nn.Module`` or, preferably, a zero-argument factory (each rank builds its own
    copy from the same seed); default: paratrain's model from ``[model]``.  ``loss_fn(model,
    batch)`` returns the *mean* loss over the batch; default: the model's own loss (a scalar, or
    ``.loss``).  ``train_data`` / ``val_data``: a map-style Dataset (sharded by rank, collated by
    its ``collate_fn`` or torch's default) or an iterable of batches; default: ``[data]``.
    ``tp_plan`` / ``pp_split``: tensor / pipeline parallel layout of a foreign model.
    Raises :class:`ConfigError` for user errors and :class:`TrainingFailed` when a run breaks.
    """
    from paratrain.parallel.pipeline_foreign import check_split, n_stages
    from paratrain.training import launch as L
    from paratrain.training import rundir
    from paratrain.training.handoff import IMPORTING_MAIN
    from paratrain.training.user_model import MeanLoss, check_plans, is_own_spec, own_models

    if os.environ.get(IMPORTING_MAIN):
        raise ConfigError(f"paratrain.train() ran while a worker imported {os.environ[IMPORTING_MAIN]}; "
                          "put the call under `if __name__ == \"__main__\":`")
    cfg = _as_config(config, is_own_spec(model))
    _check_pieces(model, loss_fn, train_data, val_data)
    for name, data in (("train_data", train_data), ("val_data", val_data)):
        if data is not None:
            precheck(data, cfg.data.batch_size, name)
    if isinstance(model, nn.Module) or isinstance(model, type) and issubclass(model, nn.Module):
        cls = model if isinstance(model, type) else type(model)
        if not issubclass(cls, own_models()):
            check_plans(cfg, cls.__name__, tp_plan, pp_split)  # before any worker starts
            if isinstance(model, nn.Module) and cfg.parallel.pp > 1:
                check_split(model, list(pp_split or ()), n_stages(cfg))
    if loss_fn is not None:
        loss_fn = MeanLoss(loss_fn, f"loss_fn {getattr(loss_fn, '__qualname__', type(loss_fn).__name__)}")
    injected = {k: v for k, v in dict(model=model, loss_fn=loss_fn, train_data=train_data, val_data=val_data,
                                      tp_plan=tp_plan, pp_split=list(pp_split) if pp_split else None).items()
                if v is not None}
    own_data = train_data is None
    with rundir.hold(cfg) as done:  # one writer per run dir; a finished resumed run is not retrained
        if done is not None:
            return _finish(cfg, done)
        if L.under_torchrun():
            os.environ.setdefault("PARATRAIN_START_TIME", repr(time.time()))
            if int(os.environ.get("RANK", "0")) == 0:
                L.prepare_run_dir(cfg)
            if own_data:
                L._prepare_data(cfg)
            return _finish(cfg, L.run_worker(cfg, **injected))
        os.environ["PARATRAIN_START_TIME"] = repr(time.time())
        L._check_resume(cfg)
        if cfg.parallel.nproc == 1 and cfg.parallel.sync != "ps":
            L.prepare_run_dir(cfg)
            if own_data:
                L._prepare_data(cfg)
            return _finish(cfg, L.run_worker(cfg, **injected))
        return _finish(cfg, _spawn(cfg, injected, own_data))


def _spawn(cfg: Config, injected: dict[str, Any], own_data: bool) -> dict[str, Any]:
    """Start the local workers with the injected pieces pickled into a private temp dir."""
    from paratrain.training import launch as L
    from paratrain.training.handoff import read_error, save_injected

    tmp = Path(tempfile.mkdtemp(prefix="paratrain-injected-"))
    try:
        worker_args: tuple[str, ...] = ()
        if injected:
            worker_args = ("--injected", str(save_injected(tmp, injected, cfg.parallel.nproc)))
        run_dir = L.prepare_run_dir(cfg)
        if own_data:
            L._prepare_data(cfg)
        summary = L.spawn_workers(cfg, run_dir, worker_args)
        error = read_error(tmp)
        if error is not None and summary.get("status") != "ok":
            raise ConfigError(error)
        return summary
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _finish(cfg: Config, summary: dict[str, Any]) -> RunResult:
    result = RunResult(cfg.run_dir, summary)
    if not result.ok:
        raise TrainingFailed(result)
    return result
