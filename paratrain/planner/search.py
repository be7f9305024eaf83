"""Search: enumerate layouts of N devices, drop what does not fit, rank by step time.

Enumerated: every ``dp * tp * pp = N`` with ``tp`` inside a node and dividing the heads,
``pp`` at most the layer count, ``dp`` dividing the global batch; micro-batch sizes (powers
of two dividing the per-replica batch); ZeRO stage 0-3 (0-1 with pipelining, as
DeepSpeed allows); recompute none / selective / full (selective only when attention keeps
its scores, i.e. without flash attention); the 1F1B and interleaved (2 chunks) schedules;
gradient sync by all-reduce or through a parameter server (plain data parallel only).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from paratrain.planner.cost import Estimate, Layout, Setup, estimate
from paratrain.planner.flops import ModelSpec
from paratrain.planner.hardware import HardwareSpec

PRETTY = {"compute": "compute", "bubble": "pipeline bubble", "tp_comm": "tensor-parallel all-reduces",
          "pp_comm": "pipeline sends", "dp_comm": "gradient all-reduce", "zero3_comm": "ZeRO-3 gathers",
          "ps_comm": "parameter-server push/pull", "optimizer": "optimizer step",
          "alloc": "page faults of fresh buffers"}
SHORT = {"compute": "compute", "bubble": "bubble", "tp_comm": "TP comm", "pp_comm": "PP comm",
         "dp_comm": "DP comm", "zero3_comm": "ZeRO-3 comm", "ps_comm": "PS comm", "optimizer": "optimizer",
         "alloc": "page faults"}


def divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


@dataclass
class SearchResult:
    """All evaluated candidates, best first (fitting ones by step time, then the rest)."""

    candidates: list[Estimate]
    model: ModelSpec
    setup: Setup
    hw: HardwareSpec
    n_devices: int
    notes: list[str] = field(default_factory=list)

    @property
    def best(self) -> Estimate | None:
        return self.candidates[0] if self.candidates and self.candidates[0].fits else None

    def to_json(self, top: int = 0) -> dict[str, Any]:
        cands = self.candidates[:top] if top else self.candidates
        best = self.best
        return {"best": best.as_dict() if best else None, "candidates": [c.as_dict() for c in cands],
                "model": {"name": self.model.name, "arch": self.model.arch, "params": self.model.params,
                          "layers": self.model.total_layers, "hidden": self.model.d_model,
                          "heads": self.model.n_head, "seq": self.model.seq, "vocab": self.model.vocab},
                "cluster": {"gpus": self.n_devices, "gpu_type": self.hw.name,
                            "global_batch": self.setup.global_batch, "precision": self.setup.precision,
                            "gradient_codec": self.setup.codec},
                "explanation": explain(self), "evaluated": len(self.candidates),
                "fitting": sum(c.fits for c in self.candidates)}


def layouts(model: ModelSpec, n: int, setup: Setup, hw: HardwareSpec,
            fixed: dict[str, Any] | None = None) -> Iterator[Layout]:
    """Every layout of ``n`` devices the planner considers, restricted by ``fixed`` values
    (keys: tp, pp, dp, zero, microbatch, recompute, sync, schedule)."""
    fx = {k: v for k, v in (fixed or {}).items() if v is not None}
    if setup.optimizer == "onebit_adam":  # 1-bit Adam runs on plain all-reduce data parallel only
        fx = {"tp": 1, "pp": 1, "zero": 0, "sync": "allreduce", **fx}
    if setup.codec != "none":  # the DDP hooks compress plain data parallel (ZeRO-1 at most) and PS pushes
        fx = {"tp": 1, "pp": 1, **fx}
    B = setup.global_batch
    ok = lambda key, val: key not in fx or fx[key] == val  # noqa: E731
    recomputes = ["none", "full"] if setup.flash else ["none", "selective", "full"]
    for tp in divisors(n):
        if not ok("tp", tp) or ("tp" not in fx and (tp > hw.devices_per_node or model.kv_heads % tp)):
            continue
        for pp in divisors(n // tp):
            if not ok("pp", pp) or pp > model.total_layers:
                continue
            dp = n // (tp * pp)
            if not ok("dp", dp) or B % dp:
                continue
            per_replica = B // dp
            mbs = [b for b in divisors(per_replica) if b & (b - 1) == 0 and b <= 64] or [per_replica]
            if "microbatch" in fx:
                mbs = [fx["microbatch"]] if per_replica % fx["microbatch"] == 0 else []
            for b in mbs:
                m = per_replica // b
                zeros = [0, 1, 2, 3] if dp > 1 else [0]
                if (pp > 1 or setup.codec != "none") and "zero" not in fx:
                    zeros = [z for z in zeros if z <= 1]
                for zero in zeros:
                    if not ok("zero", zero):
                        continue
                    for rc in recomputes if "recompute" not in fx else [fx["recompute"]]:
                        scheds = [("1f1b", 1)]
                        if pp > 1 and m % pp == 0 and model.total_layers % (2 * pp) == 0:
                            scheds.append(("interleaved", 2))
                        for sched, v in scheds:
                            if not ok("schedule", sched):
                                continue
                            syncs = ["allreduce"]
                            if tp == 1 and pp == 1 and zero == 0 and dp > 1:
                                syncs.append("ps")
                            for sync in syncs:
                                if not ok("sync", sync):
                                    continue
                                servers = fx.get("ps_servers", max(1, dp // 4)) if sync == "ps" else 1
                                yield Layout(tp, pp, dp, zero, b, rc, sync, servers, sched, v)


def search(model: ModelSpec, n: int, setup: Setup, hw: HardwareSpec,
           fixed: dict[str, Any] | None = None) -> SearchResult:
    """Evaluate every layout; fitting ones first, fastest first."""
    cands = [estimate(model, lay, setup, hw) for lay in layouts(model, n, setup, hw, fixed)]
    cands.sort(key=_rank_key)
    res = SearchResult(cands, model, setup, hw, n)
    if not cands:
        res.notes.append("no layout matches (check that the degrees divide the device count, "
                         "the heads and the global batch)")
    elif not cands[0].fits:
        res.notes.append(f"no layout fits in {hw.memory_bytes / 1e9:.1f} GB per device; "
                         "showing the smallest")
    return res


def _rank_key(c: Estimate) -> tuple:
    """Fitting first; then faster (to 0.1%); among equals the simpler, then the smaller layout."""
    if not c.fits:
        return (1, c.memory_bytes)
    lay = c.layout
    simple = (lay.sync != "allreduce", lay.zero, lay.tp, lay.pp, lay.recompute != "none", lay.chunks)
    return (0, float(f"{c.step_time_s:.3g}"), simple, c.memory_bytes)


def dominant_text(c: Estimate) -> str:
    """E.g. ``compute 92%, bubble 5%``: the largest part and the largest overhead."""
    parts = c.time_parts
    total = c.step_time_s or 1.0
    order = sorted(parts, key=lambda k: -parts[k])
    text = f"{SHORT[order[0]]} {parts[order[0]] / total:.0%}"
    if len(order) > 1 and parts[order[1]] / total >= 0.01:
        text += f", {SHORT[order[1]]} {parts[order[1]] / total:.0%}"
    return text


def _short(lay: Layout) -> str:
    s = f"tp={lay.tp} pp={lay.pp} dp={lay.dp}"
    if lay.zero:
        s += f" zero{lay.zero}"
    if lay.sync == "ps":
        s += f" ps({lay.ps_servers} server{'s' if lay.ps_servers > 1 else ''})"
    return s


def explain(res: SearchResult) -> str:
    """One sentence on why the winner wins."""
    best = res.best
    if best is None:
        return res.notes[0] if res.notes else "nothing to explain"
    lay, tp_ = best.layout, best.time_parts
    share = tp_[best.dominant] / best.step_time_s
    cap = res.hw.memory_bytes / 1e9
    text = (f"{_short(lay)} with micro-batch {lay.microbatch}, recompute {lay.recompute}"
            f"{', interleaved' if lay.schedule == 'interleaved' else ''} wins: it fits in "
            f"{best.memory_bytes / 1e9:.1f} of {cap:.0f} GB per device and its {fmt_time(best.step_time_s)} step "
            f"is {share:.0%} {PRETTY[best.dominant]}")
    pure = next((c for c in res.candidates if c.layout.tp == 1 and c.layout.pp == 1 and c.layout.zero == 0
                 and c.layout.sync == "allreduce"), None)
    other = next((c for c in res.candidates[1:] if c.fits and _short(c.layout) != _short(lay)), None)
    if pure is not None and not pure.fits and (lay.tp > 1 or lay.pp > 1 or lay.zero):
        text += f"; plain data parallelism would need {pure.memory_bytes / 1e9:.0f} GB per device"
    elif other is not None:
        slower = other.step_time_s / best.step_time_s - 1
        extra = max(other.time_parts, key=lambda k: other.time_parts[k] - tp_.get(k, 0.0))
        if slower < 0.005:
            text += (f"; {_short(other.layout)} is as fast but simpler layouts rank first "
                     f"({other.memory_bytes / 1e9:.1f} GB per device)")
        else:
            text += f"; the next layout ({_short(other.layout)}) is {slower:.0%} slower, mostly {PRETTY[extra]}"
    return text + "."


def fmt_time(sec: float) -> str:
    if sec >= 1:
        return f"{sec:.2f} s"
    return f"{sec * 1e3:.1f} ms"


def format_table(res: SearchResult, top: int = 10) -> str:
    """The top candidates as a fixed-width table."""
    head = (f"{'#':>2} {'tp':>3} {'pp':>3} {'dp':>5} {'zero':>4} {'mb':>3} {'recompute':>9} {'sched':>5} "
            f"{'sync':>4} {'mem/GPU':>9} {'step':>9} {'TFLOP/s':>8} {'MFU':>6}  dominant")
    lines = [head, "-" * len(head)]
    for i, c in enumerate(res.candidates[:top], 1):
        lay = c.layout
        sched = "1f1b" if lay.pp == 1 or lay.schedule == "1f1b" else f"int{lay.chunks}"
        mem_s = f"{c.memory_bytes / 1e9:.2f} GB" + ("" if c.fits else "!")
        tf = c.tflops_per_gpu
        tf_s = f"{tf:.1f}" if tf >= 1 else f"{tf * 1e3:.0f}G"
        lines.append(f"{i:>2} {lay.tp:>3} {lay.pp:>3} {lay.dp:>5} {lay.zero:>4} {lay.microbatch:>3} "
                     f"{lay.recompute:>9} {sched:>5} {'ps' if lay.sync == 'ps' else 'ar':>4} {mem_s:>9} "
                     f"{fmt_time(c.step_time_s):>9} "
                     f"{tf_s:>8} {c.mfu:>6.1%}  {dominant_text(c)}")
    return "\n".join(lines)
