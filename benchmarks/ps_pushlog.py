"""Worker push-log memory over a long parameter-server run: flat, whatever the run length.

Workers keep every push since the servers' second-newest checkpoint for replay after a
server restart; the log lives on disk (``RUN/ps/pushlog/worker{rank}``) and memory holds only
the pushes not yet written.  One sync job (2 workers, 1 server, checkpoints every
``--every`` steps) runs ``--steps`` steps; rank 0's metrics.jsonl gives, every logged step,
the log's bytes in memory (the most since the previous log line), its bytes on disk (what an
in-memory log would hold) and the worker's peak RSS so far.  Strict JSON on stdout.

    python benchmarks/ps_pushlog.py [--steps 1000] [--every 100] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_io import emit_json  # noqa: E402 - benchmarks/, next to this script

from paratrain.config import Config  # noqa: E402
from paratrain.training.launch import launch  # noqa: E402

MODEL = ["--model.n_layer=2", "--model.d_model=64", "--model.n_head=4", "--model.d_ff=256",
         "--model.max_seq_len=64", "--data.seq_len=64", "--data.batch_size=8", "--train.threads=1",
         "--train.eval_every=0", "--train.eval_batches=1", "--parallel.nproc=2", "--ps.heartbeat_s=0.2",
         "--parallel.sync=ps", "--ps.mode=sync", "--checkpoint.keep=2"]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--every", type=int, default=100, help="checkpoint.every")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--json-out", default="")
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="ps-pushlog-") as tmp:
        run_dir = Path(tmp) / "run"
        cfg = Config.load(None, [*MODEL, f"--train.steps={a.steps}", f"--checkpoint.every={a.every}",
                                 f"--train.log_every={a.log_every}", f'--run.dir="{run_dir}"'])
        summary = launch(cfg)
        if summary.get("status") != "ok":
            raise SystemExit(f"run failed: {summary}")
        rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "ps_log_mem_bytes" in r]
    comm = summary["comm_bytes_per_step"]
    mid = [r for r in rows if r["step"] >= a.steps // 10]  # past start-up and the first checkpoint
    out = {
        "steps": a.steps,
        "checkpoint_every": a.every,
        "push_bytes_per_step": comm,
        "log_mem_bytes_max": max(r["ps_log_mem_bytes"] for r in rows),
        "log_disk_bytes_max": max(r["ps_log_disk_bytes"] for r in rows),
        "in_memory_log_would_hold_max_mb": max(r["ps_log_disk_bytes"] for r in rows) / 2**20,
        "peak_rss_mb_at_10pct": mid[0]["rss_mb"],
        "peak_rss_mb_at_end": rows[-1]["rss_mb"],
        "peak_rss_mb_growth_after_10pct": rows[-1]["rss_mb"] - mid[0]["rss_mb"],
        "series": [{"step": r["step"], "log_mem_bytes": r["ps_log_mem_bytes"], "log_disk_bytes": r["ps_log_disk_bytes"],
                    "peak_rss_mb": round(r["rss_mb"], 1)} for r in rows[:: max(1, len(rows) // 20)]],
    }
    emit_json(out, a.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
