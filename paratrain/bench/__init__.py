"""``paratrain bench comm``: collective, p2p and PS push/pull bandwidth and latency.

Without RANK/WORLD_SIZE in the environment it starts ``--nproc`` local processes (torch
elastic, like ``train``); under torchrun every process is one rank of the benchmark.  Rank 0
prints a table (or JSON with ``--json``) and writes the JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
import uuid
from pathlib import Path
from typing import Any

from paratrain.bench.comm import OPS, CommBench, memcpy_gbps
from paratrain.config import ConfigError
from paratrain.processes import under_torchrun

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "M": 1 << 20, "MB": 1 << 20, "G": 1 << 30, "GB": 1 << 30}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("what", choices=["comm"], help="what to benchmark")
    parser.add_argument("--nproc", type=int, default=2, help="local processes (ignored under torchrun)")
    parser.add_argument("--sizes", default="4K:256M",
                        help="MIN:MAX (times --factor each step) or a list like 4K,1M,64M")
    parser.add_argument("--factor", type=int, default=4, help="size step for MIN:MAX")
    parser.add_argument("--ops", default="all", help="comma list of all_reduce, all_gather, reduce_scatter, "
                        "broadcast, send_recv, ps_push_pull (default: all)")
    parser.add_argument("--backend", choices=["auto", "gloo", "nccl"], default="auto")
    parser.add_argument("--target-s", type=float, default=0.25, help="timed seconds per op and size")
    parser.add_argument("--max-iters", type=int, default=200)
    parser.add_argument("--out", default="", help="JSON output (default runs/bench/comm_n{N}.json)")
    parser.add_argument("--json", action="store_true", help="print the JSON instead of the table")


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B?)\s*", text.upper())
    if not m:
        raise ConfigError(f"bad size '{text}' (use e.g. 4K, 64M, 1G)")
    n = int(float(m.group(1)) * _UNITS[m.group(2)])
    if n < 4:
        raise ConfigError(f"size '{text}' is below 4 bytes (one float)")
    return n


def parse_sizes(spec: str, factor: int) -> list[int]:
    """``MIN:MAX`` stepping by ``factor``, or a comma list."""
    if ":" in spec:
        lo, hi = (parse_size(s) for s in spec.split(":", 1))
        if factor < 2 or lo > hi:
            raise ConfigError(f"--sizes {spec} with --factor {factor}: need MIN <= MAX and factor >= 2")
        out = [lo]
        while out[-1] * factor <= hi:
            out.append(out[-1] * factor)
        return out
    return [parse_size(s) for s in spec.split(",") if s.strip()]


def _options(args: argparse.Namespace) -> dict[str, Any]:

    ops = list(OPS) if args.ops == "all" else [o.strip() for o in args.ops.split(",") if o.strip()]
    bad = [o for o in ops if o not in OPS]
    if bad:
        raise ConfigError(f"unknown op(s) {', '.join(bad)}; choose from {', '.join(OPS)}")
    if not 1 <= args.nproc <= 1024:
        raise ConfigError("--nproc must be between 1 and 1024")
    if not 0 < args.target_s <= 3600:  # (NaN fails this too)
        raise ConfigError(f"--target-s {args.target_s} must be a number of seconds in (0, 3600]")
    if args.max_iters < 1:
        raise ConfigError(f"--max-iters {args.max_iters} must be at least 1")
    if args.backend == "nccl":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("--backend nccl needs CUDA GPUs; this machine has none (use gloo)")
    return {"ops": ops, "sizes": parse_sizes(args.sizes, args.factor), "backend": args.backend,
            "target_s": args.target_s, "max_iters": args.max_iters}


def rank_main(opts: dict[str, Any]) -> dict[str, Any] | None:
    """One rank: init the process group, run, tear down; rank 0 returns the result."""
    import torch
    import torch.distributed as dist


    torch.set_num_threads(1)
    use_cuda = torch.cuda.is_available() and opts["backend"] != "gloo"
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local % torch.cuda.device_count()) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    backend = "nccl" if use_cuda else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=300),
                            device_id=device if use_cuda else None)
    try:
        n = dist.get_world_size()
        if n < 2:
            raise ConfigError("bench comm needs at least 2 processes")
        samples: list[float] = []

        def measure_copy() -> None:  # rank 0, while the others wait: spread over the run, best one counts
            if dist.get_rank() == 0:
                samples.append(memcpy_gbps(device))
            dist.barrier()

        rows = CommBench(device, opts["target_s"], opts["max_iters"]).run(opts["ops"], opts["sizes"], measure_copy)
        measure_copy()
        memcpy = max(samples) if samples else 0.0
    finally:
        dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    name = torch.cuda.get_device_name(device) if use_cuda else "cpu"
    return {"world_size": n, "backend": backend, "device": name, "memcpy_gbps": memcpy,
            "memcpy_samples_gbps": samples, "torch": torch.__version__, "results": rows,
            "headline": headline(rows, memcpy)}


def headline(rows: list[dict[str, Any]], memcpy: float) -> dict[str, Any]:
    """64 MB all_reduce busbw relative to the memory-copy bandwidth (the figure docs/benchmarks.md quotes)."""
    ar = [r for r in rows if r["op"] == "all_reduce"]
    if not ar:
        return {}
    best = min(ar, key=lambda r: abs(r["bytes"] - (64 << 20)))
    return {"all_reduce_bytes": best["bytes"], "all_reduce_busbw_gbps": best["busbw_gbps"],
            "memcpy_gbps": memcpy, "busbw_over_memcpy": best["busbw_gbps"] / memcpy if memcpy else None}


def launch_local(opts: dict[str, Any], nproc: int) -> dict[str, Any]:
    """Run the benchmark on ``nproc`` local processes (torch elastic); returns rank 0's result."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    lc = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"bench-{uuid.uuid4().hex[:8]}",
                      rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0, monitor_interval=0.1,
                      start_method="spawn")
    try:
        results = elastic_launch(lc, entrypoint=rank_main)(opts)
    except ChildFailedError as e:
        raise RuntimeError(f"bench comm: a rank failed: {e}") from None
    return results[0]


def human(n: float) -> str:
    for unit, size in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= size:
            return f"{n / size:g} {unit}"
    return f"{n:g} B"


def table(result: dict[str, Any]) -> str:
    """The results as a fixed-width text table."""
    lines = [f"bench comm: {result['world_size']} processes, {result['backend']} on {result['device']}; "
             f"memory copy {result['memcpy_gbps']:.2f} GB/s (1 process, best sample)",
             f"{'op':<14} {'size':>9} {'iters':>6} {'time (us)':>12} {'algbw GB/s':>11} {'busbw GB/s':>11}"]
    for r in result["results"]:
        lines.append(f"{r['op']:<14} {human(r['bytes']):>9} {r['iters']:>6} {r['time_us']:>12.1f} "
                     f"{r['algbw_gbps']:>11.3f} {r['busbw_gbps']:>11.3f}")
    h = result.get("headline") or {}
    if h.get("busbw_over_memcpy") is not None:
        lines.append(f"all_reduce {human(h['all_reduce_bytes'])}: busbw {h['all_reduce_busbw_gbps']:.3f} GB/s = "
                     f"{h['busbw_over_memcpy']:.3f} x memory copy")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    opts = _options(args)
    if under_torchrun():
        result = rank_main(opts)
        if result is None:
            return 0
    else:
        if args.nproc < 2:
            raise ConfigError("bench comm needs --nproc >= 2")
        result = launch_local(opts, args.nproc)
    out = Path(args.out or f"runs/bench/comm_n{result['world_size']}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    if args.json:
        print(json.dumps(result))
    else:
        print(table(result))
        print(f"wrote {out}", file=sys.stderr)
    return 0
