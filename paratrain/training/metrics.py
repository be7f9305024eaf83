"""Metrics out of the trainer: metrics.jsonl, the progress line, memory and FLOP/s ceilings."""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from paratrain.fileio import dumps_strict, stdout_to_devnull


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MB (Linux reports ru_maxrss in KB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def measure_matmul_flops(n: int = 512, repeats: int = 6) -> float:
    """FLOP/s of an fp32 n x n matmul with this process's threads: the CPU peak we report MFU against."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


# Dense bf16 tensor-core peaks from vendor spec sheets (FLOP/s per GPU).
GPU_PEAK_FLOPS = {"A100": 312e12, "H100": 989e12, "H200": 989e12, "L4": 121e12, "A10": 125e12, "V100": 125e12}


def device_peak_flops(device: torch.device) -> float:
    """Peak FLOP/s of one worker's device: spec sheet for GPUs, measured for CPUs."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in GPU_PEAK_FLOPS.items():
            if key in name:
                return flops
        return 100e12
    return measure_matmul_flops()


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


def model_flops_per_token(model: nn.Module, seq_len: int, n_params: int) -> float:
    """Training FLOPs per token (or per sample): the model's own ``flops_per_token(seq_len)`` when
    it has one (paratrain's models count attention too), else 6 x parameters."""
    own = getattr(model, "flops_per_token", None)
    return float(own(seq_len)) if callable(own) else 6.0 * n_params
