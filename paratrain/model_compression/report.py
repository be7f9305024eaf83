"""Measuring a model stage for the compression report: size, sparsity, latency, validation quality.

Latency is measured for all stages together, round-robin (stage A, B, C, A, B, C, ...), with
the same thread count and inputs, and the median of the repeats is reported: on a shared
machine slow periods then hit every stage alike, and ratios stay meaningful.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import paratrain.model_compression.quantization as Q
from paratrain.models.loss import eval_stats, model_inputs

STAGE_KEYS = ("name", "params", "nonzero_params", "bytes_on_disk", "latency_ms_b1", "latency_ms_b16",
              "val_loss", "val_acc")


def _logical_weights(model: nn.Module) -> list[Tensor]:
    """Every weight/bias value the model holds, once each (int weights dequantized, ties counted once)."""
    out: list[Tensor] = []
    seen: set[int] = set()
    quant_types = (Q.dynamic_linear_class(), torch.ao.nn.quantized.Linear)
    for mod in model.modules():
        if isinstance(mod, quant_types):
            out.append(mod.weight().dequantize())
            if mod.bias() is not None:
                out.append(mod.bias())
        elif isinstance(mod, Q.WeightOnlyLinear):
            out.append(mod.dequantized())
            if mod.bias is not None:
                out.append(mod.bias)
        for p in mod.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


@torch.no_grad()
def count_params(model: nn.Module) -> tuple[int, int]:
    """(parameters, non-zero parameters), counting int8/int4 weights as one parameter each."""
    ws = _logical_weights(model)
    return sum(w.numel() for w in ws), sum(int(torch.count_nonzero(w)) for w in ws)


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[dict[str, Tensor]], exact_match: bool) -> dict[str, float | None]:
    """Validation loss (mean per labelled token) and, for tasks with exact answers, exact-match accuracy."""
    was = model.training
    model.eval()
    stats = torch.zeros(4, dtype=torch.float64)
    for b in batches:
        stats += eval_stats(model(**model_inputs(b)), b["labels"])
    model.train(was)
    return {"val_loss": float(stats[0] / max(stats[1], 1)),
            "val_acc": float(stats[2] / max(stats[3], 1)) if exact_match else None}


def latency_inputs(batch: dict[str, Tensor], size: int) -> dict[str, Tensor]:
    """The model inputs of ``batch`` cut or tiled to ``size`` rows."""
    inp = model_inputs(batch)
    n = next(iter(inp.values())).shape[0]
    reps = -(-size // n)
    return {k: v.repeat(reps, *([1] * (v.dim() - 1)))[:size].contiguous() for k, v in inp.items()}


@functools.cache
def keep_freed_memory() -> bool:
    """Make glibc keep freed activation memory for reuse instead of handing it back to the OS.

    By default glibc serves tensors above a (moving) threshold with fresh ``mmap`` pages and
    trims the heap top after frees, so every forward pass page-faults its activations in again:
    measured here, GELU on a (16, 128, 512) activation took 3.5 ms inside the model and 0.8 ms
    alone. Fixing the mmap threshold at its 32 MiB maximum and never trimming is the same
    remedy as serving with jemalloc / tcmalloc. Applied once per process, before timing, and
    to every stage alike; returns whether it took effect (False off glibc)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        libc = None
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    return libc.mallopt(m_mmap_threshold, 32 << 20) == 1 and libc.mallopt(m_trim_threshold, 1 << 30) == 1


@torch.inference_mode()
def measure_latency(models: dict[str, nn.Module], inputs: dict[str, Tensor], repeats: int = 20,
                    threads: int = 1, warmup: int = 2) -> dict[str, float]:
    """Median forward latency (ms) of each model on ``inputs``, measured round-robin with ``threads``."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for m in models.values():
            m.eval()
            for _ in range(warmup):
                m(**inputs)
        times: dict[str, list[float]] = {k: [] for k in models}
        for _ in range(repeats):
            for name, m in models.items():
                t0 = time.perf_counter()
                m(**inputs)
                times[name].append((time.perf_counter() - t0) * 1000)
    finally:
        torch.set_num_threads(old)
    return {k: statistics.median(v) for k, v in times.items()}


def stage_row(name: str, model: nn.Module, files: list[Path], quality: dict[str, float | None],
              **extra: Any) -> dict[str, Any]:
    """One stage of the report (latency filled in later, once all stages exist)."""
    params, nonzero = count_params(model)
    row: dict[str, Any] = {"name": name, "params": params, "nonzero_params": nonzero,
                           "bytes_on_disk": sum(f.stat().st_size for f in files),
                           "files": [f.name for f in files], "latency_ms_b1": None, "latency_ms_b16": None,
                           **quality}
    row.update(extra)
    return row


def finish_rows(rows: list[dict[str, Any]], tokens_b16: int) -> None:
    """Throughput and ratios against the first (original) stage."""
    base = rows[0]
    for r in rows:
        r["tokens_per_s_b16"] = tokens_b16 / (r["latency_ms_b16"] / 1000) if r["latency_ms_b16"] else None
        r["size_ratio"] = base["bytes_on_disk"] / r["bytes_on_disk"] if r["bytes_on_disk"] else None
        r["speedup_b1"] = base["latency_ms_b1"] / r["latency_ms_b1"] if r["latency_ms_b1"] else None
        r["speedup_b16"] = base["latency_ms_b16"] / r["latency_ms_b16"] if r["latency_ms_b16"] else None
        r["val_loss_change"] = (r["val_loss"] / base["val_loss"] - 1.0) if base["val_loss"] else None
        if r.get("val_acc") is not None and base.get("val_acc") is not None:
            r["val_acc_change_points"] = 100.0 * (r["val_acc"] - base["val_acc"])


def _fmt(v: Any, spec: str = "") -> str:
    if v is None:
        return "-"
    return format(v, spec) if spec else str(v)


def render_markdown(report: dict[str, Any]) -> str:
    """report.md: the stages side by side, then how they were measured."""
    rows = report["stages"]
    head = ["metric", *[r["name"] for r in rows]]
    lines = [f"# Compression report: {report['checkpoint']}", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    table = [
        ("parameters", "params", ","), ("non-zero parameters", "nonzero_params", ","),
        ("bytes on disk", "bytes_on_disk", ","), ("size ratio", "size_ratio", ".2f"),
        ("latency b1 (ms)", "latency_ms_b1", ".2f"), ("latency b16 (ms)", "latency_ms_b16", ".2f"),
        ("speedup b1", "speedup_b1", ".2f"), ("speedup b16", "speedup_b16", ".2f"),
        ("tokens/s b16", "tokens_per_s_b16", ",.0f"), ("val loss", "val_loss", ".4f"),
        ("val loss change", "val_loss_change", "+.2%"), ("val exact-match acc", "val_acc", ".4f"),
    ]
    for label, key, spec in table:
        lines.append("| " + " | ".join([label, *[_fmt(r.get(key), spec) for r in rows]]) + " |")
    lines += ["", "Files: " + "; ".join(f"{r['name']}: {', '.join(r['files'])}" for r in rows), "",
              "## How it was measured", ""]
    m = report["measurement"]
    lines.append(f"- latency: median of {m['repeats']} forward passes per stage, stages interleaved, "
                 f"{m['threads']} thread(s), sequence length {m['seq_len']}, batch 1 and 16 "
                 f"({m['torch']}, quantized engine {m['engine']}, allocator: {m.get('allocator', 'default')})")
    lines.append(f"- validation: {m['val_batches']} batches of {m['val_batch_size']} from the run's val split"
                 + ("; exact match = every answer token right under teacher forcing" if m["exact_match"] else ""))
    lines += [f"- {s}" for s in report.get("steps", [])]
    return "\n".join(lines) + "\n"


def write_report(out: Path, report: dict[str, Any]) -> None:
    """OUT/report.json and OUT/report.md."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(render_markdown(report))
