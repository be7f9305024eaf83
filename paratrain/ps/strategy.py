"""``parallel.sync = "ps"``: the gradient sync of parameter-server training (:class:`PSSync`).

The model stays a plain module on each worker.  ``forward_backward`` computes this worker's
mean gradient over its local batch; ``step`` hands it to :class:`~paratrain.ps.worker.PSWorker`,
which pushes it to the servers (weighted by the local label count, so a sync round's update
equals DDP's on the same global batch) and installs the parameters they send back.  The local
"optimizer" only carries the learning rate the trainer's schedule sets; the servers own the
real optimizer state.

No torch.distributed process group exists: a dead worker must not take the others down.  The
few collectives the trainer needs (checkpoint barriers, the final gather, and in sync mode the
global loss / label count / eval statistics) go through server 0, which drops dead workers
from them.  In async/ssp mode, loss and eval metrics are this worker's own.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from paratrain import checkpoint as ckpt
from paratrain.config import Config
from paratrain.data.user_data import tokens_in
from paratrain.models.loss import count_labels
from paratrain.parallel.dims import ParallelDims
from paratrain.parallel.sync import GradSync
from paratrain.ps.client import PSClient, PSError
from paratrain.ps.overlap import EarlyPush
from paratrain.ps.placement import ParamInfo, place
from paratrain.ps.protocol import Msg
from paratrain.ps.wire import PushEncoder
from paratrain.ps.worker import PSWorker

ENDPOINTS_ENV = "PARATRAIN_PS_ENDPOINTS"
SECRET_ENV = "PARATRAIN_PS_SECRET"
WARMUP_STEPS = 3
STATS_EVERY_S = 2.0  # how often rank 0 fetches every worker's stats for metrics.jsonl


class RemoteOptimizer(torch.optim.Optimizer):
    """Holds the learning rate the trainer's schedule sets; the servers apply the updates."""

    def __init__(self, lr: float):
        super().__init__([torch.zeros(0, requires_grad=True)], {"lr": lr})

    def step(self, closure: Callable | None = None) -> None:
        return None


def param_infos(model: nn.Module, optimizer: str) -> tuple[list[nn.Parameter], list[ParamInfo]]:
    """The model's parameters (shared ones once) and what placement needs to know about them."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    params, infos = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        params.append(p)
        decay = p.dim() >= 2 if optimizer == "adamw" else True
        infos.append(ParamInfo(name, tuple(p.shape), decay, id(p) in embeddings))
    return params, infos


class PSSync(GradSync):
    """Data-parallel workers around parameter servers (sync / async / ssp)."""

    def __init__(self, cfg: Config, dims: ParallelDims):
        super().__init__(cfg, dims)
        ps = cfg.ps
        self.mode = ps.mode
        self.name = f"ps-{ps.mode}"
        endpoints = [e for e in os.environ.get(ENDPOINTS_ENV, "").split(",") if e]
        if not endpoints:
            raise PSError("parallel.sync = 'ps' needs its parameter servers: start the run with `paratrain train` "
                          f"(which launches them) or under torchrun (see docs/parameter-server.md); {ENDPOINTS_ENV} "
                          "is not set")
        self.endpoints = endpoints
        secret = os.environ.get(SECRET_ENV, "") or ps.secret
        if len(secret) < 16:
            raise PSError(f"the parameter-server secret (ps.secret or {SECRET_ENV}) must be at least 16 characters")
        self.secret = secret.encode()
        self.encoder = PushEncoder(cfg.compression, seed=dims.rank)
        self.client: PSClient | None = None
        self.worker: PSWorker | None = None
        self.early: EarlyPush | None = None
        self.optimizer: torch.optim.Optimizer | None = None  # the one step() is given (its lr)
        self.model: nn.Module | None = None
        self.resume_clock = 0
        self.last_save_clock = 0
        self.synced = False
        self._weight, self._loss, self._tokens = 1.0, 0.0, 0
        self._step_times: list[float] = []
        self._last_log = (time.perf_counter(), 0)
        self._comm_taken = 0
        self._workers_at, self._logs_since_stats = -1e9, 0
        self._stats_cache: list[dict[str, Any]] = []

    # ---- setup ----------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        self.model = model
        model.register_forward_pre_hook(self._before_forward)
        opt = self.cfg.ps.optimizer or self.cfg.train.optimizer
        self.params, infos = param_infos(model, opt)
        self.layout = place(infos, len(self.endpoints), self.cfg.ps.placement)
        limit = self.cfg.ps.max_message_mb
        biggest = max(self.layout.server_bytes(i) for i in range(len(self.endpoints))) / 2**20
        if biggest > limit:
            raise PSError(f"one server's share of the model is {biggest:.1f} MB but ps.max_message_mb = {limit}; "
                          "raise it or add servers")

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        self.optimizer = RemoteOptimizer(self.cfg.train.lr)
        return self.optimizer

    def _lr(self) -> float:
        """The learning rate this step's push carries (the schedule set it before forward)."""
        return self.optimizer.param_groups[0]["lr"] if self.optimizer is not None else self.cfg.train.lr

    def _overlaps(self) -> bool:
        """Pushes may leave during backward (see paratrain.ps.overlap for when that is sound)."""
        ps = self.cfg.ps
        return (ps.overlap and len(self.endpoints) > 1 and self.mode != "async"
                and (self.mode == "sync" or self.cfg.train.grad_clip <= 0))

    def _connect(self) -> PSWorker:
        if self.worker is None:
            ps = self.cfg.ps
            self.client = PSClient(self.endpoints, self.secret, self.dims.rank, heartbeat_s=ps.heartbeat_s,
                                   dead_after_s=ps.dead_after_s, max_bytes=int(ps.max_message_mb * 2**20),
                                   stats_fn=self._worker_stats)
            two_phase = self.mode == "sync" and len(self.endpoints) > 1 and self.cfg.train.grad_clip > 0
            self.worker = PSWorker(self.client, self.layout, self.params, self.encoder, self.mode, two_phase,
                                   keep_log=self.cfg.checkpoint.every > 0, max_norm=self.cfg.train.grad_clip,
                                   log_dir=self.cfg.run_dir / "ps" / "pushlog" / f"worker{self.dims.rank}")
            if self._overlaps():
                w = self.worker
                self.early = EarlyPush(self.params, w.keys_of,
                                       lambda i: w.push_early(i, self._lr(), self._weight))
        return self.worker

    def _sync_params(self) -> None:
        if not self.synced:
            self._connect().connect(self.resume_clock)
            self.synced = True
        elif self.mode != "async":
            self.worker.finish()  # the previous step's reply (sync / ssp: step() did not wait for it)

    def _before_forward(self, module: nn.Module, args: Any) -> None:
        """Forward pre-hook: no forward (eval, user losses) runs before a deferred reply is installed."""
        if self.synced and self.mode != "async" and self.worker is not None:
            self.worker.finish()

    # ---- per step ---------------------------------------------------------------------------------
    def forward_backward(self, model: nn.Module, micro_batches: list[dict[str, torch.Tensor]],
                         loss_fn: Callable, scale: float, autocast: Callable) -> torch.Tensor:
        """This worker's mean gradient over its labelled tokens (the servers weight by the count)."""
        self._sync_params()
        count = getattr(loss_fn, "count", count_labels)  # user losses weigh their own batches
        self._weight = float(max(sum(count(b) for b in micro_batches), 1))
        self._tokens = sum(tokens_in(b) for b in micro_batches)
        if self.early is not None:
            self.early.arm()
        try:
            total = super().forward_backward(model, micro_batches, loss_fn, 1.0 / self._weight, autocast)
        finally:
            if self.early is not None:
                self.early.disarm()
        self._loss = float(total) / self._weight
        return total

    def no_sync(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """Accumulation micro-batches: their gradients are not final, so nothing is pushed early."""
        return self.early.paused() if self.early is not None else contextlib.nullcontext()

    def step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> float:
        self.optimizer = optimizer
        norm = 0.0
        if self.mode != "sync":  # sync clips the aggregated gradient on the servers
            norm = self.clip_grad_norm(model, self.cfg.train.grad_clip)
        # sync / ssp: the reply is installed just before the next forward (see _sync_params), so
        # the round trip overlaps the trainer's bookkeeping and the next batch's loading
        self.worker.step(optimizer.param_groups[0]["lr"], self._weight, wait=False)
        optimizer.step()  # no-op; keeps the LR scheduler's step-order bookkeeping happy
        self.encoder.observe_loss(self._loss)
        self.comm_bytes = self.client.bytes_sent + self.client.heartbeat_bytes
        self._step_times.append(time.perf_counter())
        return norm

    def take_comm_bytes(self) -> int:
        """Bytes sent since the last call (``comm_bytes`` is this worker's running total here)."""
        n, self._comm_taken = self.comm_bytes - self._comm_taken, self.comm_bytes
        return n

    # ---- checkpoints --------------------------------------------------------------------------------
    def model_state(self, model: nn.Module) -> dict[str, Any]:
        if self.worker is not None and self.synced:
            self.worker.finish()
        return super().model_state(model)

    def save_extra(self, tmp_dir: Path) -> None:
        """Rank 0 has every server write its shard + optimizer state into the checkpoint."""
        w = self._connect()
        if self.dims.is_main:
            for i in range(len(self.endpoints)):
                w.request(i, Msg.CHECKPOINT, {"path": str(Path(tmp_dir).resolve())})
        w.trim(self.last_save_clock)  # the previous checkpoint is committed by now
        self.last_save_clock = w.clock

    def load_extra(self, ckpt_dir: Path) -> None:

        self.resume_clock = int(ckpt.load_file(Path(ckpt_dir), "meta.json")["step"])
        self.last_save_clock = self.resume_clock

    # ---- collectives: checkpoint barriers, gathers and sync-mode sums go through server 0 ----------
    def _collect(self, op: str, values: list[float]) -> dict[str, Any]:
        meta = {"op": op, "values": values, "stats": self._worker_stats()}
        return self._connect().request(0, Msg.COLLECT, meta)

    def barrier(self) -> None:
        self._collect("barrier", [])

    def all_reduce_sum(self, t: torch.Tensor, group: object = None) -> torch.Tensor:
        """Sync: the exact sum over live workers.  Async/ssp: this worker's value x workers."""
        if self.mode != "sync":
            return t.mul_(self.dims.world_size)
        res = self._collect("sum", [float(v) for v in t.detach().reshape(-1).tolist()])
        t.copy_(torch.tensor(res["values"], dtype=t.dtype).reshape(t.shape))
        return t

    def gather_floats(self, values: list[float]) -> list[list[float]]:
        return self._collect("gather", [float(v) for v in values])["rows"]

    def reduce_eval_stats(self, stats: torch.Tensor) -> torch.Tensor:
        return self.all_reduce_sum(stats) if self.mode == "sync" else stats

    # ---- metrics -------------------------------------------------------------------------------------
    def _rate(self) -> float:
        t = self._step_times
        if len(t) <= WARMUP_STEPS + 1:
            return 0.0
        return (len(t) - 1 - WARMUP_STEPS) / max(1e-9, t[-1] - t[WARMUP_STEPS])

    def _worker_stats(self) -> dict[str, Any]:
        batch = self.cfg.data.batch_size * self.cfg.train.grad_accum
        rate = self._rate()
        w = self.worker
        return {"steps": len(self._step_times), "samples_per_s": rate * batch, "tokens_per_s": rate * self._tokens,
                "clock": w.clock if w else 0, "bytes_sent": self.comm_bytes,
                "pull_ms": sum(w.stats.rtt_ms[-20:]) / max(1, len(w.stats.rtt_ms[-20:])) if w else 0.0}

    def step_metrics(self) -> dict[str, Any]:
        w = self.worker
        if w is None:
            return {}
        now, steps = time.perf_counter(), len(self._step_times)
        t0, s0 = self._last_log
        self._last_log = (now, steps)
        st, w.stats = w.stats, type(w.stats)()
        out: dict[str, Any] = {
            "ps_pushes_per_s": (steps - s0) / max(1e-9, now - t0),
            "ps_pull_ms": sum(st.rtt_ms) / max(1, len(st.rtt_ms)),
            "ps_wait_ms": sum(st.wait_ms) / max(1, len(st.wait_ms)),
            "ps_staleness_hist": {str(k): v for k, v in sorted(st.staleness.items())},
            "ps_clock_gap": st.max_gap,
            "ps_early_pushes": st.early,  # server pushes that left during backward (ps.overlap)
            "compressed": self.encoder.active != "none",
        }
        if w.pushlog is not None:  # replay log: memory holds only pushes not yet written to disk
            ls = w.log_stats()
            out.update({"ps_log_mem_bytes": ls["mem"], "ps_log_disk_bytes": ls["disk"]})
        self._logs_since_stats += 1
        due = now - self._workers_at > STATS_EVERY_S or self._logs_since_stats >= 10  # a round trip: not every step
        if self.dims.is_main and due:
            s0_stats = w.try_stats(0)
            if s0_stats is not None:
                self._workers_at, self._logs_since_stats = now, 0
                out["ps_workers"] = s0_stats["workers"]
        return out

    def _server_stats(self) -> list[dict[str, Any]]:
        if self.worker is None:
            return []
        return [s for s in (self.worker.try_stats(i) for i in range(len(self.endpoints))) if s is not None]

    def extra_rss_mb(self) -> list[float]:
        if not self.dims.is_main:
            return []
        self._stats_cache = self._server_stats()
        return [s["rss_mb"] for s in self._stats_cache]

    def extra_summary(self) -> dict[str, Any]:
        if not self.dims.is_main:
            return {}
        stats = self._stats_cache or self._server_stats()
        out: dict[str, Any] = {"ps_mode": self.mode, "ps_servers": len(self.endpoints),
                               "ps_overlap": self._overlaps(), **self.encoder.summary()}
        if self.mode == "ssp":
            out["ps_staleness"] = self.cfg.ps.staleness
        if stats:
            hist: Counter[str] = Counter()
            for s in stats:
                hist.update(s["staleness_hist"])
            dead = set(stats[0]["dropped"])
            workers = {int(w): v for w, v in stats[0]["workers"].items()}
            out.update({
                "ps_max_clock_gap": max(s["max_clock_gap"] for s in stats),
                "ps_clock_gaps": stats[0]["clock_gaps"],
                "ps_staleness_hist": dict(sorted(hist.items(), key=lambda kv: int(kv[0]))),
                "ps_dropped_workers": sorted({w for s in stats for w in s["dropped"]}),
                "ps_server_restarts": [s["restarts"] for s in stats],
                "ps_rejected_messages": sum(sum(s["rejected"].values()) for s in stats),
            })
            rates = [v for w, v in workers.items() if w not in dead and v.get("samples_per_s")]
            if rates:  # the job's throughput: every surviving worker's own rate (they differ in async)
                out["samples_per_s"] = sum(v["samples_per_s"] for v in rates)
                out["tokens_per_s"] = sum(v["tokens_per_s"] for v in rates)
                out["worker_samples_per_s"] = {str(w): v["samples_per_s"] for w, v in sorted(workers.items())}
        return out

    def close(self) -> None:
        if self.early is not None:
            self.early.close()
            self.early = None
        if self.worker is not None:
            with contextlib.suppress(Exception):
                self.client.stop_heartbeats()  # no heartbeat may follow the LEAVE
                self.worker.leave()
            self.worker.close_log()
        if self.client is not None:
            self.client.close()
        self.worker = self.client = None
