"""Metrics out of the trainer: metrics.jsonl, the progress line, memory, and the MFU fields
(computed by :mod:`paratrain.mfu`)."""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

from paratrain.fileio import dumps_strict, stdout_to_devnull
from paratrain.mfu import device_peak_flops, honest_peak, mfu


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MB (Linux reports ru_maxrss in KB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_peak_flops(device: torch.device, dtype: str) -> float:
    """The device's peak FLOP/s for ``dtype`` (see :mod:`paratrain.mfu`): spec sheet on GPUs,
    a matmul measured now on CPUs (the trainer calls this at the start of a run)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return device_peak_flops(device.type, name, dtype)


def mfu_fields(device: torch.device, dtype: str, start_peak: float, flops_per_token: float,
               tokens_per_s: float, world: int) -> dict[str, Any]:
    """summary.json's MFU block.  On CPUs the peak is measured again now (the end of the run)
    and MFU divides by the highest of the two peaks and the FLOP/s the run reached."""
    if not start_peak:  # ranks other than 0 do not measure
        return {"mfu": None, "peak_flops_per_worker": 0.0}
    end_peak = run_peak_flops(device, dtype) if device.type == "cpu" else start_peak
    achieved = flops_per_token * tokens_per_s / world
    peak = honest_peak([start_peak, end_peak], achieved) if device.type == "cpu" else start_peak
    return {"mfu": mfu(flops_per_token, tokens_per_s, world, peak) if tokens_per_s else None,
            "peak_flops_per_worker": peak, "peak_flops_start": start_peak, "peak_flops_end": end_peak,
            "peak_flops_dtype": dtype,
            "peak_flops_source": "spec sheet" if device.type == "cuda" else "measured matmul (median)"}


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl`` (rank 0 only)."""

    def __init__(self, path: Path, enabled: bool, truncate_after_step: int | None = None):
        self.path = path
        self.enabled = enabled
        if enabled and truncate_after_step is not None and path.exists():
            # resuming: drop lines from steps the checkpoint does not contain
            kept = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= truncate_after_step]
            path.write_text("".join(ln + "\n" for ln in kept))
        elif enabled and truncate_after_step is None:
            path.write_text("")

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(dumps_strict(record) + "\n")  # strict JSON: NaN -> null


class Progress:
    """A live progress line with loss, tokens/s and ETA on a terminal; plain log lines otherwise."""

    def __init__(self, total_steps: int, enabled: bool):
        self.total = total_steps
        self.enabled = enabled
        self.tty = enabled and sys.stdout.isatty()
        self.t0 = time.perf_counter()

    def update(self, step: int, loss: float, tokens_per_s: float, extra: str = "") -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / max(step, 1) * (self.total - step)
        width = 24
        filled = int(width * step / max(self.total, 1))
        bar = "#" * filled + "-" * (width - filled)
        line = (f"step {step:>6}/{self.total} [{bar}] loss {loss:.4f} | {tokens_per_s:,.0f} tok/s"
                f" | eta {eta:4.0f}s{extra}")
        self._write("\r" + line if self.tty else line + "\n")

    def log(self, text: str) -> None:
        if self.enabled:
            self._write(("\n" if self.tty else "") + text + "\n")

    def close(self) -> None:
        if self.tty:
            self._write("\n")

    def _write(self, text: str) -> None:
        try:
            sys.stdout.write(text)
            sys.stdout.flush()
        except BrokenPipeError:  # the reader of a piped stdout left (`| head`): train on, print no more
            stdout_to_devnull()
            self.enabled = self.tty = False
