"""Planner accuracy: predicted / measured step time and peak memory per rank, per layout.

Runs what ``paratrain plan --measure`` runs (measure the CPU, calibrate the compute model,
then train each layout for a few steps in a subprocess) and prints one JSON object.
Layouts the trainer cannot run yet are listed as ``not available: <reason>``.

    python benchmarks/planner_accuracy.py [-c CONFIG] [--layouts dp2,zero3,tp2,pp2] [--steps 20]
                                          [--wait-quiet 300]

``--wait-quiet S`` waits up to S seconds before each layout for the cores to be idle (the
machine is shared; other jobs distort step times).
Target: every ratio within 0.7-1.3.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from paratrain.planner.measure import check_layouts  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-c", "--config", default=None, help="paratrain config (default: the built-in one)")
    ap.add_argument("--layouts", default="dp2,zero3,tp2,pp2")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--wait-quiet", type=float, default=0.0, help="seconds to wait for a quiet machine")
    args = ap.parse_args()
    t0 = time.time()
    res = check_layouts(args.config, [x for x in args.layouts.split(",") if x], args.steps, args.wait_quiet)
    res["wall_s"] = time.time() - t0
    res["summary"] = {r["layout"]: ({"step_ratio": round(r["step_ratio"], 3),
                                     "memory_ratio": [round(x, 3) for x in r["memory_ratio"]]}
                                    if r["status"] == "ok" else r["status"]) for r in res["layouts"]}
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
