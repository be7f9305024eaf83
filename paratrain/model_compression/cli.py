"""``paratrain compress CHECKPOINT [--prune F] [--quantize int8] [--distill] [--out DIR] [--json]``."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from paratrain.config import ConfigError
from paratrain.model_compression.recipe import CompressOptions, compress, resolve_checkpoint


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of the compress verb (defaults: see :class:`~paratrain.model_compression.recipe.CompressOptions`)."""
    p.add_argument("checkpoint", help="a checkpoint dir (RUN/checkpoints/step_N) or a run dir (newest checkpoint)")
    p.add_argument("--out", default="", help="output dir for report.md, report.json and the exported models "
                   "(default: RUN/compressed)")
    p.add_argument("--config", default=None, help="the run's config.toml (default: RUN/config.toml)")
    p.add_argument("--json", action="store_true", help="print report.json to stdout (progress goes to stderr)")
    g = p.add_argument_group("pruning")
    g.add_argument("--prune", type=float, default=0.0, help="fraction to prune: of the Linear weights "
                   "(magnitude) or of FFN neurons / attention heads (ffn | heads | both)")
    g.add_argument("--prune-method", default="magnitude", help="magnitude | nm | ffn | heads | both")
    g.add_argument("--rank-by", default="norm", help="structured pruning ranks units by weight norm | sensitivity")
    g.add_argument("--nm", default="2:4", help="N:M pattern for --prune-method nm")
    g.add_argument("--schedule", default="oneshot", help="magnitude pruning: oneshot | cubic (gradual, "
                   "Zhu & Gupta, over the first 75%% of --finetune-steps)")
    g.add_argument("--finetune-steps", type=int, default=0, help="fine-tune steps after pruning (and QAT steps)")
    g = p.add_argument_group("distillation")
    g.add_argument("--distill", action="store_true", help="train a student from the original model's logits")
    g.add_argument("--distill-steps", type=int, default=200)
    g.add_argument("--student-layers", type=int, default=0,
                   help="student depth (0: the pruned model if pruned, else half the layers)")
    g.add_argument("--temperature", type=float, default=2.0)
    g.add_argument("--alpha", type=float, default=0.5, help="weight of the soft (teacher) loss")
    g = p.add_argument_group("quantization")
    g.add_argument("--quantize", default="none",
                   help="none | int8 (dynamic) | int8-static | int8-qat | int8-weight | int4-weight")
    g.add_argument("--no-quantize-embeddings", action="store_true",
                   help="keep embedding tables fp32 on disk when quantizing")
    g.add_argument("--engine", default="auto", help="quantized engine for int8: auto (time x86 and onednn "
                   "on this CPU, keep the faster) | x86 | fbgemm | onednn")
    g.add_argument("--calib-batches", type=int, default=8, help="batches for static calibration / sensitivity")
    g = p.add_argument_group("training and measurement")
    g.add_argument("--lr", type=float, default=0.0, help="fine-tune / distill learning rate (0: train.lr / 3)")
    g.add_argument("--batch-size", type=int, default=0, help="0: the run's data.batch_size")
    g.add_argument("--eval-batches", type=int, default=0, help="validation batches (0: the run's train.eval_batches)")
    g.add_argument("--repeats", type=int, default=20, help="timed forward passes per stage and batch size")
    g.add_argument("--threads", type=int, default=1, help="intra-op threads while timing (same for every stage)")
    g.add_argument("--torchscript", action="store_true", help="also write traced TorchScript files")


def main(args: argparse.Namespace) -> int:

    opts = CompressOptions(
        prune=args.prune, prune_method=args.prune_method, rank_by=args.rank_by, nm=args.nm,
        schedule=args.schedule, finetune_steps=args.finetune_steps, quantize=args.quantize,
        quantize_embeddings=not args.no_quantize_embeddings, distill=args.distill,
        distill_steps=args.distill_steps, student_layers=args.student_layers, temperature=args.temperature,
        alpha=args.alpha, lr=args.lr, batch_size=args.batch_size, eval_batches=args.eval_batches,
        calib_batches=args.calib_batches, repeats=args.repeats, threads=args.threads,
        torchscript=args.torchscript, engine=args.engine,
    )
    opts.check()
    if args.prune == 0 and args.prune_method != "nm" and args.quantize == "none" and not args.distill:
        raise ConfigError("nothing to do: give --prune, --quantize and/or --distill")
    step_dir = resolve_checkpoint(args.checkpoint)
    out = Path(args.out) if args.out else step_dir.parent.parent / "compressed"

    def log(msg: str) -> None:
        print(f"compress: {msg}", file=sys.stderr if args.json else sys.stdout, flush=True)

    quiet = contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext()
    with quiet:
        report = compress(step_dir, out, opts, args.config, log)
    if args.json:
        print(json.dumps(report))
    else:
        for r in report["stages"]:
            acc = f", acc {r['val_acc']:.4f}" if r.get("val_acc") is not None else ""
            print(f"{r['name']:>12}: {r['bytes_on_disk'] / 1e6:.2f} MB ({r['size_ratio']:.2f}x smaller), "
                  f"b16 {r['latency_ms_b16']:.1f} ms ({r['speedup_b16']:.2f}x), val loss {r['val_loss']:.4f}{acc}")
        print(f"report: {out / 'report.md'}")
    return 0
