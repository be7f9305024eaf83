"""configs/llama-tiny.toml against configs/gpt-tiny.toml for the same training time: val loss per byte.

The two use different tokenizers (BPE vs bytes), so losses are compared per byte of text:
``val_loss * tokens / bytes`` over the validation windows the final eval scores (labels decoded
back to UTF-8).  Procedure: both corpora are prepared first (not timed); GPT trains its
configured steps; Llama runs a short calibration to measure its step time, then trains as
many steps as fit in GPT's training time (the sum of its step times), with its LR schedule
stretched to that count.

    python benchmarks/llama_vs_gpt.py [--out runs/bench-llama] [--calib-steps 20] [--llama-set KEY=VALUE ...]

``--llama-set data.tokenizer=byte`` (any ``section.key=value``) changes the Llama runs only,
e.g. to separate the architecture's share of the gain from the tokenizer's.

Prints one JSON object with both runs' steps, training and wall seconds, val loss per token,
bytes per token and val loss per byte (nats).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench_io import stdout_to_stderr  # noqa: E402 - benchmarks/, next to this script

from paratrain.config import Config  # noqa: E402
from paratrain.data import build_data, cached_corpus  # noqa: E402
from paratrain.training.launch import launch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def bytes_per_token(cfg: Config) -> float:
    """UTF-8 bytes per label token over the validation windows the final eval scores."""
    data = build_data(cfg)
    n = min(len(data.val_dataset), cfg.train.eval_batches * cfg.data.batch_size * cfg.dp)
    tokens = nbytes = 0
    for i in range(n):
        labels = data.val_dataset[i]["labels"].tolist()
        tokens += len(labels)
        nbytes += len(data.tokenizer.decode(labels).encode("utf-8"))
    return nbytes / tokens


def train(config: str, out: Path, name: str, *extra: str) -> dict:
    cfg = Config.load(ROOT / "configs" / config, [f'--run.dir="{out / name}"', "--checkpoint.keep=0", *extra])
    with stdout_to_stderr():
        summary = launch(cfg)
    if summary.get("status") != "ok":
        raise SystemExit(f"{name} failed: {summary}")
    train_s = summary["step_time_ms_median"] * summary["steps"] / 1000.0
    return {"cfg": cfg, "summary": summary, "train_s": train_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench-llama")
    ap.add_argument("--calib-steps", type=int, default=20)
    ap.add_argument("--llama-set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = ap.parse_args()
    out = Path(args.out)
    extra = [f"--{kv}" for kv in args.llama_set]
    for config, over in (("gpt-tiny.toml", []), ("llama-tiny.toml", extra)):
        d = Config.load(ROOT / "configs" / config, over).data
        cached_corpus(d.source, d.tokenizer)
    gpt = train("gpt-tiny.toml", out, "gpt")
    calib = train("llama-tiny.toml", out, "llama-calib", *extra, f"--train.steps={args.calib_steps}",
                  "--train.eval_every=0", "--train.eval_batches=1")
    step_s = calib["summary"]["step_time_ms_median"] / 1000.0
    steps = max(1, round(gpt["train_s"] / step_s))
    llama = train("llama-tiny.toml", out, "llama", *extra, f"--train.steps={steps}")
    rows = {}
    for name, r in (("gpt", gpt), ("llama", llama)):
        s, bpt = r["summary"], bytes_per_token(r["cfg"])
        rows[name] = {"steps": s["steps"], "train_s": round(r["train_s"], 1), "wall_s": round(s["wall_s"], 1),
                      "params": s["params"], "tokenizer": r["cfg"].data.tokenizer,
                      "val_loss_per_token": s["val_loss"], "bytes_per_token": bpt,
                      "val_loss_per_byte": s["val_loss"] / bpt}
    rows["llama_over_gpt_loss_per_byte"] = rows["llama"]["val_loss_per_byte"] / rows["gpt"]["val_loss_per_byte"]
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
