"""The rank side of ``paratrain bench comm``: time collectives, p2p and PS push/pull on one process group.

Bandwidths follow the nccl-tests definitions (GB/s = 1e9 bytes/s).  ``size`` is the whole
message: the all_reduce / broadcast buffer, the gathered output of all_gather, the input of
reduce_scatter, the message each rank sends in send_recv, the tensor a worker pushes (and
pulls back) in ps_push_pull.  ``algbw = size / time``; ``busbw = algbw * factor``:

======================  =======================  ==========================================
op                      factor                   why
======================  =======================  ==========================================
all_reduce              2 (n - 1) / n            ring: reduce-scatter + all-gather
all_gather              (n - 1) / n              each rank receives n - 1 of n pieces
reduce_scatter          (n - 1) / n
broadcast               1
send_recv               1                        ring: each rank sends to rank + 1
ps_push_pull            2 (n - 1)                rank 0 serves n - 1 workers; bytes on its link
======================  =======================  ==========================================

Time per op is the slowest rank's mean over the timed iterations (at least 3, chosen so a
size takes about ``target_s``).
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import torch
import torch.distributed as dist

OPS = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "send_recv", "ps_push_pull")


def bus_factor(op: str, n: int) -> float:
    """busbw / algbw for ``op`` on ``n`` ranks (nccl-tests definitions; see the module docstring)."""
    if op == "all_reduce":
        return 2 * (n - 1) / n
    if op in ("all_gather", "reduce_scatter"):
        return (n - 1) / n
    if op == "ps_push_pull":
        return 2.0 * (n - 1)
    return 1.0


def memcpy_gbps(device: torch.device, nbytes: int = 64 << 20, repeats: int = 3) -> float:
    """Memory-copy bandwidth of this process (bytes copied per second / 1e9), best of ``repeats``."""
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _PSServer:
    """A minimal ZeroMQ ROUTER on rank 0 that acks pushes and answers pulls (the PS traffic pattern)."""

    def __init__(self, host: str):
        import zmq

        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.port = self.sock.bind_to_random_port(f"tcp://{host}")
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        import zmq

        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        replies: dict[int, torch.Tensor] = {}
        while not self.stop.is_set():
            if not poller.poll(50):
                continue
            ident, kind, *rest = self.sock.recv_multipart(copy=False)
            if kind.bytes == b"push":
                self.sock.send_multipart([ident, b"ok"])
            else:  # pull: reply with a tensor of the requested size
                n = int(rest[0].bytes)
                buf = replies.setdefault(n, torch.zeros(n // 4))
                self.sock.send_multipart([ident, memoryview(buf.numpy()).cast("B")], copy=False)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        self.sock.close()
        self.ctx.term()


def _ps_host(rank_world_local: tuple[int, int, int]) -> str:
    _, world, local = rank_world_local
    if local >= world:  # every rank on this host
        return "127.0.0.1"
    import socket

    return socket.gethostbyname(os.environ.get("MASTER_ADDR", "127.0.0.1"))


class CommBench:
    """Runs on every rank of an initialized process group; rank 0 collects the results."""

    def __init__(self, device: torch.device, target_s: float = 0.25, max_iters: int = 200, warmup: int = 1):
        self.device, self.target_s, self.max_iters, self.warmup = device, target_s, max_iters, warmup
        self.rank, self.n = dist.get_rank(), dist.get_world_size()
        self.ps: _PSServer | None = None
        self.ps_sock = None

    # -- helpers
    def _max(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t[0])

    def _timed(self, fn, iters: int) -> float:
        dist.barrier()
        _sync(self.device)
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        _sync(self.device)
        return self._max((time.perf_counter() - t0) / iters)

    def _make(self, op: str, nbytes: int):
        """(the callable doing one op, the exact message bytes) for ``op`` at about ``nbytes``."""
        n, dev = self.n, self.device
        count = max(n, nbytes // 4 // n * n)  # divisible by n for the gather/scatter ops
        if op == "all_reduce":
            buf = torch.ones(count, device=dev)
            return (lambda: dist.all_reduce(buf)), count * 4
        if op == "all_gather":
            out, inp = torch.empty(count, device=dev), torch.ones(count // n, device=dev)
            gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
            return (lambda: gather(out, inp)), count * 4
        if op == "reduce_scatter":
            inp, out = torch.ones(count, device=dev), torch.empty(count // n, device=dev)
            scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
            return (lambda: scatter(out, inp)), count * 4
        if op == "broadcast":
            buf = torch.ones(count, device=dev)
            return (lambda: dist.broadcast(buf, src=0)), count * 4
        if op == "send_recv":
            send, recv = torch.ones(count, device=dev), torch.empty(count, device=dev)
            nxt, prv = (self.rank + 1) % n, (self.rank - 1) % n

            def ring():
                for w in [dist.isend(send, nxt), dist.irecv(recv, prv)]:
                    w.wait()

            return ring, count * 4
        if op == "ps_push_pull":
            return self._ps_op(count * 4), count * 4
        raise ValueError(op)

    def _ps_op(self, nbytes: int):
        if self.rank == 0:
            return lambda: None  # the server thread does rank 0's work
        payload = memoryview(torch.ones(nbytes // 4).numpy()).cast("B")
        size = str(nbytes).encode()
        sock = self.ps_sock

        def push_pull():
            sock.send_multipart([b"push", payload], copy=False)
            sock.recv()
            sock.send_multipart([b"pull", size])
            sock.recv(copy=False)

        return push_pull

    def _ps_start(self) -> None:
        import zmq

        host = _ps_host((self.rank, self.n, int(os.environ.get("LOCAL_WORLD_SIZE", self.n))))
        port = torch.zeros(1, dtype=torch.int64)
        if self.rank == 0:
            self.ps = _PSServer(host)
            port[0] = self.ps.port
        port = port.to(self.device)
        dist.broadcast(port, src=0)
        if self.rank != 0:
            self.ctx = zmq.Context()
            self.ps_sock = self.ctx.socket(zmq.DEALER)
            self.ps_sock.setsockopt(zmq.LINGER, 0)
            self.ps_sock.setsockopt(zmq.RCVTIMEO, 120_000)
            self.ps_sock.connect(f"tcp://{host}:{int(port[0])}")

    def _ps_stop(self) -> None:
        dist.barrier()
        if self.ps is not None:
            self.ps.close()
        if self.ps_sock is not None:
            self.ps_sock.close()
            self.ctx.term()

    # -- the run
    def run(self, ops: list[str], sizes: list[int], between=None) -> list[dict[str, Any]]:
        """Time every op at every size; ``between()`` runs on every rank before each op."""
        rows = []
        for op in ops:
            if between is not None:
                between()
            if op == "ps_push_pull":
                self._ps_start()
            try:
                for size in sizes:
                    fn, nbytes = self._make(op, size)
                    for _ in range(self.warmup):
                        fn()
                    probe = self._timed(fn, 1)
                    iters = int(min(self.max_iters, max(3, self.target_s / max(probe, 1e-9))))
                    t = self._timed(fn, iters)
                    algbw = nbytes / t / 1e9
                    rows.append({"op": op, "bytes": nbytes, "iters": iters, "time_us": t * 1e6,
                                 "algbw_gbps": algbw, "busbw_gbps": algbw * bus_factor(op, self.n)})
                    del fn
            finally:
                if op == "ps_push_pull":
                    self._ps_stop()
        return rows
