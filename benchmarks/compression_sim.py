"""Single-process simulation of compressed data-parallel training (algorithm without the plumbing).

Replays what the DDP comm hooks do for ``--workers`` ranks inside one process, with no
DDP, no buckets and no collectives: each step, every simulated rank computes its local
gradient on its own data shard (the same shards and batches the real ranks get), divides
it by the world size, runs it through its own :class:`GradientCompressor` (codec + error
feedback + warm-up, one state per parameter, as the hooks keep one per bucket segment),
and the decoded payloads are summed into the gradient the optimizer sees (clipped, then
AdamW / SGD and the LR schedule exactly as the trainer does).  With dropout 0 it
reproduces the 2-process hook path up to float summation order, so a gap between the two
points at the plumbing and a gap between variants here points at the algorithm.  PowerSGD is
replayed per rank (each rank its own P, Q): that is ``powersgd_exchange = "allgather"`` and the
PS path, not the default shared all-reduce of P and Q.

    python benchmarks/compression_sim.py --steps 100 \
        --variant fp32:gradient=none --variant topk:gradient=topk \
        --variant topk-noef:gradient=topk,error_feedback=false [--set=--train.optimizer=sgd]

Prints one JSON line per variant (val loss over the same batches as the trainer's final
eval, bytes one rank would send per step, averaged over the run and over its last quarter).

Experiment knobs besides ``[compression]`` keys, used for docs/benchmarks.md: ``ef21=1``
(EF21, Richtarik et al. 2021: each rank sends top-k of ``grad - g_i``, ``g_i`` += what it
sent, the optimizer gets the dense running sum; use with ``error_feedback=false``),
``decay=D`` (residual multiplied by D each step), ``mom=B`` (compress a local momentum
``B m + (1-B) g`` instead of the gradient), ``dense_vectors=1`` (tensors of < 2 dims sent
uncompressed, as DGC's reference code does), ``leak=T`` (receiver delivers the decoded
stream at 1/T per step), ``warmup_start`` / ``warmup_factor`` (first ratio and divisor of
the warm-up ramp), ``freeze_v_after=N`` (AdamW's second moment frozen after step N:
``compression.frozen_adam.FrozenVarianceAdamW``, 1-bit Adam's rule), ``dense_steps=D``
(the first D steps sent uncompressed), ``v_local=1`` (with ``freeze_v_after``: at step N
the frozen v is replaced by the ranks' mean EMA of their *local, uncompressed* squared
gradients, one dense fp32 all-reduce, counted in the bytes), ``v_floor=C`` (frozen v at
least C times its tensor's mean), ``v_sync=S`` (that all-reduce of the local v at steps S,
2S, 4S, ..., v frozen in between, 0/1-Adam-like), ``precond=1`` (compress ``g / sqrt(v)``,
decode times ``sqrt(v)``), ``sign=1`` (1-bit sign + per-tensor mean |x| with EF instead of
the codec), ``beta1=B`` (the frozen-v optimizer's beta1; with ``mom``: 1-bit Adam's
layout), ``clip_dense=1`` (clip with the norm of the *dense* global gradient before
compressing, not the decoded one after: an oracle, it needs the ranks' dot products) and
``clip_local=1`` (each rank clips its own local gradient to ``grad_clip`` before compressing).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

# experiment knobs that are not config keys (see the docstring)
TUNE = ("warmup_start", "warmup_factor", "ef21", "decay", "mom", "dense_vectors", "leak",
        "freeze_v_after", "dense_steps", "v_local", "v_floor", "v_sync", "precond", "sign", "beta1",
        "clip_dense", "clip_local")


def parse_variant(text: str) -> tuple[str, list[str], dict]:
    """``name:key=value,...`` -> (name, ["--compression.key=value", ...], {tuning knob: value})."""
    name, _, rest = text.partition(":")
    kvs = [kv.split("=", 1) for kv in rest.split(",") if kv]
    return (name, [f"--compression.{k}={v}" for k, v in kvs if k not in TUNE],
            {k: float(v) for k, v in kvs if k in TUNE})


def simulate(cfg, workers: int, eval_batches: int, tune: dict | None = None) -> dict:
    from paratrain.data import build_data, val_batches
    from paratrain.grad_compression.codecs import decode
    from paratrain.grad_compression.compressor import GradientCompressor
    from paratrain.grad_compression.hooks import allgather_bytes, ring_allreduce_bytes
    from paratrain.models import build_model
    from paratrain.models.loss import eval_stats, lm_loss_sum
    from paratrain.parallel.optim import make_optimizer
    from paratrain.training.trainer import lr_lambda

    tune = tune or {}
    data = [build_data(cfg, r, workers) for r in range(workers)]
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg.model, cfg.model.vocab_size or data[0].vocab_size, data[0].pad_id)
    opt = make_optimizer(model, cfg)
    v_sync = int(tune.get("v_sync", 0))
    freeze = int(tune.get("freeze_v_after", 1 if v_sync else 0))
    syncs = set()
    while v_sync and v_sync <= cfg.train.steps:
        syncs.add(v_sync)
        v_sync *= 2
    if freeze:
        from frozen_adam import FrozenVarianceAdamW
        d = opt.defaults
        groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in opt.param_groups]
        opt = FrozenVarianceAdamW(groups,
                                  lr=d["lr"], betas=(tune.get("beta1", d["betas"][0]), d["betas"][1]), eps=d["eps"],
                                  freeze_after=freeze,
                                  variance_floor=tune.get("v_floor", 0.0))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    comps = [GradientCompressor.from_config(cfg.compression, seed=r + 1) for r in range(workers)]
    for comp in comps:  # experiment knobs (not config keys)
        comp.warmup_start, comp.warmup_factor = tune.get("warmup_start", 0.25), tune.get("warmup_factor", 4.0)
    bytes_per_step: list[int] = []
    ef21 = bool(tune.get("ef21", 0))
    est = [{n: torch.zeros_like(p) for n, p in params} for _ in range(workers)]
    agg = {n: torch.zeros_like(p) for n, p in params}
    mom = [{n: torch.zeros_like(p) for n, p in params} for _ in range(workers)]
    dense_steps, v_local = int(tune.get("dense_steps", 0)), bool(tune.get("v_local", 0) or syncs)
    lv = [{n: torch.zeros_like(p) for n, p in params} for _ in range(workers)] if v_local else None
    b2 = 0.95
    t0 = time.time()
    for _step in range(cfg.train.steps):
        batches = [next(d.train) for d in data]
        n_global = float(sum(int((b["labels"] != -100).sum()) for b in batches))
        total = {n: torch.zeros_like(p) for n, p in params}
        sent = 0
        local = []
        for b in batches:
            model.zero_grad(set_to_none=True)
            (lm_loss_sum(model, b) * (workers / n_global)).backward()
            local.append({n: p.grad.detach().clone() for n, p in params})
        coef = [1.0] * workers  # clip before compressing: the dense global norm (oracle) or each local norm
        clip = cfg.train.grad_clip
        if tune.get("clip_dense") and clip > 0:
            norm = float(torch.sqrt(sum((sum(g[n] for g in local) / workers).pow(2).sum() for n, _ in params)))
            coef = [min(1.0, clip / (norm + 1e-6))] * workers
        elif tune.get("clip_local") and clip > 0:
            coef = [min(1.0, clip / (float(torch.sqrt(sum(g[n].pow(2).sum() for n, _ in params))) + 1e-6))
                    for g in local]
        for r in range(workers):
            comp = comps[r]
            for n, p in params:
                p.grad = local[r][n]
                x = p.grad / workers * coef[r]
                if lv is not None and (_step < freeze or syncs):
                    lv[r][n].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                if "mom" in tune:
                    mom[r][n].mul_(tune["mom"]).add_(x, alpha=1 - tune["mom"])
                    x = mom[r][n].clone()
                if ef21:
                    x = x - est[r][n]
                scale = None
                if tune.get("precond") and "exp_avg_sq" in opt.state.get(p, {}):  # top-k of the frozen-v update
                    scale = opt.state[p]["exp_avg_sq"].sqrt().add_(1e-8)
                    x = x / scale
                if tune.get("sign") and _step >= dense_steps:  # 1-bit sign + per-tensor mean |x|, with EF
                    st = comp.state(n)
                    y = x + st.residual if st.residual is not None else x
                    dec = torch.sign(y) * y.abs().mean()
                    st.residual = y - dec
                    sent += allgather_bytes(-(-y.numel() // 8) + 4, workers)
                    total[n] += dec if scale is None else dec * scale
                    continue
                if _step < dense_steps:
                    payload = comp.plain.encode(x, comp.state(n))
                elif tune.get("dense_vectors") and p.dim() < 2:
                    payload = comp.plain.encode(x, comp.state(n))
                else:
                    payload = comp.encode(n, x)
                if payload.codec in ("none",):
                    sent += ring_allreduce_bytes(payload.nbytes, workers)
                elif payload.codec in ("fp16", "bf16"):
                    sent += ring_allreduce_bytes(payload.nbytes, workers)
                else:
                    sent += allgather_bytes(payload.nbytes, workers)
                if "decay" in tune and comp.states[n].residual is not None:
                    comp.states[n].residual.mul_(tune["decay"])
                dec = decode(payload)
                if scale is not None:
                    dec = dec * scale
                total[n] += dec
                if ef21:
                    est[r][n] += dec
            comp.tick()
        bytes_per_step.append(sent // workers)
        for n, p in params:
            if ef21:
                agg[n] += total[n]
                total[n] = agg[n].clone()
            if "leak" in tune:  # receiver-side pacing: deliver the decoded stream at 1/leak per step
                agg[n] += total[n]
                total[n] = agg[n] / tune["leak"]
                agg[n] -= total[n]
            p.grad = total[n]
        if cfg.train.grad_clip > 0 and not (tune.get("clip_dense") or tune.get("clip_local")):
            torch.nn.utils.clip_grad_norm_([p for _, p in params], cfg.train.grad_clip)
        opt.step()
        sched.step()
        if lv is not None and (_step + 1 in syncs or (not syncs and _step == freeze - 1)):
            # one dense all-reduce of the local v estimates (bias correction moved to the frozen one)
            bc = (1 - b2 ** freeze) / (1 - b2 ** (_step + 1))
            for n, p in params:
                v = opt.state[p]["exp_avg_sq"].copy_(sum(lv[r][n] for r in range(workers)) * (bc / workers))
                v.clamp_(min=float(v.mean()) * tune.get("v_floor", 0.0))
            bytes_per_step[-1] += ring_allreduce_bytes(sum(p.numel() * 4 for _, p in params), workers)
    model.eval()
    stats = torch.zeros(4, dtype=torch.float64)
    with torch.no_grad():
        for r in range(workers):
            for b in val_batches(data[r], cfg.data.batch_size, r, workers, eval_batches):
                stats += eval_stats(model(**{k: v for k, v in b.items() if k != "labels"}), b["labels"])
    steady = bytes_per_step[-max(1, len(bytes_per_step) // 4):]
    return {"val_loss": round(float(stats[0] / stats[1]), 4),
            "bytes_per_step_avg": round(sum(bytes_per_step) / len(bytes_per_step)),
            "bytes_per_step_steady": round(sum(steady) / len(steady)),
            "wall_s": round(time.time() - t0, 1)}


def main() -> int:
    from paratrain.config import Config

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--eval-batches", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE,...")
    ap.add_argument("--set", action="append", default=[], metavar="--SECTION.KEY=VALUE")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    variants = [parse_variant(v) for v in args.variant] or [("fp32", ["--compression.gradient=none"], {}),
                                                            ("topk", ["--compression.gradient=topk"], {})]
    for name, extra, tune in variants:
        overrides = [f"--train.steps={args.steps}", f"--parallel.nproc={args.workers}", *args.set, *extra]
        cfg = Config.load(None, [o.removeprefix("--") for o in overrides])
        res = simulate(cfg, args.workers, args.eval_batches, tune)
        print(json.dumps({"variant": name, "steps": args.steps, **res}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
