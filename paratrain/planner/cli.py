"""``paratrain plan``: predict memory, step time and communication; pick the best layout.

The model comes from a paratrain config (``-c``), a preset (``--preset``) or explicit
dimensions; the cluster from ``--gpus`` and ``--gpu-type``.  Fixing any of ``--tp --pp
--dp --zero --microbatch --recompute`` restricts the search to matching layouts.
``--measure`` runs the config's layouts on this machine and compares (see measure.py).
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from typing import Any

from paratrain.config import Config, ConfigError
from paratrain.planner.calibrate import get_spec
from paratrain.planner.cost import Setup
from paratrain.planner.flops import PRESETS, RECOMPUTE_MODES, ModelSpec, spec_from_config
from paratrain.planner.hardware import GPU_TYPES, HardwareSpec, describe
from paratrain.planner.search import SearchResult, explain, format_table, search


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``paratrain plan``."""
    g = p.add_argument_group("model (one of)")
    g.add_argument("-c", "--config", help="a paratrain TOML config: its model, batch and precision")
    g.add_argument("--preset", help=f"a known model: {', '.join(PRESETS)}")
    g.add_argument("--layers", type=int, help="number of Transformer layers")
    g.add_argument("--hidden", type=int, help="hidden size")
    g.add_argument("--heads", type=int, help="attention heads")
    g.add_argument("--seq", type=int, help="sequence length (default 2048)")
    g.add_argument("--vocab", type=int, help="vocabulary size (default 50257)")
    g.add_argument("--ffn", type=int, help="feed-forward size (default 4 x hidden)")
    c = p.add_argument_group("cluster and batch")
    c.add_argument("--gpus", type=int, help="devices (default: parallel.nproc with -c, else 8)")
    c.add_argument("--gpu-type", help=f"{' | '.join(GPU_TYPES)} (default: cpu with -c, else a100-80gb)")
    c.add_argument("--global-batch", type=int, help="sequences per optimizer step")
    c.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="default: the config's, else bf16")
    c.add_argument("--gpus-per-node", type=int, help="override the devices per node")
    c.add_argument("--intra-bw", type=float, help="override intra-node bandwidth, GB/s per device")
    c.add_argument("--inter-bw", type=float, help="override inter-node bandwidth, GB/s per device")
    c.add_argument("--efficiency", type=float, help="override the achievable fraction of peak FLOP/s")
    c.add_argument("--no-flash", action="store_true", help="attention keeps its s^2 scores (paper setting)")
    f = p.add_argument_group("fix part of the layout")
    f.add_argument("--tp", type=int)
    f.add_argument("--pp", type=int)
    f.add_argument("--dp", type=int)
    f.add_argument("--zero", type=int, choices=[0, 1, 2, 3])
    f.add_argument("--microbatch", type=int)
    f.add_argument("--recompute", choices=list(RECOMPUTE_MODES))
    f.add_argument("--sync", choices=["allreduce", "ps"])
    o = p.add_argument_group("output")
    o.add_argument("--top", type=int, default=10, help="rows in the table (default 10)")
    o.add_argument("--json", action="store_true", help='print {"best": ..., "candidates": [...]}')
    o.add_argument("--measure", action="store_true",
                   help="run the config's layouts (dp2, zero3, tp2, pp2) here; compare predicted and measured")
    o.add_argument("--layouts", default="dp2,zero3,tp2,pp2", help="layouts for --measure")
    o.add_argument("--steps", type=int, default=20, help="training steps per layout for --measure")


def _suggest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _positive(args: argparse.Namespace, names: list[str]) -> None:
    for n in names:
        v = getattr(args, n)
        if v is not None and v < 1:
            raise ConfigError(f"--{n.replace('_', '-')} must be at least 1, got {v}")


def resolve_model(args: argparse.Namespace) -> tuple[ModelSpec, int | None, Config | None]:
    """The model spec, its default global batch, and the config (if ``-c``)."""
    explicit = [args.layers, args.hidden, args.heads]
    if args.config and args.preset:
        raise ConfigError("give either -c CONFIG or --preset, not both")
    cfg: Config | None = None
    default_batch: int | None = None
    if args.config:
        cfg = Config.load(args.config)
        spec = spec_from_config(cfg, name=args.config)
        default_batch = cfg.data.batch_size * cfg.train.grad_accum * cfg.dp
    elif args.preset:
        key = args.preset.lower()
        if key not in PRESETS:
            raise ConfigError(f"unknown preset {args.preset!r}{_suggest(key, list(PRESETS))}; "
                              f"known: {', '.join(PRESETS)}")
        spec, default_batch = PRESETS[key]
    elif all(x is not None for x in explicit):
        spec = ModelSpec("custom", "gpt", args.layers, args.hidden, args.heads, args.vocab or 50257,
                         args.seq or 2048)
    elif any(x is not None for x in explicit):
        raise ConfigError("explicit model needs all of --layers, --hidden and --heads")
    else:
        raise ConfigError("say which model: -c CONFIG, --preset NAME, or --layers --hidden --heads")
    over = {k: v for k, v in (("n_layer", args.layers), ("d_model", args.hidden), ("n_head", args.heads),
                              ("seq", args.seq), ("vocab", args.vocab), ("d_ff", args.ffn)) if v is not None}
    if over:
        spec = spec.with_(**over)
    if spec.d_model % spec.n_head:
        raise ConfigError(f"--heads {spec.n_head} does not divide --hidden {spec.d_model}")
    return spec, default_batch, cfg


def resolve_hardware(args: argparse.Namespace, cfg: Config | None, n: int) -> HardwareSpec:
    gpu_type = (args.gpu_type or ("cpu" if cfg is not None else "a100-80gb")).lower()
    if gpu_type not in GPU_TYPES:
        raise ConfigError(f"unknown --gpu-type {args.gpu_type!r}{_suggest(gpu_type, list(GPU_TYPES))}; "
                          f"known: {', '.join(GPU_TYPES)}")
    over: dict[str, Any] = {
        "intra_bw": args.intra_bw * 1e9 if args.intra_bw else None,
        "inter_bw": args.inter_bw * 1e9 if args.inter_bw else None,
        "devices_per_node": args.gpus_per_node, "efficiency": args.efficiency,
    }
    if gpu_type == "cpu":
        threads = cfg.train.threads if cfg is not None and cfg.train.threads else None
        over.update(procs=n, threads=threads)
    if args.efficiency is not None and not 0 < args.efficiency <= 1:
        raise ConfigError(f"--efficiency must be in (0, 1], got {args.efficiency}")
    return get_spec(gpu_type, **over)


def plan(args: argparse.Namespace) -> tuple[SearchResult, HardwareSpec]:
    """Resolve the arguments and run the search."""
    _positive(args, ["gpus", "global_batch", "tp", "pp", "dp", "microbatch", "gpus_per_node", "top",
                     "layers", "hidden", "heads", "seq", "vocab", "ffn"])
    spec, default_batch, cfg = resolve_model(args)
    n = args.gpus or (cfg.parallel.nproc if cfg is not None else 8)
    fixed = {"tp": args.tp, "pp": args.pp, "dp": args.dp, "zero": args.zero, "microbatch": args.microbatch,
             "recompute": args.recompute, "sync": args.sync}
    if cfg is not None and cfg.parallel.sync == "ps":
        fixed["ps_servers"] = cfg.ps.servers
    degrees = [x for x in (args.tp, args.pp, args.dp) if x is not None]
    if len(degrees) == 3 and args.tp * args.pp * args.dp != n:
        raise ConfigError(f"--tp * --pp * --dp = {args.tp * args.pp * args.dp} but --gpus = {n}")
    prod = 1
    for x in degrees:
        prod *= x
    if n % prod:
        raise ConfigError(f"the fixed degrees ({prod}) do not divide --gpus {n}")
    if args.zero is not None and args.zero > 0 and args.sync == "ps":
        raise ConfigError("--sync ps works with plain data parallel only (no --zero)")
    batch = args.global_batch or default_batch or 512
    precision = args.precision or (cfg.train.precision if cfg is not None else "bf16")
    optimizer = cfg.train.optimizer if cfg is not None else "adamw"
    # a parameter server competes with all-reduce under the same (BSP) semantics unless the
    # config itself trains asynchronously through one
    ps_mode = cfg.ps.mode if cfg is not None and cfg.parallel.sync == "ps" else "sync"
    setup = Setup(batch, precision, optimizer, flash=not args.no_flash, ps_mode=ps_mode,
                  ps_overlap=cfg.ps.overlap if cfg is not None else True,
                  bucket_bytes=(cfg.parallel.bucket_cap_mb * 2**20 if cfg is not None else 25 * 2**20),
                  compression=cfg.compression if cfg is not None else None)
    hw = resolve_hardware(args, cfg, n)
    return search(spec, n, setup, hw, fixed), hw


def main(args: argparse.Namespace) -> int:
    """Entry point of ``paratrain plan``."""
    if args.measure:
        from paratrain.planner.measure import self_check  # torch: the planner itself runs without it

        if args.preset or args.layers:
            raise ConfigError("--measure runs a paratrain config on this machine: use -c CONFIG "
                              "(or no model option for the default config), not --preset/--layers")
        if args.gpu_type and args.gpu_type.lower() != "cpu":
            raise ConfigError("--measure runs on this machine's CPU: drop --gpu-type or use --gpu-type cpu")
        return self_check(args.config, [x.strip() for x in args.layouts.split(",") if x.strip()],
                          steps=args.steps, as_json=args.json)
    res, hw = plan(args)
    if args.json:
        print(json.dumps(res.to_json()))
        return 0
    m = res.model
    print(f"model: {m.name} ({m.arch}, {m.params / 1e9:.3g}B params, {m.total_layers} layers, "
          f"h={m.d_model}, heads={m.n_head}, seq={m.seq}, vocab={m.vocab})")
    codec = f", gradients sent as {res.setup.codec}" if res.setup.codec != "none" else ""
    print(f"cluster: {res.n_devices} x {describe(hw)}; global batch {res.setup.global_batch} sequences, "
          f"{res.setup.precision}{codec}")
    print(f"evaluated {len(res.candidates)} layouts, {sum(c.fits for c in res.candidates)} fit")
    for note in res.notes:
        print(f"note: {note}", file=sys.stderr)
    if res.candidates:
        print(format_table(res, args.top))
        print(explain(res))
    return 0
