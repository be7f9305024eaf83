"""Model compression on the default GPT and on seq2seq-reverse: size, CPU latency, quality.

Trains both models (or reuses run dirs given with --gpt-run / --s2s-run), then builds every
variant from the same checkpoint and measures them side by side in one process: stages
exported to safetensors, evaluated on the run's validation data, and timed round-robin on
one thread (median of --repeats forward passes at batch 1 and 16).

    python benchmarks/model_compression.py [--out DIR] [--repeats 30] [--finetune-steps 100]

Variants: int8 (dynamic; x86 and onednn kernels), int8-static, weight-only int8 / int4,
50% structured FFN pruning + fine-tune (alone and with int8), 50% global magnitude pruning +
fine-tune (alone and with int8: sizes), a distilled half-depth student (+ int8), and a check
that distillation in the trainer gives the same losses on 2 DDP ranks as on one process.
Prints one JSON object with the stage tables and the checks of
issue 6: int8 >= 3x smaller and >= 1.7x faster at batch 16 with val loss +<= 2% (accuracy
-<= 1 point); FFN-50% + fine-tune >= 1.4x faster with val loss +<= 3%.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench_io import stdout_to_stderr  # noqa: E402 - benchmarks/, next to this script

import paratrain.model_compression.distill as D  # noqa: E402
import paratrain.model_compression.pruning as P  # noqa: E402
import paratrain.model_compression.quantization as Q  # noqa: E402
import paratrain.model_compression.report as R  # noqa: E402
from paratrain import checkpoint as ckpt  # noqa: E402
from paratrain.config import Config  # noqa: E402
from paratrain.data import build_data, val_batches  # noqa: E402
from paratrain.model_compression.recipe import (  # noqa: E402
    CompressOptions,
    fastest_engine,
    load_checkpoint,
    measure_stages,
)
from paratrain.training.launch import launch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def train_if_needed(name: str, run_dir: Path, config: Path | None, overrides: list[str]) -> Path:
    """Train the model (the repo's config, written to run_dir) unless a checkpoint is already there."""
    if ckpt.latest(run_dir / "checkpoints") is not None:
        return run_dir
    cfg = Config.load(config, [f'--run.dir="{run_dir}"', "--checkpoint.keep=1", *overrides])
    t0 = time.time()
    with stdout_to_stderr():
        summary = launch(cfg)
    if summary.get("status") != "ok":
        raise SystemExit(f"training {name} failed: {summary}")
    print(f"trained {name} in {time.time() - t0:.0f}s: val loss {summary['val_loss']:.4f}", file=sys.stderr)
    return run_dir


def variants(run: Path, out: Path, args: argparse.Namespace) -> dict:
    """Every compressed variant of one checkpoint, measured side by side."""
    cfg, original, step_dir = load_checkpoint(run)
    data = build_data(cfg)
    bs = cfg.data.batch_size
    val = val_batches(data, bs, max_batches=args.eval_batches)
    lr = cfg.train.lr / 3
    calib = val_batches(data, bs)[args.eval_batches:args.eval_batches + 8] or val[:4]
    stages = [("original", original, {})]

    def log(msg: str) -> None:
        print(f"[{run.name}] {msg}", file=sys.stderr, flush=True)

    # the engine paratrain compress --quantize int8 would pick here (timed, not assumed); the
    # other engine is kept as a comparison row
    engine, engine_ms = fastest_engine(original, R.latency_inputs(val[0], 16), threads=1)
    log(f"int8 engine: {engine} ({engine_ms})")

    def int8(model, name=engine, fuse=True):
        return Q.quantize_embeddings_int8(Q.quantize_dynamic_int8(model, engine_name=name, fuse=fuse))

    stages.append(("int8", int8(original), {"engine": engine}))
    for other in sorted(set(engine_ms) - {engine}):
        stages.append((f"int8-{other}", int8(original, other), {"engine": other}))
    # what the q/k/v fusion int8 applies is worth by itself: int8 without it, fp32 with it
    stages.append(("int8-unfused", int8(original, fuse=False), {"engine": engine}))
    stages.append(("fp32-fused-qkv", Q.fuse_qkv(copy.deepcopy(original)), {}))
    stages.append(("int8-static", Q.quantize_static_int8(original, calib), {}))
    stages.append(("int8-weight", Q.quantize_embeddings_int8(Q.quantize_weight_only(original, 8)), {}))
    stages.append(("int4-weight", Q.quantize_embeddings_int8(Q.quantize_weight_only(original, 4)), {}))

    # control: the same fine-tune without pruning (a short training run improves an undertrained
    # model by itself, so pruned + fine-tuned variants are also compared against this)
    log("dense fine-tune (control)")
    dense = copy.deepcopy(original)
    with stdout_to_stderr():
        D.finetune(cfg, dense, None, args.finetune_steps, out / "ft-dense", lr, bs)
    stages.append(("dense-ft", dense, {}))

    log("50% FFN neurons (structured) + fine-tune")
    ffn = copy.deepcopy(original)
    P.prune_structured(ffn, 0.5, "ffn")
    with stdout_to_stderr():
        D.finetune(cfg, ffn, None, args.finetune_steps, out / "ft-ffn50", lr, bs)
    stages.append(("ffn50-ft", ffn, {}))
    stages.append(("ffn50-ft-int8", int8(ffn), {}))

    log("50% global magnitude (cubic schedule) + fine-tune")
    mag = copy.deepcopy(original)
    pruner = P.MagnitudePruner(mag, 0.5, end_step=int(0.75 * args.finetune_steps))
    with stdout_to_stderr():
        D.finetune(cfg, mag, pruner.wrap_loss(), args.finetune_steps, out / "ft-mag50", lr, bs)
    pruner.update(10**9)
    stages.append(("mag50-ft", mag, {"sparsity": P.weight_sparsity(mag)}))
    stages.append(("mag50-ft-int8", int8(mag), {}))

    n_layer = cfg.model.n_layer
    log(f"distilling a {max(1, n_layer // 2)}-layer student")
    student = D.make_student(original, max(1, n_layer // 2))
    with stdout_to_stderr():
        D.finetune(cfg, student, D.DistillLoss(copy.deepcopy(original), 2.0, 0.5), args.distill_steps,
                   out / "distill", lr, bs)
    stages.append(("distilled", student, {}))
    stages.append(("distilled-int8", int8(student), {}))

    opts = CompressOptions(repeats=args.repeats, threads=1)
    log("measuring")
    steps = [f"fine-tune / distill: {args.finetune_steps} / {args.distill_steps} steps at lr {lr:g}"]
    report = measure_stages(cfg, data, val, stages, steps, out, opts, step_dir, log)
    torch.set_num_threads(1)
    report["int8_engine_ms_b16"] = engine_ms
    report["time_in_linears"] = linear_share({"original": stages[0][1], "int8": stages[1][1]},
                                             R.latency_inputs(val[0], 16))
    if hasattr(original, "layers"):  # decoder-only GPT / encoder-only BERT
        report["time_in_linears"].update(ffn_share(original, R.latency_inputs(val[0], 16)))
    R.write_report(out, report)
    return report


class _NoFFN(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


def ffn_share(model: nn.Module, inputs: dict, repeats: int = 20) -> dict:
    """The share of the fp32 forward spent in the feed-forward networks (the model timed with and
    without them, interleaved), and the speedup that halving them could give at most (Amdahl)."""
    bare = copy.deepcopy(model)
    for layer in getattr(bare, "layers", {}).values():
        layer.ffn = _NoFFN()
    lat = R.measure_latency({"full": model, "bare": bare}, inputs, repeats, threads=1)
    f = max(0.0, 1 - lat["bare"] / lat["full"])
    return {"fp32_ffn_share": round(f, 3), "ffn50_amdahl_bound_speedup": round(1 / (1 - f / 2), 2)}


@torch.inference_mode()
def linear_share(models: dict, inputs: dict, runs: int = 3) -> dict:
    """Where the time goes (torch profiler, one thread): the share of each model's forward spent
    in its Linear layers, and how much faster the int8 Linears are than the fp32 ones. With
    Amdahl's law this bounds the whole-model speedup that quantizing Linears alone can give."""
    from torch.profiler import ProfilerActivity, profile

    out = {}
    for name, m in models.items():
        m(**inputs)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(runs):
                m(**inputs)
        ev = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in ev)
        lin = sum(e.cpu_time_total for e in ev if e.key in ("aten::linear", "quantized::linear_dynamic"))
        out[name] = {"linear_ms": lin / 1000 / runs, "total_ms": total / 1000 / runs}
    base, q = out["original"], out["int8"]
    f = base["linear_ms"] / base["total_ms"]
    s_lin = base["linear_ms"] / q["linear_ms"]
    return {"fp32_linear_share": round(f, 3), "int8_linear_speedup": round(s_lin, 2),
            "amdahl_bound_speedup": round(1 / (1 - f + f / s_lin), 2)}


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _distill_worker(rank: int, world: int, gpt_run: str, run_dir: str, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from paratrain.parallel import ParallelDims
    from paratrain.training.spec import RunSpec
    from paratrain.training.trainer import Trainer

    cfg, teacher, _ = load_checkpoint(gpt_run)
    student = D.make_student(teacher, max(1, cfg.model.n_layer // 2))
    c = D.finetune_config(cfg, Path(run_dir), 10, lr=cfg.train.lr / 3, batch_size=8 // world)
    c.parallel.nproc = world
    c.train.deterministic = True
    c.train.log_every = 1
    dims = ParallelDims.from_env(c)
    try:
        spec = RunSpec.from_user(c, dims.dp_rank, dims.dp, model=student, loss_fn=D.DistillLoss(teacher, 2.0, 0.5))
        Trainer(c, dims, spec).fit()
    finally:
        dims.shutdown()


def ddp_distill_parity(gpt_run: Path, out: Path) -> dict:
    """Distillation in the trainer with 2 DDP ranks (gloo) vs 1 process, same global batch of 8."""
    import torch.multiprocessing as mp

    losses = {}
    for world in (1, 2):
        run = out / f"distill-ddp{world}"
        run.mkdir(parents=True, exist_ok=True)
        with stdout_to_stderr():
            mp.spawn(_distill_worker, args=(world, str(gpt_run), str(run), _free_port()), nprocs=world)
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        losses[world] = {r["step"]: r["loss"] for r in rows if "loss" in r}
    diff = max(abs(losses[1][k] - losses[2][k]) for k in losses[1])
    return {"steps": len(losses[1]), "max_abs_loss_diff": diff, "first_loss": losses[1][1],
            "last_loss": losses[1][max(losses[1])]}


def checks(report: dict) -> dict:
    by = {s["name"]: s for s in report["stages"]}

    def get(name: str, key: str):
        v = by[name].get(key)
        return round(v, 4) if isinstance(v, float) else v

    out = {
        "int8_size_ratio": get("int8", "size_ratio"),
        "int8_speedup_b16": get("int8", "speedup_b16"),
        "int8_speedup_b1": get("int8", "speedup_b1"),
        "int8_val_loss_change": get("int8", "val_loss_change"),
        "int8_engine": by["int8"].get("engine"),
        **{f"int8_{n[5:]}_speedup_b16": get(n, "speedup_b16") for n in by if n in ("int8-x86", "int8-onednn")},
        "int8_static_speedup_b16": get("int8-static", "speedup_b16"),
        "int8_static_val_loss_change": get("int8-static", "val_loss_change"),
        "int8_weight_only_size_ratio": get("int8-weight", "size_ratio"),
        "int8_weight_only_speedup_b16": get("int8-weight", "speedup_b16"),
        "int4_weight_only_size_ratio": get("int4-weight", "size_ratio"),
        "int4_weight_only_val_loss_change": get("int4-weight", "val_loss_change"),
        "ffn50_speedup_b16": get("ffn50-ft", "speedup_b16"),
        "ffn50_val_loss_change": get("ffn50-ft", "val_loss_change"),
        "ffn50_val_loss_change_vs_dense_ft": round(by["ffn50-ft"]["val_loss"] / by["dense-ft"]["val_loss"] - 1, 4),
        "dense_ft_val_loss_change": get("dense-ft", "val_loss_change"),
        "ffn50_int8_size_ratio": get("ffn50-ft-int8", "size_ratio"),
        "ffn50_int8_speedup_b16": get("ffn50-ft-int8", "speedup_b16"),
        "ffn50_int8_val_loss_change": get("ffn50-ft-int8", "val_loss_change"),
        "mag50_size_ratio": get("mag50-ft", "size_ratio"),
        "mag50_int8_size_ratio": get("mag50-ft-int8", "size_ratio"),
        "mag50_int8_val_loss_change": get("mag50-ft-int8", "val_loss_change"),
        "distilled_int8_size_ratio": get("distilled-int8", "size_ratio"),
        "distilled_int8_speedup_b16": get("distilled-int8", "speedup_b16"),
        "distilled_val_loss_change": get("distilled", "val_loss_change"),
    }
    if by["original"].get("val_acc") is not None:
        for name in ("int8", "int8-static", "ffn50-ft", "ffn50-ft-int8", "mag50-ft-int8", "distilled"):
            out[f"{name}_acc_change_points"] = get(name, "val_acc_change_points")
    out["target_int8"] = bool(out["int8_size_ratio"] >= 3 and out["int8_speedup_b16"] >= 1.7
                              and out["int8_val_loss_change"] <= 0.02
                              and (out.get("int8_acc_change_points") is None or out["int8_acc_change_points"] >= -1))
    out["target_ffn50"] = bool(out["ffn50_speedup_b16"] >= 1.4 and out["ffn50_val_loss_change"] <= 0.03)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench-compression")
    ap.add_argument("--gpt-run", default="", help="reuse this trained default-GPT run dir")
    ap.add_argument("--s2s-run", default="", help="reuse this trained seq2seq-reverse run dir")
    ap.add_argument("--s2s-steps", type=int, default=2000, help="training steps of seq2seq-reverse")
    ap.add_argument("--finetune-steps", type=int, default=100)
    ap.add_argument("--distill-steps", type=int, default=150)
    ap.add_argument("--eval-batches", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--only", default="", help="gpt | s2s (default: both)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    # seq2seq-reverse learns the task between steps 750 and 1000 (val loss 1.3 -> 0.008); its
    # config's 600 steps leave exact-match accuracy at 0, so the benchmark trains it longer
    models = {"gpt": (args.gpt_run, None, []),
              "s2s": (args.s2s_run, ROOT / "configs" / "seq2seq-reverse.toml", [f"--train.steps={args.s2s_steps}"])}
    result: dict = {"torch": torch.__version__, "threads": 1, "repeats": args.repeats,
                    "finetune_steps": args.finetune_steps, "distill_steps": args.distill_steps}
    for key, (given, config, overrides) in models.items():
        if args.only and key != args.only:
            continue
        run = Path(given) if given else out / f"{key}-run"
        train_if_needed(key, run, config, overrides)
        report = variants(run, out / f"{key}-compressed", args)
        keep = ("name", "params", "nonzero_params", "bytes_on_disk", "latency_ms_b1", "latency_ms_b16",
                "val_loss", "val_acc", "size_ratio", "speedup_b1", "speedup_b16", "val_loss_change")
        base = report["stages"][0]["val_loss"]
        result[key] = {"checks": checks(report), "time_in_linears": report["time_in_linears"],
                       "stages": [{**{k: s.get(k) for k in keep}, "val_loss_delta": s["val_loss"] - base}
                                  for s in report["stages"]]}
        (out / "result.json").write_text(json.dumps(result, indent=1))
    if not args.only or args.only == "gpt":
        gpt_run = Path(args.gpt_run) if args.gpt_run else out / "gpt-run"
        try:
            result["distill_ddp_vs_single"] = ddp_distill_parity(gpt_run, out)
        except Exception as e:  # keep the measurements above
            result["distill_ddp_vs_single"] = {"error": repr(e)}
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
