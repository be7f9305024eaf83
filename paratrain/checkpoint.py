"""Atomic, checksummed checkpoints: ``<run>/checkpoints/step_N/``.

Layout of one checkpoint directory::

    model.pt          full model state dict (rank 0)
    optim.pt          optimizer + LR schedule state (rank 0, or one file per rank: optim_rank{r}.pt)
    rank{r}.pt        per-rank state: RNG states
    meta.json         step, data position, strategy, world size
    dcp/              model-parallel layouts: model + optimizer via torch.distributed.checkpoint,
                      loadable under any layout (model.pt is then rebuilt from it by rank 0;
                      optim.pt holds the LR schedule only); see parallel/dist_checkpoint.py
    manifest.json     sha256 and size of every file above (written last)

Ranks write into ``step_N.tmp``; rank 0 then writes the manifest and renames the directory,
so a checkpoint either exists whole or not at all.  Loading verifies every checksum first
and always uses ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from paratrain.errors import ConfigError
from paratrain.fileio import dumps_strict, sha256_file

_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(ConfigError):
    """A checkpoint is missing, truncated or corrupt (a user-facing error, exit code 2)."""


def tmp_dir(root: Path, step: int) -> Path:
    return root / f"step_{step}.tmp"


def begin(root: Path, step: int) -> Path:
    """Rank 0: create a fresh temp dir for checkpoint ``step`` (call before the barrier)."""
    tmp = tmp_dir(root, step)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def save_file(tmp: Path, name: str, obj: Any) -> None:
    """Write one object into the temp checkpoint dir (any rank)."""
    if name.endswith(".json"):
        (tmp / name).write_text(dumps_strict(obj, indent=1))
    else:
        torch.save(obj, tmp / name)


def commit(root: Path, step: int, keep: int) -> Path:
    """Rank 0, after every rank wrote its files: manifest, fsync, rename, prune old ones."""
    tmp = tmp_dir(root, step)
    files = {}
    for p in sorted(tmp.rglob("*")):
        if p.is_file():
            files[str(p.relative_to(tmp))] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    (tmp / "manifest.json").write_text(json.dumps({"step": step, "files": files}, indent=1))
    final = root / f"step_{step}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    if keep > 0:
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint dirs under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest(root: Path) -> Path | None:
    ckpts = list_checkpoints(root)
    return ckpts[-1] if ckpts else None


def _read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of checkpoint ``path``, checked for shape: ``{"step": int, "files": {name: {...}}}``."""
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {path} has no manifest.json (incomplete or not a checkpoint)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"checkpoint {path}: manifest.json is corrupt") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    ok = isinstance(files, dict) and bool(files) and all(
        isinstance(info, dict) and isinstance(info.get("sha256"), str) and _is_count(info.get("bytes"))
        and not Path(name).is_absolute() and ".." not in Path(name).parts for name, info in files.items())
    if not ok:
        raise CheckpointError(f"checkpoint {path}: manifest.json does not list the checkpoint's files with their "
                              "sha256 and size; delete this checkpoint to resume from an older one")
    return manifest


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def verify(path: Path) -> dict[str, Any]:
    """Check every file against the manifest and meta.json's step; return the manifest or raise
    CheckpointError."""
    manifest = _read_manifest(path)
    for name, info in manifest["files"].items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path} is missing {name}; resume from an older checkpoint")
        if f.stat().st_size != info["bytes"] or sha256_file(f) != info["sha256"]:
            raise CheckpointError(
                f"checkpoint {path}: {name} is corrupt or truncated (checksum mismatch); "
                "delete it to resume from an older one"
            )
    if "meta.json" in manifest["files"]:
        load_file(path, "meta.json")  # checks the step
    return manifest


def _check_meta(path: Path, meta: Any) -> dict[str, Any]:
    """meta.json must be an object whose ``step`` is a whole number >= 0 matching the dir name."""
    step = meta.get("step") if isinstance(meta, dict) else None
    m = _STEP_DIR.match(path.name)
    if not _is_count(step) or (m is not None and int(m.group(1)) != step):
        raise CheckpointError(f"checkpoint {path}: meta.json has step {step!r}, not the whole number "
                              f"{m.group(1) if m else '>= 0'} its directory names; delete this checkpoint "
                              "to resume from an older one")
    return meta


def load_model(path: Path, expected: dict[str, Any]) -> dict[str, Any]:
    """``model.pt`` of checkpoint ``path``, checked against the names and shapes of ``expected`` (the
    live model's state dict): one line naming the first tensor that differs, not torch's list."""
    state = load_file(path, "model.pt")
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path}: model.pt is not a state dict")
    for name, want in expected.items():
        if name not in state:
            raise CheckpointError(f"checkpoint {path} has no tensor '{name}' that this model has; it was saved by "
                                  "a different model: resume with the [model] settings it was trained with")
        got = state[name]
        if isinstance(got, torch.Tensor) and tuple(got.shape) != tuple(want.shape):
            raise CheckpointError(f"checkpoint {path}: tensor '{name}' has shape {list(got.shape)} but this model's "
                                  f"has {list(want.shape)}; resume with the [model] settings it was trained with")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise CheckpointError(f"checkpoint {path} holds tensor '{extra[0]}' that this model lacks; it was saved "
                              "by a different model: resume with the [model] settings it was trained with")
    return state


def periodic_save_due(c: Any, step: int) -> bool:
    """Whether ``checkpoint.every`` asks for a checkpoint after ``step`` (``c``: the [checkpoint] section)."""
    return bool(c.every) and step % c.every == 0


def final_save_due(c: Any, step: int, first_step: int) -> bool:
    """After the loop: save the last step when checkpoints are on (``every`` or ``keep`` > 0),
    it trained at least one step, and the periodic save did not just write it."""
    return bool(c.every or c.keep) and step > first_step and not periodic_save_due(c, step)


def load_file(path: Path, name: str) -> Any:
    """Load one verified file (tensors only: weights_only=True)."""
    f = path / name
    if name.endswith(".json"):
        try:
            obj = json.loads(f.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"checkpoint {path}: {name} is not valid JSON") from None
        return _check_meta(path, obj) if name == "meta.json" else obj
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated pickles, wrong format
        raise CheckpointError(f"checkpoint {path}: cannot load {name}: {e}") from None
