"""Two-rank layer probe: what one Transformer block costs under tensor parallel and under
FSDP2 on this machine right now, collectives and stalls included.

On a CPU host the workers of a layout share the cores with each other's gloo threads, and
a blocking collective waits until the scheduler runs the other rank: a cost that grows
with the machine's load and that no idle-link α–β figure shows (docs/benchmarks.md,
Planner). So ``plan --measure`` probes it the way it calibrates compute: two processes
(gloo, the layout's threads each) run forward + backward of one block of the config's
shape on the layout's micro-batch, first plain (both ranks at once, no communication),
then tensor-parallel, then as an FSDP2 unit. The per-layer differences replace the
modelled TP and ZeRO-3 communication terms for the prediction (``cost.estimate`` reads
``HardwareSpec.tp_layer_s`` / ``fsdp_unit_s`` with ``layer_comm_measured``).

The probe uses paratrain's encoder/decoder-only ``Block``; decoder blocks of seq2seq
(with cross-attention) are approximated by it.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
from statistics import median
from typing import Any

PROBE_TIMEOUT_S = 120.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, port: int, shape: dict[str, int], threads: int, repeats: int, queue: Any) -> None:
    import copy

    import torch
    import torch.distributed as dist

    try:
        torch.set_num_threads(threads)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                                timeout=datetime.timedelta(seconds=PROBE_TIMEOUT_S))
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor.parallel import parallelize_module

        from paratrain.models.blocks import Block
        from paratrain.parallel.tensor_parallel import block_plan

        torch.manual_seed(0)
        mesh = init_device_mesh("cpu", (2,))
        plain = Block(shape["d"], shape["heads"], shape["ff"], 0.0, causal=True)
        x = torch.randn(shape["micro"], shape["seq"], shape["d"])

        variants = {"plain": plain,
                    "tp": parallelize_module(copy.deepcopy(plain), mesh, block_plan(plain)),
                    "fsdp": fully_shard(copy.deepcopy(plain), mesh=mesh, reshard_after_forward=True)}
        times: dict[str, list[float]] = {k: [] for k in variants}
        # round-robin: the machine's load drifts, and it should hit the three variants alike
        for i in range(repeats + 2):
            for name, block in variants.items():
                dist.barrier()  # both ranks start together, as in a training step
                t0 = time.perf_counter()
                block(x).sum().backward()
                if i >= 2:
                    times[name].append(time.perf_counter() - t0)
        out = {"plain_s": median(times["plain"]),
               "tp_ratio": median([a / b for a, b in zip(times["tp"], times["plain"], strict=True)]),
               "fsdp_ratio": median([a / b for a, b in zip(times["fsdp"], times["plain"], strict=True)])}
        queue.put((rank, out))
        dist.destroy_process_group()
    except BaseException as e:  # report, don't hang the parent
        queue.put((rank, {"error": f"{type(e).__name__}: {e}"}))


def probe_layers(d_model: int, n_head: int, d_ff: int, micro: int, seq: int, threads: int = 1,
                 repeats: int = 12) -> dict[str, float]:
    """Forward + backward of one block on 2 ranks: ``plain_s`` (seconds; no communication,
    both ranks busy), and per round the time of the tensor-parallel block (``tp_ratio``) and
    of the FSDP2 unit resharded after forward (``fsdp_ratio``) over the plain one; medians
    over ``repeats`` rounds, the larger of the two ranks.  Raises RuntimeError when the
    probe fails or times out."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    shape = {"d": d_model, "heads": n_head, "ff": d_ff, "micro": micro, "seq": seq}
    port = _free_port()
    env_threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        procs = [ctx.Process(target=_rank_main, args=(r, port, shape, threads, repeats, queue), daemon=True)
                 for r in range(2)]
        for p in procs:
            p.start()
    finally:
        if env_threads is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = env_threads
    results: dict[int, dict[str, Any]] = {}
    deadline = time.monotonic() + PROBE_TIMEOUT_S
    try:
        while len(results) < 2 and time.monotonic() < deadline:
            try:
                rank, out = queue.get(timeout=max(0.1, deadline - time.monotonic()))
            except Exception:
                break
            results[rank] = out
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    errors = [r["error"] for r in results.values() if "error" in r]
    if errors or len(results) < 2:
        raise RuntimeError(f"layer probe failed: {errors[0] if errors else 'timed out'}")
    return {k: max(r[k] for r in results.values()) for k in ("plain_s", "tp_ratio", "fsdp_ratio")}
