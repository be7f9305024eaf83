"""The training loop, written once for every parallel strategy.

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

from paratrain.config import Config, ConfigError
from paratrain.data import build_data, val_batches
from paratrain.data.user_data import samples_in, to_device, tokens_in
from paratrain.fileio import write_json_atomic
from paratrain.mfu import compute_dtype, flops_per_token
from paratrain.models import build_model, count_params
from paratrain.parallel import ParallelDims, Strategy, build_strategy
from paratrain.parallel.compile import compile_loss
from paratrain.training import checkpoint as ckpt
from paratrain.training.loss import count_labels, eval_stats, lm_loss_sum
from paratrain.training.metrics import MetricsLog, Progress, mfu_fields, peak_rss_mb, run_peak_flops
from paratrain.training.monitor import RunMonitor
from paratrain.training.user_model import UserRun


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
    """Owns one rank's model, optimizer, data and strategy for the length of a run."""

    def __init__(self, cfg: Config, dims: ParallelDims, strategy: Strategy | None = None, *,
                 model: Any = None, loss_fn=None, train_data: Any = None, val_data: Any = None,
                 tp_plan: Any = None, pp_split: Any = None):
        # Injected pieces (see paratrain/training/user_model.py): model = an nn.Module or a zero-argument
        # factory (e.g. a pruned/student model, a Hugging Face model); loss_fn(model, batch) -> summed
        # loss (e.g. distillation), weighted by ``loss_fn.count(batch)`` when it has one; train_data /
        # val_data = a map-style dataset or an iterable of batches; tp_plan / pp_split for foreign models.
        self.cfg, self.dims = cfg, dims
        self.run_dir = cfg.run_dir
        t = cfg.train
        if t.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        injected = dict(model=model, loss_fn=loss_fn, train_data=train_data, val_data=val_data,
                        tp_plan=tp_plan, pp_split=pp_split)
        self.user = UserRun(cfg, dims.dp_rank, dims.dp, **injected) if any(
            v is not None for v in injected.values()) else None
        self.data = self.user.data if self.user else build_data(cfg, dims.dp_rank, dims.dp)
        torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
        vocab = cfg.model.vocab_size or self.data.vocab_size
        if vocab < self.data.vocab_size:
            raise ConfigError(f"model.vocab_size = {vocab} is smaller than the tokenizer's {self.data.vocab_size}")
        if self.user:
            model = self.user.build_model(vocab, self.data.pad_id)
        elif cfg.parallel.meta_init:  # parameters on the meta device; each rank fills its shards in wrap()
            from paratrain.parallel.meta_init import build_on_meta

            model = build_on_meta(lambda: build_model(cfg.model, vocab, self.data.pad_id))
        else:
            model = build_model(cfg.model, vocab, self.data.pad_id)
        self.n_params = count_params(model)
        self.flops_per_token = flops_per_token(model, cfg.data.seq_len, self.n_params)
        self.strategy = strategy or build_strategy(cfg, dims)
        self.model = self.strategy.wrap(self.strategy.prepare(model))
        self.optimizer = self.strategy.build_optimizer(self.model)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg)) if self.optimizer else None
        self.loss_fn = compile_loss(self.user.loss_fn if self.user else lm_loss_sum, cfg)
        self.count_fn = self.user.count if self.user else count_labels
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
    @property
    def ckpt_root(self) -> Path:
        return self.run_dir / "checkpoints"

    def save(self) -> None:
        d = self.dims
        if d.is_main:
            ckpt.begin(self.ckpt_root, self.step)
        d.barrier()
        tmp = ckpt.tmp_dir(self.ckpt_root, self.step)
        if self.strategy.uses_dcp:  # layout-independent: dcp/ from every rank, model.pt from rank 0
            from paratrain.parallel import dist_checkpoint

            dist_checkpoint.save(tmp, self.strategy.dcp_modules(self.model), self.optimizer)
            model_state, optim_state = None, {}
        else:
            model_state = self.strategy.model_state(self.model)
            optim_state = self.optimizer.state_dict() if self.optimizer else {}
        optim = {"optimizer": optim_state, "scheduler": self.scheduler.state_dict() if self.scheduler else {}}
        if d.is_main:
            if model_state is not None:
                ckpt.save_file(tmp, "model.pt", model_state)
            ckpt.save_file(tmp, "meta.json", {
                "step": self.step, "data": self.data.train.state_dict(), "world_size": d.world_size,
                "strategy": self.strategy.name, "arch": self.user.arch if self.user else self.cfg.model.arch,
                "productive_s": self.monitor.productive_s if self.monitor else 0.0,
                # fp16: every rank holds the same scale (the overflow vote is world-wide)
                **({"loss_scaler": self.strategy.loss_scaler.state_dict()} if self.strategy.loss_scaler else {}),
            })
        if d.is_main or self.strategy.sharded_optimizer:
            ckpt.save_file(tmp, f"optim_rank{d.rank}.pt" if self.strategy.sharded_optimizer else "optim.pt", optim)
        ckpt.save_file(tmp, f"rank{d.rank}.pt", {"torch_rng": torch.get_rng_state()})
        self.strategy.save_extra(tmp)
        d.barrier()
        if d.is_main:
            ckpt.commit(self.ckpt_root, self.step, self.cfg.checkpoint.keep)
        d.barrier()

    def resume(self, path: Path) -> None:
        ckpt.verify(path)
        meta = ckpt.load_file(path, "meta.json")
        name = f"optim_rank{self.dims.rank}.pt" if self.strategy.sharded_optimizer else "optim.pt"
        if (path / "dcp").is_dir():  # saved by a model-parallel layout: loads under any layout
            from paratrain.parallel import dist_checkpoint

            dist_checkpoint.load(path, self.strategy.dcp_modules(self.model), self.optimizer)
            name = "optim.pt"  # the schedule only
        elif self.strategy.uses_dcp:
            raise ckpt.CheckpointError(
                f"checkpoint {path} was saved by a '{meta.get('strategy')}' run without a DCP copy; "
                "resume it with a data-parallel layout (zero = 0, tp = pp = 1)")
        else:
            self.strategy.load_model_state(self.model, ckpt.load_file(path, "model.pt"))
        if (path / name).exists() and self.optimizer:
            optim = ckpt.load_file(path, name)
            if optim["optimizer"]:
                self.optimizer.load_state_dict(optim["optimizer"])
            self.scheduler.load_state_dict(optim["scheduler"])
            for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr(), strict=True):
                group["lr"] = lr
        rank_file = f"rank{self.dims.rank}.pt"
        if (path / rank_file).exists():
            torch.set_rng_state(ckpt.load_file(path, rank_file)["torch_rng"])
        self.strategy.load_extra(path)
        if self.strategy.loss_scaler is not None and "loss_scaler" in meta:
            self.strategy.loss_scaler.load_state_dict(meta["loss_scaler"])
        self.data.train.load_state_dict(meta["data"])
        self.step = int(meta["step"])

    def find_resume_point(self) -> Path | None:
        c = self.cfg.checkpoint
        restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
        if c.path:
            return Path(c.path)
        if c.resume or restarted:
            return ckpt.latest(self.ckpt_root)
        return None

    # ---- one step ---------------------------------------------------------------------------
    def _global_label_count(self, micro: list[dict[str, torch.Tensor]]) -> float:
        local = sum(self.count_fn(b) for b in micro)
        if self.static_labels:
            return float(local * self.dims.dp)
        t = torch.tensor([float(local)], dtype=torch.float64, device=self.dims.device)
        return float(self.dims.all_reduce_sum(t, self.dims.dp_group)[0]) if self.dims.dp > 1 else float(local)

    def train_step(self) -> tuple[torch.Tensor, float]:
        """One optimizer step over grad_accum micro-batches; returns (local loss sum, global labels)."""
        dev = self.dims.device
        micro = [to_device(next(self.data.train), dev) for _ in range(self.cfg.train.grad_accum)]
        n_global = self._global_label_count(micro)
        scale = self.dims.dp / max(n_global, 1.0)
        self._debug_hooks()
        loss_sum = self.strategy.forward_backward(self.model, micro, self.loss_fn, scale, self.autocast)
        self.strategy.step(self.model, self.optimizer)
        if self.scheduler:
            self.scheduler.step()
        self.tokens_per_step = sum(tokens_in(b) for b in micro) * self.dims.dp
        self.samples_per_step = sum(samples_in(b) for b in micro) * self.dims.dp
        return loss_sum, n_global

    def _debug_hooks(self) -> None:
        dbg, rank, nxt = self.cfg.debug, self.dims.rank, self.step + 1
        restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
        if dbg.kill_rank == rank and dbg.kill_at_step == nxt and not restarted:
            os.kill(os.getpid(), signal.SIGKILL)
        if dbg.delay_rank == rank and dbg.delay_ms > 0:
            time.sleep(dbg.delay_ms / 1000)
        if dbg.hang_rank == rank and dbg.hang_at_step == nxt:
            while True:
                time.sleep(3600)

    def reduced_loss(self, loss_sum: torch.Tensor, n_global: float) -> float:
        t = self.strategy.reduce_loss_sum(loss_sum.reshape(1).to(self.dims.device, torch.float64))
        return float(t[0]) / max(n_global, 1.0)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.model.eval()
        stats = torch.zeros(4, dtype=torch.float64)
        if self.user:
            batches = self.user.val_batches(self.cfg.data.batch_size, self.cfg.train.eval_batches)
            if batches is None:  # user data without val_data: nothing to evaluate
                self.model.train()
                return {}
        else:
            batches = val_batches(self.data, self.cfg.data.batch_size, self.dims.dp_rank, self.dims.dp,
                                  self.cfg.train.eval_batches)
        for b in batches:
            b = to_device(b, self.dims.device)
            with self.autocast():
                if self.user:
                    stats += self.user.eval_stats(self.model, b, self.strategy)
                    continue
                logits = self.strategy.eval_logits(self.model, b)
            if logits is not None:
                stats += eval_stats(logits, b["labels"])
        self.model.train()
        stats = self.strategy.reduce_eval_stats(stats.to(self.dims.device)).cpu()
        out = {"val_loss": float(stats[0] / max(stats[1], 1))}
        if self.data.exact_match:
            out["val_acc"] = float(stats[2] / max(stats[3], 1))
        return out

    # ---- the loop ----------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        cfg, d = self.cfg, self.dims
        t0_wall = float(os.environ.get("PARATRAIN_START_TIME", time.time()))
        resume_from = self.find_resume_point()
        if resume_from is not None:
            self.resume(resume_from)
        log = MetricsLog(self.run_dir / "metrics.jsonl", d.is_main,
                         truncate_after_step=self.step if resume_from is not None else None)
        progress = Progress(cfg.train.steps, d.is_main)
        if resume_from is not None:
            progress.log(f"resumed from {resume_from} at step {self.step}")
        dtype = compute_dtype(cfg.train.precision, cfg.train.float8)
        peak = run_peak_flops(d.device, dtype) if d.is_main else 0.0
        productive = ckpt.load_file(resume_from, "meta.json").get("productive_s", 0.0) if resume_from else 0.0
        self.monitor = RunMonitor(cfg, d, productive, self.step, peak, self.flops_per_token)
        step_ms: list[float] = []
        timed_tokens, timed_s, comm_total, comm_steps = 0, 0.0, 0, 0
        warmup = min(3, max(0, (cfg.train.steps - self.step) // 5))
        first_step = self.step
        last_loss, last_eval = float("nan"), {}
        while self.step < cfg.train.steps:
            t0 = time.perf_counter()
            loss_sum, n_global = self.train_step()
            self.strategy.observe_loss(loss_sum, n_global)
            self.step += 1
            log_now = self.step % cfg.train.log_every == 0 or self.step == cfg.train.steps
            loss = self.reduced_loss(loss_sum, n_global) if log_now else last_loss
            if d.device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            comm = self.strategy.take_comm_bytes()
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
                record.update(self.strategy.step_metrics())
            if (cfg.train.eval_every and self.step % cfg.train.eval_every == 0) or self.step == cfg.train.steps:
                last_eval = self.evaluate()
                record = record or {"step": self.step}
                record.update(last_eval)
            self.monitor.step_end(self.step, dt, record)
            if record:
                log.write(record)
                extra = f" | val {last_eval['val_loss']:.4f}" if "val_loss" in record else ""
                progress.update(self.step, loss, tok_s, extra)
            if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0:
                self.save()
        if cfg.checkpoint.keep and not cfg.checkpoint.every and self.step > first_step:
            self.save()
        progress.close()
        rss = [r[0] for r in d.gather_floats([peak_rss_mb()])]
        rss += self.strategy.extra_rss_mb()
        tokens_per_s = timed_tokens / timed_s if timed_s else 0.0
        samples_per_s = tokens_per_s * self.samples_per_step / max(1, self.tokens_per_step)
        summary = {
            "status": "ok",
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
            "strategy": self.strategy.name,
            "params": self.n_params,
            "flops_per_token": self.flops_per_token,
            "wall_s": time.time() - t0_wall,
        }
        if d.device.type == "cuda":  # what the allocator held at its peak, per rank
            summary["peak_device_mem_mb"] = [r[0] for r in d.gather_floats(
                [torch.cuda.max_memory_allocated(d.device) / 2**20])]
        summary.update(self.strategy.extra_summary())
        summary.update(self.monitor.summary())
        self.monitor.close()
        if d.is_main:
            write_summary(self.run_dir, summary)
        return summary


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    """``RUN_DIR/summary.json``, written atomically."""
    write_json_atomic(run_dir / "summary.json", summary, indent=2)


def run_worker(cfg: Config, hold: list | None = None, **injected: Any) -> dict[str, Any]:
    """Entry point of one rank (or of the only process); ``injected``: Trainer's model, loss_fn,
    train_data, val_data, tp_plan, pp_split.

    ``hold``: a list that receives the trainer so it outlives this call.  Worker processes pass
    one and then leave with ``os._exit``: freeing a DDP reducer frees its gloo process group
    while holding the GIL, which can deadlock against gloo's own thread finishing an all-reduce.
    """
    dims = ParallelDims.from_env(cfg)
    set_threads(cfg, dims)
    trainer = Trainer(cfg, dims, **injected)
    if hold is not None:
        hold.append(trainer)
    try:
        return trainer.fit()
    finally:
        if trainer.monitor is not None:
            trainer.monitor.close()
        trainer.strategy.close()
        dims.shutdown()
