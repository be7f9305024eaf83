"""``paratrain bench comm`` on 2 and 4 local processes: 64 MB all_reduce bus bandwidth vs memory copy.

Each run measures the memory-copy bandwidth of one process (64 MB ``copy_``, one thread)
in the same job as the collectives (before each op and at the end; the best sample counts),
so the ratio is taken side by side.

    python benchmarks/comm.py [--nprocs 2,4] [--sizes 4K:256M] [--out-dir runs/bench]

Prints one JSON object: per process count, the 64 MB all_reduce busbw, the memory-copy
bandwidth, their ratio, and the full result table (also written to OUT_DIR/comm_nN.json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from paratrain.bench import launch_local, parse_sizes, table  # noqa: E402
from paratrain.bench.comm import OPS  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nprocs", default="2,4")
    ap.add_argument("--sizes", default="4K:256M")
    ap.add_argument("--ops", default=",".join(OPS))
    ap.add_argument("--target-s", type=float, default=0.25)
    ap.add_argument("--out-dir", default="runs/bench")
    a = ap.parse_args()
    opts = {"ops": a.ops.split(","), "sizes": parse_sizes(a.sizes, 4), "backend": "auto", "target_s": a.target_s,
            "max_iters": 200}
    out: dict = {}
    for n in (int(x) for x in a.nprocs.split(",")):
        result = launch_local(opts, n)
        Path(a.out_dir).mkdir(parents=True, exist_ok=True)
        (Path(a.out_dir) / f"comm_n{n}.json").write_text(json.dumps(result, indent=1))
        print(table(result), file=sys.stderr)
        out[f"n{n}"] = {**result["headline"], "backend": result["backend"], "device": result["device"],
                        "results": result["results"]}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
