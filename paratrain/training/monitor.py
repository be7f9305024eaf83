"""What watches a run from inside the training loop: watchdog, goodput, TensorBoard.

The trainer makes one :class:`RunMonitor` per rank at the start of ``fit`` and calls
``step_end`` once per step; the monitor

- feeds the hang watchdog (``train.hang_timeout_s``, see :mod:`paratrain.training.watchdog`);
- keeps the productive step time (also stored in checkpoints, so a restarted run counts
  only the steps that survived) and, on rank 0, ``RUN_DIR/goodput.json`` (the job start and
  every recovery of the elastic agent with its lost time, from the failure to the first step
  after the restart) and ``RUN_DIR/goodput.progress`` (the last finished step);
- adds ``mfu`` and ``rss_mb`` to the logged metrics and mirrors them to TensorBoard when
  the ``tensorboard`` package is installed (``RUN_DIR/tensorboard``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import struct
import time
from pathlib import Path
from typing import Any

import torch

from paratrain.fileio import write_json_atomic
from paratrain.mfu import honest_peak, mfu
from paratrain.processes import restart_count
from paratrain.training.metrics import peak_rss_mb
from paratrain.training.watchdog import start_watchdog

GOODPUT_FILE = "goodput.json"


class Goodput:
    """Rank 0's record of job start, progress and recoveries across elastic restarts.

    ``goodput.json`` holds the job start and the recoveries; the last finished step and its
    time go to ``goodput.progress`` (16 bytes rewritten in place every step: cheap, and exact
    up to the last step before a SIGKILL).
    """

    _REC = struct.Struct("<qd")  # step, wall time

    def __init__(self, run_dir: Path, start_step: int, job_start: float | None = None):
        self.path = Path(run_dir) / GOODPUT_FILE
        self.run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
        self.attempt = restart_count()
        now = time.time()
        prev = self._read()
        progress = self.path.with_suffix(".progress")
        self.pending: dict[str, Any] | None = None
        if self.attempt > 0 and prev and prev.get("run_id") == self.run_id:
            self.job_start = prev["job_start"]
            self.recoveries = prev.get("recoveries", [])
            last_step, last_t = prev.get("last_step", start_step), prev.get("last_step_t", now)
            with contextlib.suppress(OSError, struct.error):
                last_step, last_t = self._REC.unpack(progress.read_bytes()[: self._REC.size])
            self.pending = {"attempt": self.attempt, "failed_after_step": last_step,
                            "resumed_from_step": start_step, "failed_at": last_t}
        else:
            self.job_start = job_start if job_start is not None else now
            self.recoveries = []
        self.last_step, self.last_step_t = start_step, now
        self._fd = os.open(progress, os.O_RDWR | os.O_CREAT, 0o644)
        self._mark()
        self._write()

    def _read(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def _mark(self) -> None:
        if self._fd is not None:
            os.pwrite(self._fd, self._REC.pack(self.last_step, self.last_step_t), 0)

    def _write(self) -> None:
        state = {"run_id": self.run_id, "job_start": self.job_start, "attempt": self.attempt,
                 "last_step": self.last_step, "last_step_t": self.last_step_t, "recoveries": self.recoveries}
        write_json_atomic(self.path, state)

    def step_end(self, step: int) -> None:
        now = time.time()
        self.last_step, self.last_step_t = step, now
        self._mark()
        if self.pending is not None:
            rec = self.pending
            rec["lost_s"] = now - rec.pop("failed_at")
            self.recoveries.append(rec)
            self.pending = None
            self._write()

    def summary(self, productive_s: float) -> dict[str, Any]:
        self._write()
        wall = max(time.time() - self.job_start, 1e-9)
        return {"goodput": min(1.0, productive_s / wall), "productive_s": productive_s,
                "restarts": self.attempt, "lost_s": sum(r.get("lost_s", 0.0) for r in self.recoveries),
                "recoveries": self.recoveries}

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _tensorboard(run_dir: Path):
    """A SummaryWriter when the optional ``tensorboard`` package is installed, else None."""
    if importlib.util.find_spec("tensorboard") is None:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(Path(run_dir) / "tensorboard"))
    except Exception:  # noqa: BLE001 - TensorBoard is optional: a broken install must not stop training
        return None


class RunMonitor:
    """Watchdog + goodput + TensorBoard for one rank; see the module docstring."""

    def __init__(self, cfg, dims, productive_s: float, start_step: int, peak_flops: float,
                 flops_per_token: float, job_start: float | None = None):
        self.is_main = dims.is_main
        self.world = dims.world_size
        self.productive_s = productive_s
        self.peak, self.flops_per_token = peak_flops, flops_per_token
        self.watchdog = start_watchdog(cfg.train.hang_timeout_s, dims.rank, dims.world_size, cfg.run_dir)
        self.goodput = Goodput(cfg.run_dir, start_step, job_start) if self.is_main else None
        self.tb = _tensorboard(cfg.run_dir) if self.is_main else None

    def step_end(self, step: int, step_s: float, record: dict[str, Any]) -> None:
        """After each step (``record``: the metrics line being logged, possibly empty; extended in place)."""
        self.productive_s += step_s
        if self.watchdog is not None:
            self.watchdog.step_done(step)
        if not self.is_main:
            return
        self.goodput.step_end(step)
        if record and "tokens_per_s" in record:
            if self.peak:
                achieved = self.flops_per_token * record["tokens_per_s"] / self.world
                record["mfu"] = mfu(self.flops_per_token, record["tokens_per_s"], self.world,
                                    honest_peak([self.peak], achieved))
            record["rss_mb"] = peak_rss_mb()
        if record and self.tb is not None:
            self._log_tb(step, record)

    def _log_tb(self, step: int, record: dict[str, Any]) -> None:
        for key, value in record.items():
            if key == "step":
                continue
            tag = ("val/" if key.startswith("val_") else "train/") + key
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.tb.add_scalar(tag, value, step)
            elif isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value):
                self.tb.add_histogram(tag, torch.tensor(value, dtype=torch.float64), step)
            elif isinstance(value, dict) and "stale" in key and value:  # {staleness: count}
                vals = torch.tensor([float(k) for k in value], dtype=torch.float64)
                samples = torch.repeat_interleave(vals, torch.tensor([int(c) for c in value.values()]))
                if samples.numel():
                    self.tb.add_histogram(tag, samples, step)

    def summary(self) -> dict[str, Any]:
        """Goodput fields for summary.json (rank 0; empty elsewhere)."""
        return self.goodput.summary(self.productive_s) if self.goodput is not None else {}

    def close(self) -> None:
        if self.goodput is not None:
            self.goodput.close()
        if self.watchdog is not None:
            self.watchdog.stop()
            self.watchdog = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None
