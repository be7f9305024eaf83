"""The planner's parameter-server cost model against measured round trips.

One worker (this process) pushes a gradient of each size to 1 and 2 server processes (sync
mode, SGD, lr 0: the server decodes, applies, replies with the parameters, and the worker
installs them) and waits, over and over; the fastest of ``--rounds`` interleaved rounds
counts (other load only slows runs down).  The per-message cost and the per-byte cost of
:func:`paratrain.planner.cost.ps_exchange_time` are fitted on two points (1 server, the
smallest and the largest size); every other point is then predicted by the same function
(loopback: no separate wire term, the copy is part of the per-byte cost) and compared.
Target: every ratio measured / predicted within 0.75-1.25.  Strict JSON on stdout.

    python benchmarks/ps_cost.py [--sizes 4096,262144,1048576,4194304,16777216] [--servers 1,2]
                                 [--rounds 3] [--seconds 1]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from paratrain.config import Config  # noqa: E402
from paratrain.planner.cost import PS_BYTE_S, PS_MSG_S, ps_exchange_time  # noqa: E402
from paratrain.ps.client import PSClient  # noqa: E402
from paratrain.ps.launch import local_servers  # noqa: E402
from paratrain.ps.placement import ParamInfo, place  # noqa: E402
from paratrain.ps.strategy import ENDPOINTS_ENV, SECRET_ENV  # noqa: E402
from paratrain.ps.wire import PushEncoder  # noqa: E402
from paratrain.ps.worker import PSWorker  # noqa: E402

INF_BW = float("inf")


def round_trip_s(n_servers: int, nbytes: int, seconds: float, root: Path) -> float:
    """Seconds per push + pull round trip of an ``nbytes`` fp32 gradient (fastest 20% mean)."""
    run_dir = root / f"s{n_servers}-{nbytes}-{time.monotonic_ns()}"
    cfg = Config.load(None, [f'--run.dir="{run_dir}"', f"--ps.servers={n_servers}", "--ps.mode=sync",
                             "--parallel.sync=ps", "--parallel.nproc=1", "--train.optimizer=sgd",
                             "--train.momentum=0.0", "--train.weight_decay=0.0", "--train.grad_clip=0.0",
                             "--ps.max_message_mb=256"])
    run_dir.mkdir(parents=True)
    (run_dir / "config.toml").write_text(cfg.to_toml())
    rows = max(2, nbytes // 4 // 256)
    param = torch.nn.Parameter(torch.randn(rows, max(1, nbytes // 4 // rows)))
    grad = torch.randn_like(param) * 1e-3
    with local_servers(cfg, n_workers=1):
        client = PSClient(os.environ[ENDPOINTS_ENV].split(","), os.environ[SECRET_ENV].encode(), 0,
                          max_bytes=256 << 20)
        try:
            w = PSWorker(client, place([ParamInfo("w", tuple(param.shape))], n_servers), [param],
                         PushEncoder(cfg.compression), "sync", False, False)
            w.connect(0)
            times = []
            t_end = time.perf_counter() + seconds
            while len(times) < 5 or time.perf_counter() < t_end:
                param.grad = grad
                t0 = time.perf_counter()
                w.step(0.0, 1.0)
                times.append(time.perf_counter() - t0)
        finally:
            client.close()
    times = sorted(times[1:])
    fast = times[:max(1, len(times) // 5)]
    return sum(fast) / len(fast)


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
    best: dict[tuple[int, int], float] = {}
    with tempfile.TemporaryDirectory(prefix="ps-cost-") as tmp:
        for _ in range(a.rounds):  # interleaved: load drifts hit every point
            for n in sizes:
                for s in servers:
                    t = round_trip_s(s, n, a.seconds, Path(tmp))
                    best[(s, n)] = min(best.get((s, n), t), t)
    # fit on 1 server: t = msg + byte * (push + pull); push = pull = n
    lo, hi = min(sizes), max(sizes)
    byte_s = (best[(1, hi)] - best[(1, lo)]) / (2 * (hi - lo))
    msg_s = best[(1, lo)] - byte_s * 2 * lo
    rows = []
    for (s, n), t in sorted(best.items()):
        pred = ps_exchange_time(n, n, 1, s, INF_BW, 0.0, msg_s=msg_s, byte_s=byte_s)
        default = ps_exchange_time(n, n, 1, s, INF_BW, 0.0)
        rows.append({"servers": s, "bytes": n, "measured_ms": t * 1000, "predicted_ms": pred * 1000,
                     "ratio": t / pred, "fit_point": s == 1 and n in (lo, hi),
                     "planner_default_ms": default * 1000, "ratio_to_default": t / default})
    checked = [r["ratio"] for r in rows if not r["fit_point"]]
    out = {"fitted": {"msg_s": msg_s, "byte_s": byte_s, "gb_s": 1 / byte_s / 1e9},
           "planner_defaults": {"msg_s": PS_MSG_S, "byte_s": PS_BYTE_S, "gb_s": 1 / PS_BYTE_S / 1e9},
           "rounds": a.rounds, "within_25pct": all(0.75 <= r <= 1.25 for r in checked),
           "worst_ratio": max(checked, key=lambda r: abs(r - 1)) if checked else None, "points": rows}
    text = json.dumps(out, indent=1, allow_nan=False)
    if a.json_out:
        Path(a.json_out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
