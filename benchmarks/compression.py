"""Gradient compression benchmark: every codec on the all-reduce and parameter-server paths.

Trains the default GPT for a fixed number of steps with 2 workers, once uncompressed (fp32)
and once per codec (plus top-k without error feedback, with ``--warmup-steps N`` top-k
with a warm-up of N steps, PowerSGD with int8 vectors and then also with each rank's own
factors and 2 power iterations, and with ``--onebit`` AdamW replaced by 1-bit Adam), on each
path, side by side in one run.  Prints JSON: per run the bytes per step, final val loss
and median step time, and each relative to the fp32 run of the same path.

Bytes per step come from metrics.jsonl (every step is logged): ``bytes_per_step`` is the
mean over *all* steps of the run, warm-up included, and ``bytes_per_step_steady`` the mean
after the compression warm-up; summary.json's ``comm_bytes_per_step`` skips the first 3
steps (a timing warm-up), which would hide the densest steps of a compression warm-up.

    python benchmarks/compression.py [--steps 100] [--paths allreduce,ps] [--codecs fp16,int8,...]
                                     [--warmup-steps 18] [--set=--train.optimizer=sgd ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CODECS = ["fp16", "bf16", "int8", "topk", "powersgd"]
PATHS = {"allreduce": ["--parallel.sync=allreduce"], "ps": ["--parallel.sync=ps", "--ps.mode=async"]}
RUNNER = "import sys; from paratrain.cli import main; sys.exit(main())"


def step_bytes(run_dir: Path) -> list[int]:
    """Bytes this rank sent at each step, from metrics.jsonl (the benchmark logs every step)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["comm_bytes"] for r in rows if "comm_bytes" in r]


def run_one(run_dir: Path, overrides: list[str], timeout_s: float) -> dict:
    """One ``paratrain train`` in a subprocess; returns its summary.json (or an error record)."""
    cmd = [sys.executable, "-c", RUNNER, "train", f"--run.dir={run_dir}", *overrides]
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"status": "error", "error": f"timed out after {timeout_s:.0f} s"}
    summary_path = run_dir / "summary.json"
    if proc.returncode != 0 or not summary_path.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"status": "error", "error": " | ".join(tail), "wall_s": time.time() - t0}
    return json.loads(summary_path.read_text())


def codec_cost(codecs: list[str], topk_ratio: float, repeats: int = 5) -> dict:
    """Milliseconds to encode (with error feedback) + decode every gradient of the default GPT, 1 thread."""
    import torch

    from paratrain.config import Config
    from paratrain.data.tokenizer import ByteTokenizer
    from paratrain.grad_compression import get_codec
    from paratrain.models import build_model

    torch.set_num_threads(1)
    cfg = Config.default()
    model = build_model(cfg.model, ByteTokenizer.vocab_size, 0)
    grads = [torch.randn_like(p) for p in model.parameters()]
    out = {}
    for name in codecs:
        codec = get_codec(name, ratio=topk_ratio, rank=cfg.compression.powersgd_rank)
        states = [codec.new_state(True) for _ in grads]
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for g, st in zip(grads, states, strict=True):
                codec.decode(codec.encode(g, st))
            times.append((time.perf_counter() - t0) * 1000)
        out[name] = round(sorted(times)[len(times) // 2], 2)
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 4) if a is not None and b else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--paths", default="allreduce,ps")
    ap.add_argument("--codecs", default=",".join(CODECS))
    ap.add_argument("--topk-ratio", type=float, default=0.01)
    ap.add_argument("--warmup-steps", type=int, default=0,
                    help="also run top-k (error feedback on) with compression.warmup_steps = N")
    ap.add_argument("--onebit", action="store_true",
                    help="also run train.optimizer = onebit_adam (1-bit Adam; all-reduce path only)")
    ap.add_argument("--eval-batches", type=int, default=16)
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    ap.add_argument("--set", action="append", default=[], metavar="--SECTION.KEY=VALUE",
                    help="extra override for every run, e.g. --set=--train.optimizer=sgd (repeatable)")
    ap.add_argument("--out", default="", help="also write the JSON here")
    args = ap.parse_args()
    common = [f"--train.steps={args.steps}", "--parallel.nproc=2", "--train.eval_every=0", "--train.log_every=1",
              f"--train.eval_batches={args.eval_batches}", "--checkpoint.keep=0",
              f"--compression.topk_ratio={args.topk_ratio}", *args.set]
    variants = [("fp32", ["--compression.gradient=none"], 0)]
    for c in filter(None, args.codecs.split(",")):
        variants.append((c, [f"--compression.gradient={c}"], 0))
        if c == "powersgd":  # the PowerSGD options (docs/compression.md), each added to the last
            int8v = ["--compression.gradient=powersgd", "--compression.powersgd_vectors=int8"]
            variants.append(("powersgd-int8v", int8v, 0))
            variants.append(("powersgd-perrank", [*int8v, "--compression.powersgd_exchange=allgather",
                                                  "--compression.powersgd_iterations=2"], 0))
        if c == "topk":
            variants.append(("topk-no-ef", ["--compression.gradient=topk", "--compression.error_feedback=false"], 0))
            if args.warmup_steps:
                variants.append((f"topk-warmup{args.warmup_steps}", [
                    "--compression.gradient=topk", f"--compression.warmup_steps={args.warmup_steps}"],
                    args.warmup_steps))
    if args.onebit:
        variants.append(("onebit_adam", ["--compression.gradient=none", "--train.optimizer=onebit_adam"], 0))
    results: dict = {"steps": args.steps, "workers": 2, "model": "default gpt", "topk_ratio": args.topk_ratio,
                     "overrides": args.set, "paths": {}}
    results["codec_ms_per_step"] = codec_cost(["none", *filter(None, args.codecs.split(","))], args.topk_ratio)
    with tempfile.TemporaryDirectory(prefix="bench-compression-") as tmp:
        for path in args.paths.split(","):
            rows: dict = {}
            for name, extra, warm in variants:
                if name == "onebit_adam" and path != "allreduce":
                    continue
                run_dir = Path(tmp) / f"{path}-{name}"
                s = run_one(run_dir, [*common, *PATHS[path], *extra], args.timeout)
                per_step = step_bytes(run_dir)
                steady = per_step[warm:]
                rows[name] = {
                    "status": s.get("status"), "error": s.get("error"),
                    "bytes_per_step": round(sum(per_step) / len(per_step)) if per_step else None,
                    "bytes_per_step_steady": round(sum(steady) / len(steady)) if steady else None,
                    # robust to one-off steps: on the PS, the worker that wins the race to initialize
                    # the servers counts the whole model's upload in its step 1
                    "bytes_per_step_median": round(statistics.median(steady)) if steady else None,
                    "warmup_steps": warm, "val_loss": s.get("val_loss"),
                    "step_ms": s.get("step_time_ms_median"), "fallbacks": s.get("compression_fallbacks"),
                    "wall_s": round(s.get("wall_s") or 0.0, 1),
                }
                print(f"{path:9s} {name:11s} {json.dumps(rows[name])}", file=sys.stderr, flush=True)
            base = rows["fp32"]
            for r in rows.values():
                r["bytes_vs_fp32"] = ratio(r["bytes_per_step"], base["bytes_per_step"])
                r["steady_bytes_vs_fp32"] = ratio(r["bytes_per_step_steady"], base["bytes_per_step"])
                r["median_bytes_vs_fp32"] = ratio(r["bytes_per_step_median"], base["bytes_per_step_median"])
                r["val_loss_vs_fp32"] = ratio(r["val_loss"], base["val_loss"])
                r["step_time_vs_fp32"] = ratio(r["step_ms"], base["step_ms"])
            results["paths"][path] = rows
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
