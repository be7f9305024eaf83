"""The planner's parameter-server cost model against measured round trips.

One worker (this process) pushes a gradient of each size to 1 and 2 server processes (sync
mode, SGD, lr 0: the server decodes, applies, replies with the parameters, and the worker
installs them) and waits, over and over.  Each point is measured two ways: wall time per
round trip (mean of the fastest 20% of calls) and CPU time on the critical path (this
process's CPU time, all threads, + the busiest server's, per call: what a round trip takes
on a host whose cores are free -- on a shared machine the stable figure).  Points run in
``--rounds`` interleaved rounds and the least loaded round counts.

For each of the two, the per-message and per-byte costs of
:func:`paratrain.planner.cost.ps_exchange_time` are fitted on the 1-server points (the
per-message cost on the smallest size, the per-byte cost by least squares of the relative
error on the others) and the 2-server points are predicted by the same function (loopback:
no separate wire term, the kernel's copy is part of the per-byte cost).  Target: every
2-server ratio measured / predicted within 0.75-1.25.  ``ratio_to_default``: measured / the
planner's built-in constants.  Strict JSON.

    python benchmarks/ps_cost.py [--sizes 4096,262144,1048576,4194304,16777216] [--servers 1,2]
                                 [--rounds 3] [--seconds 1]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_io import emit_json, stat_cpu_s  # noqa: E402 - benchmarks/, next to this script

from paratrain.config import Config  # noqa: E402
from paratrain.planner.cost import PS_BYTE_S, PS_MSG_S, ps_exchange_time  # noqa: E402
from paratrain.ps.client import PSClient  # noqa: E402
from paratrain.ps.launch import local_servers  # noqa: E402
from paratrain.ps.placement import ParamInfo, place  # noqa: E402
from paratrain.ps.strategy import ENDPOINTS_ENV, SECRET_ENV  # noqa: E402
from paratrain.ps.wire import PushEncoder  # noqa: E402
from paratrain.ps.worker import PSWorker  # noqa: E402

INF_BW = float("inf")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux /proc)."""
    return stat_cpu_s(f"/proc/{pid}/stat")[1]


def round_trip(n_servers: int, nbytes: int, seconds: float, root: Path) -> tuple[float, float]:
    """(wall, CPU) seconds per push + pull round trip of an ``nbytes`` fp32 gradient.

    Wall: the mean of the fastest 20% of calls.  CPU: this process's CPU time (all threads)
    plus the busiest server's, per call -- the critical path of a round trip on a host
    whose cores are free (the worker and a server take turns; servers work in parallel)."""
    run_dir = root / f"s{n_servers}-{nbytes}-{time.monotonic_ns()}"
    cfg = Config.load(None, [f'--run.dir="{run_dir}"', f"--ps.servers={n_servers}", "--ps.mode=sync",
                             "--parallel.sync=ps", "--parallel.nproc=1", "--train.optimizer=sgd",
                             "--train.momentum=0.0", "--train.weight_decay=0.0", "--train.grad_clip=0.0",
                             "--ps.max_message_mb=256", "--ps.heartbeat_s=5"])
    run_dir.mkdir(parents=True)
    (run_dir / "config.toml").write_text(cfg.to_toml())
    rows = max(2, nbytes // 4 // 256)
    param = torch.nn.Parameter(torch.randn(rows, max(1, nbytes // 4 // rows)))
    grad = torch.randn_like(param) * 1e-3
    with local_servers(cfg, n_workers=1) as group:
        client = PSClient(os.environ[ENDPOINTS_ENV].split(","), os.environ[SECRET_ENV].encode(), 0,
                          max_bytes=256 << 20, heartbeat_s=5.0)
        try:
            w = PSWorker(client, place([ParamInfo("w", tuple(param.shape))], n_servers), [param],
                         PushEncoder(cfg.compression), "sync", False, False)
            w.connect(0)
            param.grad = grad
            w.step(0.0, 1.0)  # warm-up
            pids = [p.pid for p in group.procs if p is not None]
            cpu0, srv0 = time.process_time(), [cpu_s(pid) for pid in pids]
            times = []
            t_end = time.perf_counter() + seconds
            while len(times) < 5 or time.perf_counter() < t_end:
                param.grad = grad
                t0 = time.perf_counter()
                w.step(0.0, 1.0)
                times.append(time.perf_counter() - t0)
            cpu = time.process_time() - cpu0 + max(cpu_s(pid) - s0 for pid, s0 in zip(pids, srv0, strict=True))
        finally:
            client.close()
    times.sort()
    fast = times[:max(1, len(times) // 5)]
    return sum(fast) / len(fast), cpu / len(times)


def fit_and_check(best: dict[tuple[int, int], float], sizes: list[int]) -> dict:
    """Fit on 1 server (per-message cost: the smallest size; per-byte cost: least squares of
    the relative error over the others); check the prediction of every 2-server point."""
    lo = min(sizes)
    msg_s = best[(1, lo)]  # 4 KB: the byte term is about 2% of it
    pts = [(2 * n, best[(1, n)]) for n in sizes if n != lo]  # push = pull = n bytes
    byte_s = sum(x * (t - msg_s) / t**2 for x, t in pts) / sum(x * x / t**2 for x, t in pts)
    rows = []
    for (s, n), t in sorted(best.items()):
        pred = ps_exchange_time(n, n, 1, s, INF_BW, 0.0, msg_s=msg_s, byte_s=byte_s)
        default = ps_exchange_time(n, n, 1, s, INF_BW, 0.0)
        rows.append({"servers": s, "bytes": n, "measured_ms": t * 1000, "predicted_ms": pred * 1000,
                     "ratio": t / pred, "fit_point": s == 1, "ratio_to_default": t / default})
    checked = [r["ratio"] for r in rows if not r["fit_point"]]
    return {"fitted": {"msg_s": msg_s, "byte_s": byte_s, "gb_s": 1 / byte_s / 1e9 if byte_s > 0 else None},
            "within_25pct": all(0.75 <= r <= 1.25 for r in checked),
            "worst_ratio": max(checked, key=lambda r: abs(r - 1)) if checked else None,
            "worst_ratio_to_default": max((r["ratio_to_default"] for r in rows), key=lambda r: abs(r - 1)),
            "points": rows}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="4096,262144,1048576,4194304,16777216")
    p.add_argument("--servers", default="1,2")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=1.0)
    p.add_argument("--json-out", default="")
    a = p.parse_args()
    torch.set_num_threads(1)
    sizes = [int(s) for s in a.sizes.split(",")]
    servers = [int(s) for s in a.servers.split(",")]
    if len(set(sizes)) < 2 or 1 not in servers:  # (the fit: two sizes on one server at least)
        p.error("the cost fit needs at least two --sizes and 1 in --servers")
    wall: dict[tuple[int, int], float] = {}
    cpu: dict[tuple[int, int], float] = {}
    with tempfile.TemporaryDirectory(prefix="ps-cost-") as tmp:
        for _ in range(a.rounds):  # interleaved: load drifts hit every point; the least loaded round counts
            for n in sizes:
                for s in servers:
                    tw, tc = round_trip(s, n, a.seconds, Path(tmp))
                    wall[(s, n)], cpu[(s, n)] = min(wall.get((s, n), tw), tw), min(cpu.get((s, n), tc), tc)
    out = {"rounds": a.rounds, "load_avg": os.getloadavg()[0],
           "planner_defaults": {"msg_s": PS_MSG_S, "byte_s": PS_BYTE_S, "gb_s": 1 / PS_BYTE_S / 1e9}}
    for name, best in (("cpu", cpu), ("wall", wall)):
        out[name] = fit_and_check(best, sizes)
    emit_json(out, a.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
