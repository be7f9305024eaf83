"""Step time of tensor and pipeline parallel against DDP, and the pipeline bubble against theory.

    python benchmarks/model_parallel.py [--steps 12] [--microbatches 4 8]

Two ranks, one GPT (8 layers, d_model 256, seq 128, untied head), the same global batch of
8 sequences for every layout: DDP (4 per rank), tp = 2, and pp = 2 with each schedule
(gpipe, 1f1b, interleaved with 2 virtual stages) at each microbatch count.  For the
pipelines, ``bubble_measured`` is the idle time inside ``schedule.step`` over the time spent
computing (forward, backward, loss), averaged over ranks and steps, next to the theory
(pp - 1) / (m * v).  Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from paratrain.config import Config  # noqa: E402
from paratrain.training.launch import launch  # noqa: E402

MODEL = ["--model.n_layer=8", "--model.d_model=256", "--model.n_head=8", "--model.d_ff=1024",
         "--model.max_seq_len=128", "--model.tie_embeddings=false", "--data.seq_len=128"]


def run(tmp: str, name: str, steps: int, extra: list[str]) -> dict:
    cfg = Config.load(None, [*MODEL, "--parallel.nproc=2", "--train.threads=1", f"--train.steps={steps}",
                             "--train.warmup_steps=1", "--train.eval_every=0", "--train.eval_batches=1",
                             "--train.log_every=1", "--checkpoint.keep=0", f'--run.dir="{tmp}/{name}"', *extra])
    s = launch(cfg)
    assert s["status"] == "ok", s
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--microbatches", type=int, nargs="+", default=[4, 8])
    args = ap.parse_args()
    stdout = os.dup(1)
    os.dup2(2, 1)  # progress lines to stderr, JSON to stdout
    rows = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            ddp = run(tmp, "ddp", args.steps, ["--data.batch_size=4"])
            base = ddp["step_time_ms_median"]
            rows["ddp"] = {"step_time_ms": base, "tokens_per_s": ddp["tokens_per_s"]}
            tp = run(tmp, "tp2", args.steps, ["--data.batch_size=8", "--parallel.tp=2"])
            rows["tp2"] = {"step_time_ms": tp["step_time_ms_median"], "tokens_per_s": tp["tokens_per_s"],
                           "step_time_vs_ddp": tp["step_time_ms_median"] / base}
            for m in args.microbatches:
                for sched in ("gpipe", "1f1b", "interleaved"):
                    s = run(tmp, f"pp2-{sched}-m{m}", args.steps,
                            ["--data.batch_size=8", "--parallel.pp=2", f"--parallel.pp_schedule={sched}",
                             f"--parallel.microbatches={m}"])
                    pipe = s["pipeline"]
                    rows[f"{s['strategy']}-m{m}"] = {
                        "step_time_ms": s["step_time_ms_median"], "tokens_per_s": s["tokens_per_s"],
                        "step_time_vs_ddp": s["step_time_ms_median"] / base,
                        "bubble_measured": pipe["bubble_measured"], "bubble_theory": pipe["bubble_theory"],
                        "measured_over_theory": pipe["bubble_measured"] / pipe["bubble_theory"]}
    finally:
        sys.stdout.flush()
        os.dup2(stdout, 1)
    print(json.dumps({"ranks": 2, "global_batch": 8, "steps": args.steps, "model": MODEL, "runs": rows}, indent=1))


if __name__ == "__main__":
    main()
