"""The training loop, written once for every parallel layout.

One call of :func:`run_worker` is one rank's whole life: set up the layout, the data and
the model, resume if asked, train with periodic eval and checkpoints, and (rank 0) write
metrics.jsonl and summary.json.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from paratrain import checkpoint as ckpt
from paratrain.config import Config
from paratrain.data.user_data import samples_in, to_device, tokens_in
from paratrain.fileio import write_json_atomic
from paratrain.mfu import compute_dtype, flops_per_token
from paratrain.models import count_params
from paratrain.parallel import GradSync, ParallelDims, make_sync, parallelize
from paratrain.processes import restart_count
from paratrain.ps.strategy import PSSync
from paratrain.training.checkpointer import Checkpointer
from paratrain.training.metrics import MetricsLog, Progress, mfu_fields, peak_rss_mb, run_peak_flops
from paratrain.training.monitor import RunMonitor
from paratrain.training.spec import RunSpec


def lr_lambda(cfg: Config):
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` of the peak at ``train.steps``."""
    t = cfg.train

    warmup = min(t.warmup_steps, t.steps)  # a short run warms up for at most its length

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        span = max(1, t.steps - warmup)
        progress = min(1.0, (step - warmup) / span)
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def set_threads(cfg: Config, dims: ParallelDims) -> None:
    """One intra-op thread per worker by default when workers share the machine's cores."""
    n = cfg.train.threads or max(1, (os.cpu_count() or 1) // max(1, dims.local_world_size))
    torch.set_num_threads(n)


class Trainer:
    """Owns one rank's model, optimizer, data and gradient sync for the length of a run."""

    def __init__(self, cfg: Config, dims: ParallelDims, spec: RunSpec, start_time: float | None = None):
        self.cfg, self.dims, self.spec = cfg, dims, spec
        self.run_dir = cfg.run_dir
        self.start_time = start_time if start_time is not None else time.time()
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.data = spec.data
        torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
        model = spec.build_model()
        self.n_params = count_params(model)
        self.flops_per_token = flops_per_token(model, cfg.data.seq_len, self.n_params)
        if cfg.parallel.sync == "ps":
            self.sync: GradSync = PSSync(cfg, dims)
        else:
            self.sync = make_sync(cfg, dims)
        self.model = parallelize(model, dims, spec, cfg, self.sync)
        self.optimizer = self.sync.build_optimizer(self.model)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg)) if self.optimizer else None
        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", dims, self.sync, cfg.checkpoint.keep)
        self.tokens_per_step = self.samples_per_step = 0
        # labels are never ignored in plain LM data: the global count is known without a collective
        self.static_labels = self.data.task == "lm"
        self.step = 0
        self.monitor: RunMonitor | None = None  # watchdog, goodput, TensorBoard while fit() runs
        torch.manual_seed(cfg.run.seed + 1000 * dims.rank)  # per-rank dropout streams
        self.autocast = self._autocast_factory()

    def _autocast_factory(self):
        prec = self.cfg.train.precision
        if prec == "fp32":
            return contextlib.nullcontext
        dtype = torch.bfloat16 if prec == "bf16" else torch.float16
        dev = self.dims.device.type
        return lambda: torch.autocast(dev, dtype=dtype)

    # ---- checkpoints ------------------------------------------------------------------
    def save(self) -> None:
        """Checkpoint this step (every rank calls it)."""
        meta = {"data": self.data.train.state_dict(), "arch": self.spec.arch,
                "productive_s": self.monitor.productive_s if self.monitor else 0.0}
        self.checkpointer.save(self.step, self.model, self.optimizer, self.scheduler, meta)

    def resume(self, path: Path) -> dict[str, Any]:
        """Restore the state saved in ``path`` and continue from its step; returns its meta."""
        meta = self.checkpointer.load(path, self.model, self.optimizer, self.scheduler)
        self.data.train.load_state_dict(meta["data"])
        self.step = int(meta["step"])
        return meta

    # ---- one step ---------------------------------------------------------------------------
    def _global_label_count(self, micro: list[dict[str, torch.Tensor]]) -> float:
        local = sum(self.spec.count(b) for b in micro)
        if self.static_labels:
            return float(local * self.dims.dp)
        t = torch.tensor([float(local)], dtype=torch.float64, device=self.dims.device)
        return float(self.sync.all_reduce_sum(t, self.dims.dp_group)[0]) if self.dims.dp > 1 else float(local)

    def train_step(self) -> tuple[torch.Tensor, float]:
        """One optimizer step over grad_accum micro-batches; returns (local loss sum, global labels)."""
        dev = self.dims.device
        micro = [to_device(next(self.data.train), dev) for _ in range(self.cfg.train.grad_accum)]
        n_global = self._global_label_count(micro)
        scale = self.dims.dp / max(n_global, 1.0)
        self._debug_hooks()
        loss_sum = self.sync.forward_backward(self.model, micro, self.spec.loss, scale, self.autocast)
        self.sync.step(self.model, self.optimizer)
        if self.scheduler:
            self.scheduler.step()
        self.tokens_per_step = sum(tokens_in(b) for b in micro) * self.dims.dp
        self.samples_per_step = sum(samples_in(b) for b in micro) * self.dims.dp
        return loss_sum, n_global

    def _debug_hooks(self) -> None:
        dbg, rank, nxt = self.cfg.debug, self.dims.rank, self.step + 1
        restarted = restart_count() > 0
        if dbg.kill_rank == rank and dbg.kill_at_step == nxt and not restarted:
            os.kill(os.getpid(), signal.SIGKILL)
        if dbg.delay_rank == rank and dbg.delay_ms > 0:
            time.sleep(dbg.delay_ms / 1000)
        if dbg.hang_rank == rank and dbg.hang_at_step == nxt:
            while True:
                time.sleep(3600)

    def reduced_loss(self, loss_sum: torch.Tensor, n_global: float) -> float:
        t = self.sync.reduce_loss_sum(loss_sum.reshape(1).to(self.dims.device, torch.float64))
        return float(t[0]) / max(n_global, 1.0)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss (and exact-match accuracy for tasks) over this rank's val batches, reduced."""
        batches = self.spec.val_batches(self.cfg.data.batch_size, self.cfg.train.eval_batches)
        if batches is None:  # user data without val_data: nothing to evaluate
            return {}
        self.model.eval()
        stats = torch.zeros(4, dtype=torch.float64)
        for b in batches:
            with self.autocast():
                stats += self.spec.eval_stats(self.model, to_device(b, self.dims.device), self.sync)
        self.model.train()
        stats = self.sync.reduce_eval_stats(stats.to(self.dims.device)).cpu()
        out = {"val_loss": float(stats[0] / max(stats[1], 1))}
        if self.data.exact_match:
            out["val_acc"] = float(stats[2] / max(stats[3], 1))
        return out

    # ---- the loop ----------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        cfg, d = self.cfg, self.dims
        resume_from = self.checkpointer.resume_point(cfg.checkpoint.path, cfg.checkpoint.resume)
        meta = self.resume(resume_from) if resume_from is not None else {}
        log = MetricsLog(self.run_dir / "metrics.jsonl", d.is_main,
                         truncate_after_step=self.step if resume_from is not None else None)
        progress = Progress(cfg.train.steps, d.is_main)
        if resume_from is not None:
            progress.log(f"resumed from {resume_from} at step {self.step}")
        dtype = compute_dtype(cfg.train.precision, cfg.train.float8)
        peak = run_peak_flops(d.device, dtype) if d.is_main else 0.0
        self.monitor = RunMonitor(cfg, d, meta.get("productive_s", 0.0), self.step, peak, self.flops_per_token,
                                  job_start=self.start_time)
        step_ms: list[float] = []
        timed_tokens, timed_s, comm_total, comm_steps = 0, 0.0, 0, 0
        warmup = min(3, max(0, (cfg.train.steps - self.step) // 5))
        first_step = self.step
        last_loss, last_eval, diverged = float("nan"), {}, ""
        while self.step < cfg.train.steps:
            t0 = time.perf_counter()
            loss_sum, n_global = self.train_step()
            self.sync.observe_loss(loss_sum, n_global)
            self.step += 1
            log_now = (self.step % cfg.train.log_every == 0 or self.step == cfg.train.steps
                       or ckpt.periodic_save_due(cfg.checkpoint, self.step))  # its loss is checked first
            loss = self.reduced_loss(loss_sum, n_global) if log_now else last_loss
            if d.device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            comm = self.sync.take_comm_bytes()
            if self.step - first_step > warmup:
                step_ms.append(dt * 1000)
                timed_tokens += self.tokens_per_step
                timed_s += dt
                comm_total += comm
                comm_steps += 1
            tok_s = self.tokens_per_step / dt
            record: dict[str, Any] = {}
            if log_now:
                last_loss = loss
                lr = self.optimizer.param_groups[0]["lr"] if self.optimizer else cfg.train.lr
                record = {"step": self.step, "loss": loss, "lr": lr, "tokens_per_s": tok_s,
                          "step_ms": dt * 1000, "comm_bytes": comm}
                record.update(self.sync.step_metrics())
            if (cfg.train.eval_every and self.step % cfg.train.eval_every == 0) or self.step == cfg.train.steps:
                last_eval = self.evaluate()
                record = record or {"step": self.step}
                record.update(last_eval)
            self.monitor.step_end(self.step, dt, record)
            if record:
                log.write(record)
                extra = f" | val {last_eval['val_loss']:.4f}" if "val_loss" in record else ""
                progress.update(self.step, loss, tok_s, extra)
            if log_now and not math.isfinite(loss):  # the same all-reduced value on every rank
                diverged = f"diverged: loss is {loss} at step {self.step}; lower train.lr or raise train.warmup_steps"
                break
            if ckpt.periodic_save_due(cfg.checkpoint, self.step):
                self.save()
        if not diverged and ckpt.final_save_due(cfg.checkpoint, self.step, first_step):
            self.save()
        progress.close()
        rss = [r[0] for r in self.sync.gather_floats([peak_rss_mb()])]
        rss += self.sync.extra_rss_mb()
        tokens_per_s = timed_tokens / timed_s if timed_s else 0.0
        samples_per_s = tokens_per_s * self.samples_per_step / max(1, self.tokens_per_step)
        summary = {
            "status": "diverged" if diverged else "ok",
            **({"error": diverged} if diverged else {}),
            "steps": self.step,
            "final_loss": last_loss,
            "val_loss": last_eval.get("val_loss"),
            "val_acc": last_eval.get("val_acc"),
            "tokens_per_s": tokens_per_s,
            "samples_per_s": samples_per_s,
            "step_time_ms_median": statistics.median(step_ms) if step_ms else None,
            **mfu_fields(d.device, dtype, peak, self.flops_per_token, tokens_per_s, d.world_size),
            "peak_rss_mb": rss,
            "comm_bytes_per_step": comm_total / comm_steps if comm_steps else 0,
            "world_size": d.world_size,
            "strategy": self.sync.name,
            "params": self.n_params,
            "flops_per_token": self.flops_per_token,
            "wall_s": time.time() - self.start_time,
        }
        if d.device.type == "cuda":  # what the allocator held at its peak, per rank
            summary["peak_device_mem_mb"] = [r[0] for r in self.sync.gather_floats(
                [torch.cuda.max_memory_allocated(d.device) / 2**20])]
        summary.update(self.sync.extra_summary())
        summary.update(self.monitor.summary())
        self.monitor.close()
        if d.is_main:
            write_summary(self.run_dir, summary)
        return summary


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    """``RUN_DIR/summary.json``, written atomically."""
    write_json_atomic(run_dir / "summary.json", summary, indent=2)


def run_worker(cfg: Config, start_time: float | None = None, hold: list | None = None,
               **injected: Any) -> dict[str, Any]:
    """Entry point of one rank (or of the only process): build the layout and the run spec
    (``injected``: the Python API's model, loss_fn, train_data, val_data, tp_plan, pp_split),
    train, and return the summary.  ``start_time``: when the job started (wall clock).

    ``hold``: a list that receives the trainer so it outlives this call.  Worker processes pass
    one and then leave with ``os._exit``: freeing a DDP reducer frees its gloo process group
    while holding the GIL, which can deadlock against gloo's own thread finishing an all-reduce.
    """
    dims = ParallelDims.from_env(cfg)
    set_threads(cfg, dims)
    spec = RunSpec.from_user(cfg, dims.dp_rank, dims.dp, **injected)
    trainer = Trainer(cfg, dims, spec, start_time)
    if hold is not None:
        hold.append(trainer)
    try:
        return trainer.fit()
    finally:
        if trainer.monitor is not None:
            trainer.monitor.close()
        trainer.sync.close()
        dims.shutdown()
