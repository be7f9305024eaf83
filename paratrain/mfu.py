"""FLOPs, device peaks and MFU: the one place the trainer, the monitor, the planner and the
benchmarks take them from.

* **MFU** (PaLM, Chowdhery et al. 2022, App. B) = model FLOPs per second / the devices' peak.
  Model FLOPs count the forward and backward of the model once (no recomputation); the
  per-token count comes from the model (``model.flops_per_token(seq_len)``, PaLM's
  ``6 N + 12 l h s``), else ``6 N``.
* **GPU peaks** are the vendor spec sheets' dense tensor-core figures for the dtype the
  matmuls run in: fp32 training runs in TF32, ``bf16`` / ``fp16`` at the 16-bit peak,
  ``train.float8`` at the fp8 peak.
* **CPU peaks** are measured: the median of several timings of a matmul large enough to
  leave the caches (1024^3 by default) in the run's dtype, with the run's threads.  The
  trainer measures at the start and again at the end of the run and divides by the higher
  of the two and of the FLOP/s the run itself reached (a rate the device demonstrably
  delivered is a lower bound on its peak), so MFU never exceeds 1.

torch is imported inside the measurement only: the planner imports this module and stays
free of torch at start-up.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

# Dense peaks per GPU in FLOP/s (no sparsity): fp32 = TF32 tensor cores, 16-bit, fp8.
GPU_PEAKS: dict[str, dict[str, float]] = {
    "H200": {"fp32": 495e12, "bf16": 989e12, "fp8": 1979e12},
    "H100": {"fp32": 495e12, "bf16": 989e12, "fp8": 1979e12},  # SXM
    "A100": {"fp32": 156e12, "bf16": 312e12, "fp8": 0.0},  # no fp8 tensor cores
    "L40S": {"fp32": 183e12, "bf16": 362e12, "fp8": 733e12},
    "L4": {"fp32": 60e12, "bf16": 121e12, "fp8": 242e12},
    "A10": {"fp32": 62.5e12, "bf16": 125e12, "fp8": 0.0},
    "V100": {"fp32": 15.7e12, "bf16": 125e12, "fp8": 0.0},  # fp16 tensor cores; no bf16
}
UNKNOWN_GPU_PEAK = 100e12  # a GPU missing from the table: a round figure, reported as such


def compute_dtype(precision: str, float8: str = "none") -> str:
    """The dtype class the matmuls run in: ``fp8`` with train.float8, ``bf16`` for 16-bit, else ``fp32``."""
    if float8 != "none":
        return "fp8"
    return "fp32" if precision == "fp32" else "bf16"


def gpu_peak_flops(device_name: str, dtype: str = "bf16") -> float:
    """Spec-sheet peak of a GPU named like ``torch.cuda.get_device_name()`` for ``dtype``
    (``fp32`` | ``bf16`` | ``fp8``); a GPU without fp8 tensor cores falls back to bf16."""
    for key, peaks in GPU_PEAKS.items():
        if key in device_name.upper():
            return peaks[dtype] or peaks["bf16"]
    return UNKNOWN_GPU_PEAK


def measure_cpu_peak(dtype: str = "fp32", n: int = 1024, repeats: int = 5, threads: int | None = None,
                     stat: Callable[[list[float]], float] = statistics.median) -> float:
    """FLOP/s of n x n x n matmuls on the CPU: the median (``stat``) of ``repeats`` timings after a warm-up.

    ``dtype`` ``fp32`` or ``bf16`` (what autocast runs the matmuls in); ``threads``: intra-op
    threads for the measurement (default: the process's current setting).
    """
    import torch  # function-local: keeps the planner's import free of torch

    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        dt = torch.bfloat16 if dtype == "bf16" else torch.float32
        a, b = torch.randn(n, n, dtype=dt), torch.randn(n, n, dtype=dt)
        a @ b
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(old)
    return 2.0 * n**3 / stat(times)


def device_peak_flops(device_type: str, device_name: str = "", dtype: str = "fp32") -> float:
    """Peak FLOP/s of one worker's device: the spec sheet for ``cuda``, measured for ``cpu``."""
    if device_type == "cuda":
        return gpu_peak_flops(device_name, dtype)
    return measure_cpu_peak(dtype)


def mfu(flops_per_token: float, tokens_per_s: float, n_devices: int, peak_flops: float) -> float:
    """Model FLOPs utilization from a throughput: ``flops_per_token * tokens_per_s / (n * peak)``
    (pass model FLOPs; with recomputation counted in ``flops_per_token`` it is HFU)."""
    return flops_per_token * tokens_per_s / (n_devices * peak_flops)


def mfu_from_step(model_flops: float, step_time_s: float, n_devices: int, peak_flops: float) -> float:
    """MFU from one step's model FLOPs (whole job) and its time."""
    return model_flops / (step_time_s * n_devices * peak_flops)


def honest_peak(peaks: list[float], achieved_flops_per_device: float) -> float:
    """The peak MFU is reported against: the highest of the measured peaks and of the rate the
    run reached per device (which the device evidently sustains), so that MFU <= 1."""
    return max([p for p in peaks if p > 0] + [achieved_flops_per_device])


def flops_per_token(model, seq_len: int, n_params: int) -> float:
    """Training model FLOPs per token: the model's own estimate (``model.flops_per_token(seq_len)``)
    when it has one, else ``6 x parameters``."""
    own = getattr(model, "flops_per_token", None)
    return float(own(seq_len)) if callable(own) else 6.0 * n_params
