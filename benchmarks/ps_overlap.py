"""Pushes during backward (``ps.overlap``) against pushes after it, ps-sync, side by side in one run.

One worker trains a 4-layer, 256-wide GPT (about 3.4 M parameters, 13.5 MB of fp32 gradients a
step) against 2 and 4 parameter servers, with ``ps.overlap`` on and off; the configurations
are interleaved over ``--repeats`` and the best run of each counts (other load on a shared
machine only slows runs down).  Reported per server count: samples/s with and without
overlap, their ratio, the median step time, and how long the worker waited for the servers'
replies per step (``ps_wait_ms``: what overlap hides).  Strict JSON on stdout.

    python benchmarks/ps_overlap.py [--steps 40] [--repeats 3] [--servers 2,4] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_io import emit_json, stdout_to_stderr  # noqa: E402 - benchmarks/, next to this script
from ps_straggler import run  # noqa: E402

MODEL = ["--parallel.nproc=1", "--parallel.sync=ps", "--ps.mode=sync", "--model.n_layer=4", "--model.d_model=256",
         "--model.n_head=4", "--model.d_ff=1024", "--train.log_every=1", "--train.grad_clip=0"]


def wait_ms(root: Path, name: str) -> float:
    """Median per-step wait for the servers' replies (after warm-up)."""
    rows = [json.loads(ln) for ln in (root / name / "metrics.jsonl").read_text().splitlines()]
    waits = [r["ps_wait_ms"] for r in rows if "ps_wait_ms" in r][5:]
    return statistics.median(waits) if waits else 0.0


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--servers", default="2,4")
    p.add_argument("--json-out", default="")
    a = p.parse_args()
    servers = [int(s) for s in a.servers.split(",")]
    best: dict[tuple[int, bool], dict] = {}
    load = [os.getloadavg()[0]]
    with stdout_to_stderr(), tempfile.TemporaryDirectory(prefix="ps-overlap-") as tmp:
        root = Path(tmp)
        for rep in range(a.repeats):
            for n in servers:
                for overlap in (True, False):
                    name = f"s{n}-{'on' if overlap else 'off'}-{rep}"
                    r = run(root, name, a.steps, *MODEL, f"--ps.servers={n}", f"--ps.overlap={str(overlap).lower()}")
                    r["wait_ms"] = wait_ms(root, name)
                    if (n, overlap) not in best or r["samples_per_s"] > best[(n, overlap)]["samples_per_s"]:
                        best[(n, overlap)] = r
    load.append(os.getloadavg()[0])
    results = []
    for n in servers:
        on, off = best[(n, True)], best[(n, False)]
        results.append({"servers": n, "overlap_samples_per_s": on["samples_per_s"],
                        "no_overlap_samples_per_s": off["samples_per_s"],
                        "overlap_over_no_overlap": on["samples_per_s"] / off["samples_per_s"],
                        "overlap_step_ms": on["step_time_ms_median"], "no_overlap_step_ms": off["step_time_ms_median"],
                        "overlap_wait_ms": on["wait_ms"], "no_overlap_wait_ms": off["wait_ms"]})
    emit_json({"steps": a.steps, "repeats": a.repeats, "load_avg_start_end": load, "results": results}, a.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
