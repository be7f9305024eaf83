"""Measuring this machine's CPU for the planner (about 3-5 s): fp32 and bf16 matmul FLOP/s with
the worker's thread count, memory-copy bandwidth, gloo all-reduce and send/recv latency and
bandwidth between two ranks on loopback, and the resident memory of a process that imported
paratrain and ran two training steps of a tiny model (the baseline every worker pays before its
model does).  The result is a :class:`~paratrain.planner.hardware.HardwareSpec` named ``cpu``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from typing import Any

from paratrain.mfu import measure_cpu_peak
from paratrain.planner.hardware import CPU_DEFAULT, GPU_SPECS, GPU_TYPES, HardwareSpec


def _best_time(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_matmul(threads: int, n: int = 512, dtype: str = "float32", repeats: int = 6) -> float:
    """FLOP/s of an n x n x n matmul with ``threads`` intra-op threads (the best of ``repeats``:
    the planner's calibrated ceiling; MFU uses the median, see :mod:`paratrain.mfu`)."""
    return measure_cpu_peak("bf16" if dtype == "bfloat16" else "fp32", n, repeats, threads, stat=min)


def measure_mem_bw(nbytes: int = 32 << 20, repeats: int = 5) -> float:
    """Memory bandwidth in bytes/s of a large copy (read + write counted)."""
    import torch

    a = torch.ones(nbytes // 4)
    b = torch.empty_like(a)
    return 2.0 * nbytes / _best_time(lambda: b.copy_(a), repeats)


def measure_alloc_bw(nbytes: int = 32 << 20, repeats: int = 4) -> float:
    """Bytes/s of first-touching freshly mmapped memory (page faults + zeroing), net of the
    write itself: what every large allocation costs when glibc returns freed memory."""
    import torch

    buf = torch.empty(nbytes // 4)
    t_fill = _best_time(lambda: buf.fill_(1.0), repeats)
    t_new = _best_time(lambda: torch.ones(nbytes // 4), repeats)
    return nbytes / max(t_new - t_fill, 1e-9)


def measure_gloo(nbytes: int = 4 << 20) -> dict[str, float]:
    """gloo all-reduce and send/recv between two ranks on loopback (two threads, one process).

    Returns latency (s) of a 16-byte all-reduce, all-reduce bus bandwidth, all-gather /
    reduce-scatter bus bandwidth (gloo's are much slower than its all-reduce) and one-way
    send/recv bandwidth (bytes/s) for ``nbytes`` messages.
    """
    import datetime

    import torch
    import torch.distributed as dist

    store = dist.HashStore()
    out: dict[int, dict[str, float]] = {}
    errors: list[BaseException] = []

    def rank_main(rank: int) -> None:
        try:
            pg = dist.ProcessGroupGloo(store, rank, 2, datetime.timedelta(seconds=20))
            small, big = torch.ones(4), torch.ones(nbytes // 4)
            lat = _best_time(lambda: pg.allreduce([small]).wait(), 20)
            t_big = _best_time(lambda: pg.allreduce([big]).wait(), 4)
            gathered, half = torch.empty(2 * big.numel()), torch.empty(big.numel() // 2)
            t_ag = _best_time(lambda: pg._allgather_base(gathered, big).wait(), 3)
            t_rs = _best_time(lambda: pg._reduce_scatter_base(half, big).wait(), 3)
            g2, h1 = torch.empty(8), torch.empty(2)
            lat_g = (_best_time(lambda: pg._allgather_base(g2, small).wait(), 10)
                     + _best_time(lambda: pg._reduce_scatter_base(h1, small).wait(), 10)) / 2

            def p2p() -> None:
                if rank == 0:
                    pg.send([big], 1, 0).wait()
                    pg.recv([small], 1, 1).wait()
                else:
                    pg.recv([big], 0, 0).wait()
                    pg.send([small], 0, 1).wait()

            t_p2p = _best_time(p2p, 4)
            out[rank] = {"lat": lat, "ar": t_big, "p2p": t_p2p, "ag": t_ag, "rs": t_rs, "lat_g": lat_g}
        except BaseException as e:  # report in the caller's thread
            errors.append(e)

    threads = [threading.Thread(target=rank_main, args=(r,), daemon=True) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    if errors or len(out) < 2:
        raise RuntimeError(f"gloo measurement failed: {errors[0] if errors else 'timed out'}")
    lat = max(o["lat"] for o in out.values())
    t_ar = max(o["ar"] for o in out.values())
    t_p2p = max(o["p2p"] for o in out.values())
    # 2 ranks: an all-gather into 2x nbytes moves nbytes per rank, a reduce-scatter of nbytes half
    ag_bw = nbytes / max(max(o["ag"] for o in out.values()) - lat, 1e-9)
    rs_bw = nbytes / 2 / max(max(o["rs"] for o in out.values()) - lat, 1e-9)
    # ring all-reduce moves 2 (n-1)/n bytes per rank: n = 2 -> bus bandwidth = bytes / time
    return {"latency_s": lat, "allreduce_bus_bw": nbytes / max(t_ar - lat, 1e-9),
            "gather_bus_bw": 2 / (1 / ag_bw + 1 / rs_bw),
            "gather_latency_s": max(o["lat_g"] for o in out.values()),
            "p2p_bw": nbytes / max(t_p2p - 2 * lat, 1e-9)}


_BASELINE_PROBE = """
import sys, json, resource, datetime, torch
torch.set_num_threads(1)
import torch.distributed as dist
import paratrain.training.trainer
from paratrain.config import Config, ModelConfig
from paratrain.models import build_model
config, with_dist = (sys.argv[1:3] + ["-", "nodist"])[:2]
if config != "-":  # the config's data pipeline, as a worker builds it ("" = the default config)
    from paratrain.data import build_data
    data = build_data(Config.load(config or None), 0, 1)
    next(data.train)
if with_dist == "dist":  # a gloo context, as every distributed worker has
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=30))
m = build_model(ModelConfig(n_layer=1, n_head=2, d_model=16, d_ff=32, max_seq_len=16), 261, 0)
opt = torch.optim.AdamW(m.parameters(), foreach=False)
for _ in range(2):
    x = torch.randint(0, 261, (2, 16))
    torch.nn.functional.cross_entropy(m(x).flatten(0, 1), x.flatten()).backward()
    opt.step(); opt.zero_grad()
out = {}
if with_dist == "dist":
    dist.all_reduce(torch.ones(4))
# VmHWM is this process's own peak; ru_maxrss would also count the parent's RSS at fork time
hwm = [ln for ln in open("/proc/self/status") if ln.startswith("VmHWM:")]
out["rss"] = int(hwm[0].split()[1]) * 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
if with_dist == "dist":  # what AdamW's step costs per DTensor parameter (FSDP2 / TP) over a plain one
    import time
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    mesh = init_device_mesh("cpu", (1,))
    def step_time(params):
        for q in params:
            q.grad = torch.ones_like(q)
        o = torch.optim.AdamW(params, foreach=False)
        o.step()
        t0 = time.perf_counter()
        for _ in range(5):
            o.step()
        return (time.perf_counter() - t0) / 5 / len(params)
    plain = [torch.nn.Parameter(torch.randn(64, 64)) for _ in range(16)]
    dts = [torch.nn.Parameter(distribute_tensor(torch.randn(64, 64), mesh, [Shard(0)])) for _ in range(16)]
    out["dtensor_param_s"] = max(0.0, step_time(dts) - step_time(plain))
    try:  # the DTensor dispatch cost of one tensor-parallel block (forward + backward), 1-rank mesh
        import copy
        from torch.distributed.tensor.parallel import parallelize_module
        from paratrain.models.blocks import Block
        from paratrain.parallel.tensor_parallel import block_plan
        plain_blk = Block(64, 2, 128, 0.0, causal=True)
        tp_blk = parallelize_module(copy.deepcopy(plain_blk), mesh, block_plan(plain_blk))
        x = torch.randn(2, 16, 64)
        def fb_time(blk):
            best = 1e9
            for i in range(8):
                t0 = time.perf_counter()
                blk(x).sum().backward()
                if i >= 2:
                    best = min(best, time.perf_counter() - t0)
            return best
        out["tp_layer_s"] = max(0.0, fb_time(tp_blk) - fb_time(plain_blk))
    except Exception:
        pass
print(json.dumps(out))
"""


_PROBE_EXTRA: dict[str, float] = {}  # other figures the last fresh probe measured


def measure_baseline_rss(fresh_process: bool = True, config_path: str | None = None,
                         timeout_s: float = 120.0) -> float:
    """Resident bytes of a process that imported paratrain and torch and ran two steps of a
    tiny model: the memory every CPU worker holds before its own model's.

    ``fresh_process`` runs the probe in a new interpreter (exact, ~2-4 s); otherwise it runs
    here and reads this process's current RSS (fast; exact only in a process that has not
    yet held much more memory, such as ``paratrain plan`` at start-up).  With
    ``config_path`` (fresh process only) the probe also builds that config's data pipeline
    (``""``: the default config) and a gloo context, as a distributed worker does.
    """
    if fresh_process:
        args = ["-", "nodist"] if config_path is None else [config_path, "dist"]
        r = subprocess.run([sys.executable, "-c", _BASELINE_PROBE, *args], capture_output=True,
                           text=True, timeout=timeout_s, check=True)
        out = json.loads(r.stdout.strip().splitlines()[-1])
        _PROBE_EXTRA.update(out)
        return float(out["rss"])
    import contextlib
    import io

    argv = sys.argv
    try:
        sys.argv = ["probe"]
        with contextlib.redirect_stdout(io.StringIO()):
            exec(compile(_BASELINE_PROBE, "<baseline-probe>", "exec"), {})  # noqa: S102 - our own constant
    finally:
        sys.argv = argv
    with open("/proc/self/statm") as f:
        return float(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


_CACHE: dict[tuple[int, int, str, str | None], HardwareSpec] = {}


def measure_speeds(threads: int, procs: int = 1) -> dict[str, Any]:
    """Matmul, memory, page-fault and gloo figures of this machine right now (about 1-2 s).

    The matmul peak is measured alone (``threads``) and with every worker busy (all
    ``procs * threads`` threads, capped at the cores, divided by ``procs``): cores that share
    a physical core or caches give each worker less than it gets alone.  The spec's peak is
    the shared figure; a calibration timed alone compares against the alone one.
    """
    t0 = time.perf_counter()
    cores = os.cpu_count() or 1
    fp32 = measure_matmul(threads)
    bf16 = measure_matmul(threads, dtype="bfloat16", n=256, repeats=3)
    busy = min(cores, threads * procs)
    share = 1.0
    if procs > 1:
        share = min(1.0, measure_matmul(busy) / procs / fp32) if busy > threads else threads / busy / procs
        share = min(share, cores / (threads * procs))
    bw = measure_mem_bw()
    alloc = measure_alloc_bw()
    gloo = measure_gloo()
    fields = dict(peak_flops=bf16 * share, peak_flops_fp32=fp32 * share, mem_bw=bw,
                  intra_bw=gloo["allreduce_bus_bw"], p2p_bw=gloo["p2p_bw"], intra_latency=gloo["latency_s"],
                  alloc_bw=alloc, gather_bw=gloo["gather_bus_bw"], gather_latency=gloo["gather_latency_s"])
    measured = {"threads": threads, "procs": procs, "matmul_fp32_gflops": fp32 / 1e9,
                "matmul_bf16_gflops": bf16 / 1e9, "shared_core_factor": share,
                "mem_bw_gbs": bw / 1e9, "alloc_bw_gbs": alloc / 1e9,
                "allreduce_bus_bw_gbs": gloo["allreduce_bus_bw"] / 1e9,
                "gather_bus_bw_gbs": gloo["gather_bus_bw"] / 1e9,
                "gather_latency_ms": gloo["gather_latency_s"] * 1e3,
                "p2p_bw_gbs": gloo["p2p_bw"] / 1e9, "allreduce_latency_ms": gloo["latency_s"] * 1e3,
                "load_avg": os.getloadavg()[0], "speeds_s": time.perf_counter() - t0}
    return {"fields": fields, "measured": measured}


def measure_cpu(threads: int | None = None, procs: int = 1, baseline: str = "here",
                config_path: str | None = None, refresh: bool = False) -> HardwareSpec:
    """Measure this machine as a ``cpu`` device: ``procs`` worker processes with ``threads``
    threads each (default: cores / procs, as the trainer sets them), sharing its cores, RAM
    and loopback.

    ``baseline``: measure the per-process RSS ``"here"`` (fast), in a ``"fresh"`` process
    (exact; with ``config_path`` it includes that config's data pipeline and a gloo context
    and also measures the DTensor overhead, see :func:`measure_baseline_rss`), or ``"none"``
    (the documented default).  Results are cached per (threads, procs, baseline, config);
    ``refresh`` measures the speeds again (the machine's load changes) but keeps the baseline.
    """
    cores = os.cpu_count() or 1
    threads = threads or max(1, cores // max(1, procs))
    key = (threads, procs, baseline, config_path)
    if key not in _CACHE:
        extra: dict[str, Any] = {}
        if baseline == "none":
            base = CPU_DEFAULT.reserved_bytes
        else:  # first, before the measurements below grow this process
            base = measure_baseline_rss(fresh_process=baseline == "fresh", config_path=config_path)
            if baseline == "fresh":
                extra.update({k: _PROBE_EXTRA[k] for k in ("dtensor_param_s", "tp_layer_s") if k in _PROBE_EXTRA})
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        _CACHE[key] = CPU_DEFAULT.with_(memory_bytes=float(ram) / max(1, procs),
                                        devices_per_node=max(procs, cores // threads), reserved_bytes=base,
                                        measured={"cores": cores, "baseline_rss_mib": base / 2**20,
                                                  "baseline_from": baseline,
                                                  "dtensor_param_us": extra.get("dtensor_param_s",
                                                                                CPU_DEFAULT.dtensor_param_s) * 1e6,
                                                  "tp_layer_ms": extra.get("tp_layer_s", CPU_DEFAULT.tp_layer_s) * 1e3},
                                        **extra)
        refresh = True
    if refresh:
        spec = _CACHE[key]
        sp = measure_speeds(threads, procs)
        _CACHE[key] = spec.with_(**sp["fields"], measured={**spec.measured, **sp["measured"]})
    return _CACHE[key]


def get_spec(name: str, **overrides: Any) -> HardwareSpec:
    """The spec for a device type; ``cpu`` is measured (see :func:`measure_cpu`).

    ``overrides`` replace fields (e.g. ``intra_bw=...``); unknown names raise ValueError.
    """
    key = name.lower()
    if key == "cpu":
        spec = measure_cpu(threads=overrides.pop("threads", None), procs=overrides.pop("procs", 1))
    elif key in GPU_SPECS:
        spec = GPU_SPECS[key]
    else:
        raise ValueError(f"unknown gpu type {name!r} (one of {', '.join(GPU_TYPES)})")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return spec.with_(**overrides) if overrides else spec


def cpu_busy(interval_s: float = 1.0) -> float:
    """Fraction of all cores busy over ``interval_s`` (from /proc/stat; 0 where unavailable)."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            vals = [int(x) for x in f.readline().split()[1:]]
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
        return sum(vals), idle

    try:
        t0, i0 = sample()
        time.sleep(interval_s)
        t1, i1 = sample()
    except OSError:
        return 0.0
    return 1.0 - (i1 - i0) / max(1, t1 - t0)


def wait_for_quiet(limit_s: float, busy_below: float = 0.2) -> float:
    """Wait (up to ``limit_s``) until the cores are mostly idle twice in a row; return the last
    busy fraction.  The machine may be shared: other jobs distort step times."""
    deadline = time.time() + limit_s
    quiet, busy = 0, cpu_busy()
    while time.time() < deadline:
        busy = cpu_busy(2.0)
        quiet = quiet + 1 if busy < busy_below else 0
        if quiet >= 2:
            break
    return busy
