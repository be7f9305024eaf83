"""Parameter-server round trips against a bare pyzmq DEALER/ROUTER echo of the same bytes.

One worker (this process) pushes a gradient of 4 KB, 1 MB and 40 MB to 1 and 2 server
processes (async mode, SGD, lr 0: the servers check and apply the update and send the
parameters back) and waits for the reply, over and over.  The baseline is the same bytes
echoed by as many bare pyzmq ROUTER processes (one per server, each echoing its share, in
parallel), no authentication, no update.  Each ``ps.integrity`` mode is measured: ``none``
(connections authenticated once, the default) and ``mac`` (every message keyed-hashed on both
ends).  The round trips are interleaved one by one (echo, none, mac, echo, none, mac, ...), so
load on the machine hits all alike, and each is timed alone: a round's ratio is median echo
time / median PS time over its round trips, robust to the scheduling spikes of a busy
machine; ``ratio`` is the median over rounds.  ``--keys K`` splits the gradient over K
parameters (a model's many tensors: what per-key costs add).  ``--bare`` adds a row ``bare``: the
same servers (``none``) driven by a bare client that sends a prepared push and copies the
reply's values out, nothing else -- how much of the gap is the worker's side.  ``--floor`` adds two
rows with the least work any parameter server does, without a protocol: bare ROUTER processes
like the echo's that check the gradient share for NaN/inf (one read), apply it to their
parameters (SGD, one pass) and send those back.  In ``floor`` the client copies each reply into
a parameter buffer (one copy, like the one a worker whose model is on a GPU must make): the best ratio
a Python PS doing that work can reach here; ``floor_nocopy`` leaves the copy out.  ``--cpu N``
then runs N more round trips of each variant alone and adds ``cpu_us``: CPU microseconds per
round trip of each role's threads (client / server Python thread, their ZeroMQ I/O threads,
the rest; from /proc, Linux).  Under ``taskset -c 0`` everything shares one CPU and wall time is
the sum of that work, without cross-CPU wake-ups.

    python benchmarks/ps_transport.py [--seconds 1] [--rounds 5] [--sizes 4096,1048576,41943040]
                                      [--servers 1,2] [--modes none,mac] [--keys 1] [--bare] [--floor]
                                      [--cpu N]

Prints one strict-JSON object; progress lines go to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_io import stat_cpu_s  # noqa: E402 - benchmarks/, next to this script

from paratrain.config import Config  # noqa: E402
from paratrain.ps.client import PSClient  # noqa: E402
from paratrain.ps.launch import local_servers  # noqa: E402
from paratrain.ps.placement import ParamInfo, place  # noqa: E402
from paratrain.ps.protocol import Flag, Header, Msg, encode, read_header, send  # noqa: E402
from paratrain.ps.strategy import ENDPOINTS_ENV, SECRET_ENV  # noqa: E402
from paratrain.ps.wire import PushEncoder  # noqa: E402
from paratrain.ps.worker import PSWorker  # noqa: E402

ECHO = """
import sys, zmq
ctx = zmq.Context(); r = ctx.socket(zmq.ROUTER); r.setsockopt(zmq.LINGER, 0)
print(r.bind_to_random_port("tcp://127.0.0.1"), flush=True)
while True:
    r.send_multipart(r.recv_multipart(copy=False), copy=False)
"""

FLOOR = """
import math, zmq, torch
torch.set_num_threads(1)
ctx = zmq.Context(); r = ctx.socket(zmq.ROUTER); r.setsockopt(zmq.LINGER, 0)
print(r.bind_to_random_port("tcp://127.0.0.1"), flush=True)
params = {}
while True:
    ident, frame = r.recv_multipart(copy=False)
    g = torch.frombuffer(frame.buffer, dtype=torch.float32)
    p = params.get(len(g))
    if p is None:
        p = params[len(g)] = torch.zeros(len(g))
    if math.isfinite(float(g.sum())):
        p.add_(g, alpha=-0.0)
    r.send_multipart([ident, p.numpy()], copy=False)
"""


def interleaved(fns: dict[str, object], seconds: float, min_iters: int = 5) -> dict[str, float]:
    """Median seconds of one call of each of ``fns``, called in turn (after one warm-up round)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    t_end = time.perf_counter() + seconds
    while len(times[next(iter(fns))]) < min_iters or time.perf_counter() < t_end:
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def thread_cpu(pids: dict[int, str]) -> dict[str, float]:
    """CPU seconds so far of the threads of ``pids`` ({pid: role}), summed per role and thread kind."""
    out: dict[str, float] = {}
    for pid, role in pids.items():
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                name, cpu = stat_cpu_s(f"/proc/{pid}/task/{tid}/stat")
            except OSError:  # (a thread that just ended)
                continue
            kind = "main" if int(tid) == pid else "zmq_io" if name.startswith("ZMQbg") else "other"
            out[f"{role}_{kind}"] = out.get(f"{role}_{kind}", 0.0) + cpu
    return out


def cpu_per_call(fn: Callable[[], None], n: int, pids: dict[int, str]) -> dict[str, float]:
    """CPU microseconds per call of ``fn`` (run ``n`` times alone) of each role's threads."""
    pids = {os.getpid(): "client", **pids}
    before = thread_cpu(pids)
    for _ in range(n):
        fn()
    after = thread_cpu(pids)
    return {k: round(1e6 * (v - before.get(k, 0.0)) / n, 1) for k, v in sorted(after.items())}


class Echo:
    """``n`` bare ROUTER echo processes and one DEALER to each (the transport's ceiling); with
    ``script=FLOOR``, the floor's minimal servers instead."""

    def __init__(self, n: int, script: str = ECHO):
        self.procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
                      for _ in range(n)]
        self.ctx = zmq.Context()
        self.socks = []
        for p in self.procs:
            s = self.ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.RCVTIMEO, 30_000)
            s.connect(f"tcp://127.0.0.1:{int(p.stdout.readline())}")
            self.socks.append(s)

    def round_trip(self, nbytes: int, land: bool = False):
        """One echo round trip of ``nbytes`` (split over the echo processes), as a callable;
        ``land``: each reply's values are copied into a buffer of their own."""
        share = [torch.randn(max(1, nbytes // 4 // len(self.socks))).numpy() * 1e-3 for _ in self.socks]
        dst = [np.empty_like(x) if land else None for x in share]

        def once() -> None:
            for s, payload in zip(self.socks, share, strict=True):
                s.send(payload, copy=False)
            for s, d in zip(self.socks, dst, strict=True):
                reply = s.recv(copy=False)
                if land:
                    np.copyto(d, np.frombuffer(reply.buffer, np.float32))

        return once

    def close(self) -> None:
        for s in self.socks:
            s.close(linger=0)
        self.ctx.term()
        for p in self.procs:
            p.kill()
            p.wait()


class PSJob:
    """Servers of one (size, servers, integrity) setting and a worker pushing one tensor."""

    def __init__(self, n_servers: int, nbytes: int, integrity: str, root: Path, keys: int = 1, tag: str = ""):
        run_dir = root / f"s{n_servers}-{nbytes}-{integrity}-{keys}{tag}"
        run_dir.mkdir(parents=True)
        cfg = Config.load(None, [f'--run.dir="{run_dir}"', f"--ps.servers={n_servers}", "--ps.mode=async",
                                 "--parallel.sync=ps", "--parallel.nproc=1", "--train.optimizer=sgd",
                                 "--train.momentum=0.0", "--train.weight_decay=0.0", "--ps.max_message_mb=256",
                                 f"--ps.integrity={integrity}"])
        (run_dir / "config.toml").write_text(cfg.to_toml())
        rows = max(1, nbytes // 4 // 256 // keys)  # ``keys`` parameters of rows x 256 (one when keys = 1)
        cols = 256 if keys > 1 else nbytes // 4 // rows
        self.params = [torch.nn.Parameter(torch.randn(rows, cols)) for _ in range(keys)]
        self.grads = [torch.randn_like(p) * 1e-3 for p in self.params]
        self.servers = local_servers(cfg, n_workers=1)
        self.group = self.servers.__enter__()
        self.client = PSClient(os.environ[ENDPOINTS_ENV].split(","), os.environ[SECRET_ENV].encode(), 0,
                               max_bytes=256 << 20)
        layout = place([ParamInfo(f"w{i}", tuple(p.shape)) for i, p in enumerate(self.params)], n_servers)
        # "ssp" on the worker side: push, then wait for the reply every time (no overlap)
        self.worker = PSWorker(self.client, layout, self.params, PushEncoder(cfg.compression), "ssp", False, False)
        self.worker.connect(0)
        self.bare: list[tuple] | None = None  # bare_round_trip's prepared pushes and reply buffers

    def round_trip(self) -> None:
        """Push the gradient, wait for the new parameters, install them."""
        for p, g in zip(self.params, self.grads, strict=True):
            p.grad = g
        self.worker.step(0.0, 1.0)

    def bare_round_trip(self) -> None:
        """The same exchange with a bare client (``--bare``): a prepared push (fresh header,
        the body built once) per server, then each reply's values copied into the parameter
        buffer -- no sessions, bookkeeping or checks on the worker's side, the real servers."""
        w, c = self.worker, self.client
        if self.bare is None:  # the bodies once, from the (fixed) gradients
            for p, g in zip(self.params, self.grads, strict=True):
                p.grad = g
            self.bare = [(w.bodies.body(i), torch.empty(w.reply_numel[i]).numpy()) for i in w.servers]
        w.clock += 1
        for i in w.servers:
            (recs, frecs, frames, packed), _ = self.bare[i]
            c.seq += 1
            h = Header(int(Msg.PUSH), worker=c.worker, incarnation=c.incarnation, seq=c.seq, clock=w.clock,
                       version=w.versions[i], key_start=w.key_ranges[i][0], key_count=w.key_ranges[i][1],
                       flags=int(Flag.PACKED) if packed else 0, f1=1.0)
            send(c.socks[i], encode(None, h, keys=recs, frame_recs=frecs, frames=frames, desc=w.bodies.desc(i, recs)))
        for i in w.servers:
            if not c.socks[i].poll(30_000):
                raise TimeoutError("no reply from the server")
            parts = c.socks[i].recv_multipart(copy=False)
            w.versions[i] = read_header(parts[0].buffer).version
            np.copyto(self.bare[i][1], np.frombuffer(parts[1].buffer, np.float32))
        w.clock_done = w.clock

    def close(self) -> None:
        self.client.close()
        self.servers.__exit__(None, None, None)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=1.0)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--sizes", default="4096,1048576,41943040")
    p.add_argument("--servers", default="1,2")
    p.add_argument("--modes", default="none,mac")
    p.add_argument("--keys", type=int, default=1, help="split the gradient into this many parameters")
    p.add_argument("--bare", action="store_true", help="also time a bare client against the same servers")
    p.add_argument("--floor", action="store_true", help="also time the least work of any PS (no protocol)")
    p.add_argument("--cpu", type=int, default=0, metavar="N", help="also measure CPU per round trip over N of each")
    a = p.parse_args()
    if a.cpu < 0:
        p.error("--cpu N needs N >= 0")
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory(prefix="ps-transport-") as tmp:
        for n_servers in [int(x) for x in a.servers.split(",")]:
            echo = Echo(n_servers)
            # each floor row its own processes: a row timed right after another on the same
            # processes would find them warm
            floors = {k: Echo(n_servers, FLOOR) for k in ("floor", "floor_nocopy")} if a.floor else {}
            try:
                for nbytes in [int(s) for s in a.sizes.split(",")]:
                    jobs = {m: PSJob(n_servers, nbytes, m, Path(tmp), a.keys) for m in a.modes.split(",")}
                    try:
                        fns = {"echo": echo.round_trip(nbytes), **{m: job.round_trip for m, job in jobs.items()}}
                        if a.bare:  # (its own job: the bare client must not share clocks with PSWorker's)
                            jobs["bare"] = PSJob(n_servers, nbytes, "none", Path(tmp), a.keys, tag="bare")
                            fns["bare"] = jobs["bare"].bare_round_trip
                        fns.update({k: f.round_trip(nbytes, land=k == "floor") for k, f in floors.items()})
                        rounds = [interleaved(fns, a.seconds) for _ in range(a.rounds)]
                        cpu = {}
                        if a.cpu > 0:
                            for k, fn in fns.items():
                                no_ps = {"echo": echo, **floors}.get(k)  # rows without a PS job
                                procs = no_ps.procs if no_ps is not None else jobs[k].group.procs
                                cpu[k] = cpu_per_call(fn, a.cpu, {p.pid: "server" for p in procs})
                    finally:
                        for job in jobs.values():
                            job.close()
                    for m in [*jobs, *floors]:
                        ratios = [r["echo"] / r[m] for r in rounds]
                        ps_s, echo_s = (statistics.median(r[k] for r in rounds) for k in (m, "echo"))
                        row = {"bytes": nbytes, "servers": n_servers, "keys": a.keys, "integrity": m,
                               "ratio": statistics.median(ratios), "ratios": ratios,
                               "ps_ms": 1000 * ps_s, "echo_ms": 1000 * echo_s, "ps_gb_s": 2 * nbytes / ps_s / 1e9}
                        if cpu:
                            row.update(cpu_us=cpu[m], echo_cpu_us=cpu["echo"])
                        rows.append(row)
                        print(json.dumps(row), file=sys.stderr, flush=True)
            finally:
                echo.close()
                for f in floors.values():
                    f.close()
    print(json.dumps({"rounds": a.rounds, "seconds": a.seconds, "results": rows}, indent=1, allow_nan=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
