"""Parameter-server transport: push+pull round trips/s and GB/s, against a plain memory copy.

One worker (this process) pushes a gradient of 4 KB, 1 MB and 40 MB to 1 and 2 server
processes (async mode, SGD, lr 0: the server applies an update and sends the parameters
back) and waits for the reply, over and over.  GB/s counts both directions (gradient out,
parameters back).  ``copy_gb_s`` is ``torch.Tensor.copy_`` of the same bytes measured in the
same run; ``ratio_to_copy`` = PS GB/s / copy GB/s.  ``hmac_sha256_gb_s`` is the HMAC speed
here, which every message pays on both ends; ``raw_zmq_round_trips_per_s`` is a bare pyzmq
echo of the same bytes (no MAC, no update) for scale.

    python benchmarks/ps_transport.py [--seconds 2] [--sizes 4096,1048576,41943040] [--servers 1,2]
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from paratrain.config import Config  # noqa: E402
from paratrain.ps.client import PSClient  # noqa: E402
from paratrain.ps.launch import local_servers  # noqa: E402
from paratrain.ps.placement import ParamInfo, place  # noqa: E402
from paratrain.ps.strategy import ENDPOINTS_ENV, SECRET_ENV  # noqa: E402
from paratrain.ps.wire import PushEncoder  # noqa: E402
from paratrain.ps.worker import PSWorker  # noqa: E402


def timed(fn, seconds: float, min_iters: int = 3) -> float:
    """Seconds per call of ``fn`` (after one warm-up call), over at least ``seconds``."""
    fn()
    n, t0 = 0, time.perf_counter()
    while n < min_iters or time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    return (time.perf_counter() - t0) / n


def copy_gb_s(nbytes: int, seconds: float) -> float:
    src, dst = torch.randn(nbytes // 4), torch.empty(nbytes // 4)
    return nbytes / timed(lambda: dst.copy_(src), seconds, 10) / 1e9


def hmac_gb_s(seconds: float) -> float:
    data = os.urandom(8 << 20)
    return len(data) / timed(lambda: hmac.new(b"k" * 32, data, hashlib.sha256).digest(), seconds) / 1e9


def raw_zmq_round_trips(nbytes: int, seconds: float) -> float:
    """Round trips/s of a bare DEALER -> ROUTER echo of the same bytes (no MAC, no update)."""
    import threading

    import zmq

    ctx = zmq.Context()
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    for sock in (router, dealer):
        sock.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer.connect(f"tcp://127.0.0.1:{port}")
    stop = threading.Event()

    def echo() -> None:
        while not stop.is_set():
            if router.poll(50):
                router.send_multipart(router.recv_multipart(copy=False), copy=False)

    th = threading.Thread(target=echo, daemon=True)
    th.start()
    payload = torch.randn(nbytes // 4).numpy()
    try:
        sec = timed(lambda: (dealer.send(payload, copy=False), dealer.recv(copy=False)), seconds)
    finally:
        stop.set()
        th.join()
        router.close()
        dealer.close()
        ctx.term()
    return 1 / sec


def ps_round_trips(n_servers: int, nbytes: int, seconds: float, root: Path) -> dict[str, float]:
    run_dir = root / f"s{n_servers}-{nbytes}"
    cfg = Config.load(None, [f'--run.dir="{run_dir}"', f"--ps.servers={n_servers}", "--ps.mode=async",
                             "--parallel.sync=ps", "--parallel.nproc=1", "--train.optimizer=sgd",
                             "--train.momentum=0.0", "--train.weight_decay=0.0", "--ps.max_message_mb=256"])
    run_dir.mkdir(parents=True)
    (run_dir / "config.toml").write_text(cfg.to_toml())
    rows = max(1, nbytes // 4 // 256)
    param = torch.nn.Parameter(torch.randn(rows, nbytes // 4 // rows))
    grad = torch.randn_like(param) * 1e-3
    with local_servers(cfg, n_workers=1):
        endpoints = os.environ[ENDPOINTS_ENV].split(",")
        client = PSClient(endpoints, os.environ[SECRET_ENV].encode(), 0, max_bytes=256 << 20)
        try:
            layout = place([ParamInfo("w", tuple(param.shape))], n_servers)
            # "ssp" on the worker side: push, then wait for the reply every time (no overlap)
            w = PSWorker(client, layout, [param], PushEncoder(cfg.compression), "ssp", False, False)
            w.connect(0)

            def round_trip():
                param.grad = grad
                w.step(0.0, 1.0)

            sec = timed(round_trip, seconds)
        finally:
            client.close()
    moved = 2 * param.numel() * 4
    return {"round_trips_per_s": 1 / sec, "gb_s": moved / sec / 1e9, "ms_per_round_trip": sec * 1000}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--sizes", default="4096,1048576,41943040")
    p.add_argument("--servers", default="1,2")
    a = p.parse_args()
    torch.set_num_threads(1)
    out = {"hmac_sha256_gb_s": hmac_gb_s(a.seconds / 2), "results": []}
    with tempfile.TemporaryDirectory(prefix="ps-transport-") as tmp:
        for nbytes in [int(s) for s in a.sizes.split(",")]:
            copy = copy_gb_s(nbytes, a.seconds / 2)
            raw = raw_zmq_round_trips(nbytes, a.seconds / 2)
            for s in [int(x) for x in a.servers.split(",")]:
                r = ps_round_trips(s, nbytes, a.seconds, Path(tmp))
                r.update(bytes=nbytes, servers=s, copy_gb_s=copy, ratio_to_copy=r["gb_s"] / copy,
                         raw_zmq_round_trips_per_s=raw)
                out["results"].append(r)
                print(json.dumps(r), file=sys.stderr)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
