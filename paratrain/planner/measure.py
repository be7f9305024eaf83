"""``paratrain plan --measure``: the planner checks itself against real runs on this machine.

1. Measure the CPU (matmul, memory bandwidth, gloo, baseline RSS; calibrate.measure_cpu).
2. Calibrate the compute model: time forward + backward of the config's model in this
   process at two micro-batch sizes with one worker's threads; a straight line through
   the two gives the achievable fraction of the matmul peak and the fixed cost per layer.
3. For each layout (dp2, zero3, tp2, pp2 by default) predict step time and peak memory per
   rank, then run ``paratrain train`` with that layout for a few steps in a subprocess
   and read its summary.json (``step_time_ms_median``, ``peak_rss_mb``).
4. Report predicted / measured.  A layout the trainer cannot run yet is reported as
   ``not available: <reason>``, never estimated in its place.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from paratrain.config import Config, ConfigError
from paratrain.planner.calibrate import cpu_busy, measure_alloc_bw, measure_cpu, wait_for_quiet
from paratrain.planner.cost import Layout, Setup, estimate
from paratrain.planner.flops import ModelSpec, spec_from_config
from paratrain.planner.hardware import HardwareSpec, describe

MiB = float(1 << 20)
_LAYOUT_RE = re.compile(r"^(single|ps|dp(\d+)|tp(\d+)|pp(\d+)|zero([0-3]))$")


@dataclass
class MeasureLayout:
    """A layout the self-check runs: its name, config overrides and planner layout."""

    name: str
    nproc: int
    tp: int = 1
    pp: int = 1
    zero: int = 0
    sync: str = "allreduce"

    def overrides(self) -> list[str]:
        return [f"--parallel.nproc={self.nproc}", f"--parallel.tp={self.tp}", f"--parallel.pp={self.pp}",
                f"--parallel.zero={self.zero}", f'--parallel.sync="{self.sync}"', "--parallel.dp=0"]


def parse_layout(name: str) -> MeasureLayout:
    """``single``, ``dpN``, ``tpN``, ``ppN``, ``zeroK`` (on 2 ranks) or ``ps`` (2 workers)."""
    mt = _LAYOUT_RE.match(name.lower())
    if not mt:
        raise ConfigError(f"unknown layout {name!r} for --measure (single | dpN | tpN | ppN | zero0-3 | ps)")
    key = name.lower()
    if key == "single":
        return MeasureLayout(key, 1)
    if key == "ps":
        return MeasureLayout(key, 2, sync="ps")
    if mt.group(2):
        return MeasureLayout(key, int(mt.group(2)))
    if mt.group(3):
        return MeasureLayout(key, int(mt.group(3)), tp=int(mt.group(3)))
    if mt.group(4):
        return MeasureLayout(key, int(mt.group(4)), pp=int(mt.group(4)))
    return MeasureLayout(key, 2, zero=int(mt.group(5)))


def layout_config(cfg: Config, ml: MeasureLayout, steps: int) -> tuple[Config | None, str]:
    """The config the run will use (validated), or None and why it cannot run.

    Pipeline layouts untie the embedding and the LM head (stages cannot share a weight);
    the prediction is made for the same untied model.
    """
    data = cfg.to_dict()
    data["parallel"].update(nproc=ml.nproc, tp=ml.tp, pp=ml.pp, zero=ml.zero, sync=ml.sync, dp=0)
    if ml.pp > 1:
        data["model"]["tie_embeddings"] = False
    data["train"].update(steps=steps, warmup_steps=min(data["train"]["warmup_steps"], steps), eval_every=0,
                         log_every=1)
    data["checkpoint"].update(every=0, keep=0, resume=False, path="")
    try:
        return Config.from_dict(data), ""
    except ConfigError as e:
        return None, str(e)


def availability(ml: MeasureLayout) -> str:
    """Empty when the layout can run on this machine; otherwise why not."""
    if ml.nproc > (os.cpu_count() or 1):
        return f"needs {ml.nproc} processes but this machine has {os.cpu_count()} cores"
    return ""


# ---- calibration ------------------------------------------------------------------------------------


def calibrate(cfg: Config, spec: ModelSpec, hw: HardwareSpec, threads: int, microbatch: int,
              busy_threads: int = 0) -> HardwareSpec:
    """Fit ``efficiency`` of ``hw``: time forward + backward of the config's model on one
    micro-batch of ``microbatch`` sequences with ``threads`` threads, while ``busy_threads``
    other threads run the same forward + backward on their own copies (as the other workers
    of a layout do: cores that share caches or a physical core slow each other).

    The efficiency is relative to the matmul rate measured alone, so the returned spec's
    peak is that alone rate; ``layer_overhead_s`` stays the spec's fixed cost per layer.
    """
    import copy
    import threading

    import torch  # calibration runs the model: the rest of the planner never imports torch

    from paratrain.data import build_data
    from paratrain.models import build_model
    from paratrain.models.loss import lm_loss_sum

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    stop = threading.Event()

    def run(m: torch.nn.Module) -> None:
        lm_loss_sum(m, batch).backward()
        m.zero_grad(set_to_none=True)

    def burn() -> None:  # another worker's forward + backward on its own copy (torch releases the GIL)
        twin = copy.deepcopy(model)
        while not stop.is_set():
            run(twin)

    burners = [threading.Thread(target=burn, daemon=True) for _ in range(busy_threads)]
    try:
        data = build_data(cfg, 0, 1)
        torch.manual_seed(0)
        model = build_model(cfg.model, data.vocab_size, data.pad_id)
        batch = {k: v[:microbatch] for k, v in next(data.train).items()}
        for th in burners:
            th.start()

        for _ in range(3):
            run(model)
        times = []
        for _ in range(7):
            t0 = time.perf_counter()
            run(model)
            times.append(time.perf_counter() - t0)
        # the median repeat, as the run's step time is a median: this VM's jitter (a step's
        # median is ~1.3x its fastest here) belongs in the prediction
        t_mb = statistics.median(times)
        alloc_bw = measure_alloc_bw()  # page faults slow down too when the other cores work
    finally:
        stop.set()
        for th in burners:
            th.join(timeout=10)
        torch.set_num_threads(old)
    flops = spec.flops_per_token("none") * microbatch * spec.seq
    compute_s = max(t_mb - spec.total_layers * hw.layer_overhead_s, 0.5 * t_mb)
    m = hw.measured
    fp32 = cfg.train.precision == "fp32"
    alone = 1e9 * (m["matmul_fp32_gflops"] if fp32 else m["matmul_bf16_gflops"])
    eff = min(1.0, flops / (compute_s * alone))
    measured = dict(m, calib_fwd_bwd_ms=t_mb * 1e3, calib_microbatch=microbatch, calib_busy_threads=busy_threads,
                    calib_efficiency=eff, calib_layer_overhead_ms=hw.layer_overhead_s * 1e3)
    measured["calib_alloc_bw_gbs"] = alloc_bw / 1e9
    peaks = {"peak_flops_fp32": alone} if fp32 else {"peak_flops": alone}
    return hw.with_(efficiency=eff, measured=measured, alloc_bw=alloc_bw, **peaks)


# ---- predictions and runs ---------------------------------------------------------------------------


def _recompute(ac: str) -> str:
    """The planner's recompute mode of ``train.activation_checkpointing`` (op-level SAC, which
    keeps matmul outputs and recomputes element-wise work, is closest to ``selective``)."""
    return "selective" if ac == "selective_op" else ac


def predict(cfg: Config, spec: ModelSpec, hw: HardwareSpec) -> tuple[float, list[float]]:
    """(step time in s, peak bytes per rank) the planner predicts for a resolved config."""
    p = cfg.parallel
    dp = cfg.dp
    mb_count = (p.microbatches or p.pp) if p.pp > 1 else 1
    micro = max(1, cfg.data.batch_size // mb_count)
    setup = Setup(cfg.data.batch_size * cfg.train.grad_accum * dp, cfg.train.precision, cfg.train.optimizer,
                  flash=True, bucket_bytes=p.bucket_cap_mb * MiB, ps_mode=cfg.ps.mode,
                  ps_overlap=cfg.ps.overlap,
                  loss_parallel=bool(getattr(p, "loss_parallel", False)) and p.pp == 1,
                  tp_allreduces=6)  # separate q/k/v projections: 4 backward all-reduces + 2 forward
    # paratrain's tensor parallel replicates LayerNorms and residuals: no sequence parallelism
    lay = Layout(tp=p.tp, pp=p.pp, dp=dp, zero=p.zero, microbatch=micro,
                 recompute=_recompute(cfg.train.activation_checkpointing), sync=p.sync, ps_servers=cfg.ps.servers,
                 schedule=p.pp_schedule, sp=False,
                 chunks=getattr(p, "virtual_stages", 2) if p.pp_schedule == "interleaved" else 1)
    est = estimate(spec, lay, setup, hw)
    per_rank = [est.memory_per_stage[(r // p.tp) % p.pp] for r in range(p.nproc)]
    return est.step_time_s, per_rank


def _error_reason(stderr: str, summary: dict[str, Any]) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    errs = [ln for ln in lines if re.search(r"(Error|error|Exception)\b", ln) and "elastic/errors" not in ln]
    if errs:
        return re.sub(r"^\[rank\d+\]:\s*", "", errs[-1])[:200]
    return str(summary.get("error") or (lines[-1] if lines else "the run failed"))[:200]


def run_layout(cfg: Config, timeout_s: float = 600.0) -> dict[str, Any]:
    """Train ``cfg`` (already resolved) in a subprocess; return its summary or the failure."""
    run_dir = tempfile.mkdtemp(prefix="paratrain-measure-")
    cfg.run.dir = run_dir
    cfg_file = os.path.join(run_dir, "measure.toml")
    with open(cfg_file, "w") as f:
        f.write(cfg.to_toml())
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    try:
        r = subprocess.run([sys.executable, "-m", "paratrain.cli", "train", "-c", cfg_file], env=env,
                           capture_output=True, text=True, timeout=timeout_s)
        path = os.path.join(run_dir, "summary.json")
        summary = json.load(open(path)) if os.path.exists(path) else {}
        if r.returncode != 0 or summary.get("status") != "ok":
            return {"status": "error", "reason": _error_reason(r.stderr, summary)}
        metrics = os.path.join(run_dir, "metrics.jsonl")
        if os.path.exists(metrics):
            with open(metrics) as f:
                recs = [json.loads(ln) for ln in f if ln.strip()]
            summary["step_ms_all"] = [r_["step_ms"] for r_ in recs if "step_ms" in r_]
            summary["losses"] = [r_["loss"] for r_ in recs if "loss" in r_]
        return summary
    except subprocess.TimeoutExpired:
        return {"status": "error", "reason": f"timed out after {timeout_s:.0f} s"}
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def _calibrated(base: Config, spec: ModelSpec, config_path: str | None, threads: int, procs: int, micro: int,
                busy_threads: int) -> HardwareSpec:
    """Measure the speeds again and calibrate, for one layout's workers."""
    hw_now = measure_cpu(threads, procs, "fresh", config_path or "", refresh=True)
    return calibrate(base, spec, hw_now, threads, micro, busy_threads)


def _probe_factors(cfg: Config, ml: MeasureLayout, threads: int, micro: int) -> dict[str, float]:
    """The 2-rank layer probe's TP / FSDP2 factors for a tp2 or zero3 layout (else none)."""
    if not (ml.tp == 2 or (ml.zero == 3 and ml.nproc == 2)):
        return {}
    from paratrain.planner.probe import probe_layers  # torch.distributed, for the layouts that probe

    m = cfg.model
    r = probe_layers(m.d_model, m.n_head, m.d_ff, micro, cfg.data.seq_len, threads)
    return {"plain_ms": r["plain_s"] * 1e3, "tp2_layer_factor": r["tp_ratio"], "fsdp2_layer_factor": r["fsdp_ratio"]}


def _with_probe(hw: HardwareSpec, probe: dict[str, float]) -> HardwareSpec:
    """``hw`` with the probe's factors (unchanged when no probe ran)."""
    if not probe:
        return hw
    return hw.with_(tp2_layer_factor=probe["tp2_layer_factor"], fsdp2_layer_factor=probe["fsdp2_layer_factor"])


def check_layouts(config_path: str | None, names: list[str], steps: int = 20,
                  wait_quiet_s: float = 0.0) -> dict[str, Any]:
    """Predict and measure each named layout; the JSON the benchmark records.

    ``wait_quiet_s`` > 0 waits up to that long for idle cores before each layout.
    """
    base = Config.load(config_path)
    layouts = [parse_layout(n) for n in names]
    spec = spec_from_config(base, name=config_path or "default")
    procs = max(ml.nproc for ml in layouts)
    hw = measure_cpu(threads=base.train.threads or None, procs=procs, baseline="fresh",
                     config_path=config_path or "")
    rows = []
    for ml in layouts:
        row: dict[str, Any] = {"layout": ml.name}
        cfg, why = layout_config(base, ml, steps)
        why = why or availability(ml)
        if cfg is None or why:
            row["status"] = f"not available: {why}"
            rows.append(row)
            continue
        # measure and calibrate again right before each run: the machine's load changes, and a
        # layout on fewer processes gets more threads per worker
        busy = wait_for_quiet(wait_quiet_s) if wait_quiet_s else cpu_busy(0.5)
        cores = os.cpu_count() or 1
        threads = base.train.threads or max(1, cores // ml.nproc)
        micro = max(1, cfg.data.batch_size // ((cfg.parallel.microbatches or ml.pp) if ml.pp > 1 else 1))
        busy_threads = max(0, min(cores, threads * ml.nproc) - threads)

        calib_args = (threads, ml.nproc, micro, busy_threads)
        lay_hw = _calibrated(base, spec, config_path, *calib_args)
        row["calibration"] = {k: lay_hw.measured.get(k) for k in (
            "threads", "matmul_fp32_gflops", "allreduce_bus_bw_gbs", "calib_efficiency",
            "calib_fwd_bwd_ms", "calib_microbatch", "calib_busy_threads", "calib_alloc_bw_gbs", "gather_latency_ms",
            "load_avg")}
        row["calibration"]["cpu_busy_before"] = busy
        lay_spec = spec_from_config(cfg, name=spec.name)
        if lay_spec.tied != spec.tied:
            row["note"] = "model.tie_embeddings = false (pipeline stages cannot share the embedding)"
        probe_before = _probe_factors(cfg, ml, threads, micro)
        pred_before, pred_mem = predict(cfg, lay_spec, _with_probe(lay_hw, probe_before))
        hw = lay_hw  # the latest measurement, for the report's header
        summary = run_layout(cfg)
        row["calibration"].update(load_avg_after=os.getloadavg()[0], cpu_busy_after=cpu_busy(0.5))
        # this machine's speed drifts by tens of percent over minutes: calibrate (and probe) again
        # after the run and predict with the mean of the two (both are reported)
        probe_after = _probe_factors(cfg, ml, threads, micro)
        if probe_before:
            row["probe"] = {"before": probe_before, "after": probe_after}
        pred_after, _ = predict(cfg, lay_spec, _with_probe(_calibrated(base, spec, config_path, *calib_args),
                                                           probe_after))
        pred_s = (pred_before + pred_after) / 2
        row["predicted_step_ms_before_after"] = [pred_before * 1e3, pred_after * 1e3]
        if summary.get("status") != "ok":
            row["status"] = f"not available: {summary.get('reason', 'the run failed')}"
            rows.append(row)
            continue
        meas_s = (summary.get("step_time_ms_median") or 0.0) / 1e3
        # the fastest steady-state step: the cost without interference from other jobs
        steady = summary.get("step_ms_all", [])[max(3, steps // 5):]
        meas_min = min(steady) / 1e3 if steady else meas_s
        meas_mem = [x * MiB for x in summary.get("peak_rss_mb", [])[: ml.nproc]]
        mem_ratios = [p / m for p, m in zip(pred_mem, meas_mem, strict=False) if m]
        row.update(status="ok", strategy=summary.get("strategy"), steps=summary.get("steps"),
                   predicted_step_ms=pred_s * 1e3, measured_step_ms=meas_s * 1e3,
                   step_ratio=pred_s / meas_s if meas_s else None, measured_step_ms_min=meas_min * 1e3,
                   step_ratio_min=pred_s / meas_min if meas_min else None,
                   predicted_peak_mib=[x / MiB for x in pred_mem], measured_peak_mib=[x / MiB for x in meas_mem],
                   memory_ratio=mem_ratios, memory_ratio_max=max(mem_ratios, key=lambda r: abs(r - 1), default=None))
        rows.append(row)
    ok = [r for r in rows if r["status"] == "ok"]
    in_band = all(0.7 <= r["step_ratio"] <= 1.3 and all(0.7 <= x <= 1.3 for x in r["memory_ratio"]) for r in ok)
    return {"config": config_path or "(default)", "hardware": hw.measured, "steps": steps, "layouts": rows,
            "all_within_0.7_1.3": in_band if ok else None, "load_avg": os.getloadavg()[0],
            "hardware_line": describe(hw)}


def format_report(res: dict[str, Any]) -> str:
    """Predicted vs measured as a table (ratio = predicted / measured)."""
    lines = [f"config: {res['config']}", f"hardware: {res['hardware_line']}",
             f"{res['steps']} training steps per layout; step = median (fastest) steady-state step; "
             "peak memory = RSS per rank in MiB",
             f"{'layout':<7} {'strategy':<8} {'predicted':>10} {'measured':>20} {'ratio':>12}   "
             f"{'predicted MiB':<14} {'measured MiB':<14} {'ratio':<10}"]
    notes = []
    for r in res["layouts"]:
        if r["status"] != "ok":
            lines.append(f"{r['layout']:<7} {r['status']}")
            continue
        c = r["calibration"]
        notes.append(f"{r['layout']}: {c['matmul_fp32_gflops']:.0f} GFLOP/s x {c['calib_efficiency']:.0%}; "
                     f"machine busy {c['cpu_busy_before']:.0%}"
                     + (f"; {r['note']}" if r.get("note") else ""))
        pm = ", ".join(f"{x:.0f}" for x in r["predicted_peak_mib"])
        mm = ", ".join(f"{x:.0f}" for x in r["measured_peak_mib"])
        mr = ", ".join(f"{x:.2f}" for x in r["memory_ratio"])
        meas = f"{r['measured_step_ms']:.1f} ({r['measured_step_ms_min']:.1f}) ms"
        ratio = f"{r['step_ratio']:.2f} ({r['step_ratio_min']:.2f})"
        lines.append(f"{r['layout']:<7} {str(r['strategy']):<8} {r['predicted_step_ms']:>7.1f} ms {meas:>20} "
                     f"{ratio:>12}   {pm:<14} {mm:<14} {mr:<10}")
    if notes:
        lines.append("calibration (matmul rate alone x fraction reached by forward + backward with the other "
                     "cores busy): " + "; ".join(notes))
    if res["all_within_0.7_1.3"] is not None:
        lines.append(f"all median ratios within 0.7-1.3: {'yes' if res['all_within_0.7_1.3'] else 'no'}")
    return "\n".join(lines)


def self_check(config_path: str | None, names: list[str], steps: int = 20, as_json: bool = False) -> int:
    """Entry point of ``paratrain plan --measure``."""
    if steps < 5:
        raise ConfigError(f"--steps must be at least 5 for a steady-state median, got {steps}")
    res = check_layouts(config_path, names, steps)
    print(json.dumps(res) if as_json else format_report(res))
    return 0
