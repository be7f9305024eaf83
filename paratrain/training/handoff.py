"""Handing the user's model factory, loss and datasets to worker processes (pickle, by reference).

``paratrain.train`` started from ``python script.py`` spawns its workers as
``python -m paratrain.training.worker_main CONFIG --injected FILE``.  FILE (in a private temp dir)
holds two pickles: a header (the parent's ``sys.path`` and main script) and the injected
objects.  Functions and classes pickle by reference, so a factory must be importable: a
module-level function or class, not a lambda or nested function.  When they live in the
parent's main script, the worker first runs that script as ``__mp_main__`` (as
multiprocessing's spawn does), so the call to ``paratrain.train`` must sit under
``if __name__ == "__main__":``.  A worker's user error comes back as ``error_rank{R}.txt``.
"""

from __future__ import annotations

import importlib
import os
import pickle
import pickletools
import runpy
import sys
import types
from pathlib import Path
from typing import Any

from paratrain.config import ConfigError

IMPORTING_MAIN = "PARATRAIN_IMPORTING_MAIN"

_HINTS = {
    "model": "use a module-level function or class as the factory (not a lambda or nested function)",
    "loss_fn": "use a module-level function (not a lambda or nested function)",
    "train_data": "pass a Dataset, a list or a DataLoader (not a generator), defined at module level",
    "val_data": "pass a Dataset, a list or a DataLoader (not a generator), defined at module level",
}


def _mentions_main(data: bytes) -> bool:
    """Whether a pickle refers to something defined in ``__main__``."""
    return any(isinstance(arg, str) and arg.startswith("__main__")
               for _, arg, _ in pickletools.genops(data))


def _main_origin() -> dict[str, Any]:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return {"main_module": spec.name if spec is not None and spec.name != "__main__" else "",
            "main_path": os.path.abspath(main.__file__) if getattr(main, "__file__", None) else ""}


def save_injected(directory: Path, injected: dict[str, Any], nproc: int) -> Path:
    """Pickle ``injected`` into ``directory``; a piece that cannot go to workers is a ConfigError."""
    blobs = {}
    for name, obj in injected.items():
        hint = _HINTS.get(name, "make it importable") + ", or run the script under torchrun"
        try:
            blobs[name] = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        except (pickle.PicklingError, AttributeError, TypeError) as e:
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ConfigError(f"paratrain.train: {name} cannot be sent to {nproc} worker processes ({why}); "
                              f"{hint}") from None
    origin = _main_origin()
    uses_main = [n for n, b in blobs.items() if _mentions_main(b)]
    if uses_main and not (origin["main_module"] or origin["main_path"]):
        raise ConfigError(
            f"paratrain.train: {uses_main[0]} is defined in an interactive session, which worker processes "
            "cannot import; move it into a .py file, set parallel.nproc = 1, or run under torchrun"
        )
    header = {"sys_path": list(sys.path), "cwd": os.getcwd(), "uses_main": bool(uses_main), **origin}
    path = directory / "injected.pkl"
    with open(path, "wb") as f:
        pickle.dump(header, f)
        pickle.dump(blobs, f)
    return path


def _import_main(header: dict[str, Any]) -> None:
    """Make the parent's main script importable as ``__main__`` (multiprocessing-spawn style)."""
    os.environ[IMPORTING_MAIN] = header.get("main_path") or header.get("main_module") or "?"
    try:
        if header["main_module"]:
            module = importlib.import_module(header["main_module"])
        else:
            module = types.ModuleType("__mp_main__")
            sys.modules["__mp_main__"] = module
            module.__dict__.update(runpy.run_path(header["main_path"], run_name="__mp_main__"))
    finally:
        os.environ.pop(IMPORTING_MAIN, None)
    sys.modules["__main__"] = sys.modules["__mp_main__"] = module


def load_injected(path: str | Path) -> dict[str, Any]:
    """The objects :func:`save_injected` wrote (in a worker process)."""
    with open(path, "rb") as f:
        header = pickle.load(f)
        blobs = pickle.load(f)
    for p in reversed(header["sys_path"]):
        if p not in sys.path:
            sys.path.insert(0, p or header["cwd"])
    if header["uses_main"]:
        _import_main(header)
    out = {}
    for name, blob in blobs.items():
        try:
            out[name] = pickle.loads(blob)
        except (AttributeError, ImportError) as e:
            raise ConfigError(f"a worker process cannot load {name}: {e}") from None
    return out


def write_error(directory: Path, message: str) -> None:
    """A worker's one-line user error, for the parent to raise."""
    rank = os.environ.get("RANK", "0")
    (directory / f"error_rank{rank}.txt").write_text(message)


def read_error(directory: Path) -> str | None:
    """The lowest rank's user error written by :func:`write_error`, if any."""
    found = sorted(directory.glob("error_rank*.txt"), key=lambda p: int(p.stem.removeprefix("error_rank")))
    return found[0].read_text() if found else None
