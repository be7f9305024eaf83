"""Starting a parameter-server job: local servers + workers, or roles by rank under torchrun.

Local (``paratrain train`` with ``parallel.sync = "ps"``): :func:`local_servers` starts
``ps.servers`` server processes (restarting any that dies, from its newest checkpoint of this
job) and puts their endpoints and the shared secret into the environment; the launcher then
runs the workers under its supervisor with the ``"each"`` policy: a dead worker is dropped
and the rest go on (``parallel.max_restarts`` > 0 restarts it; it rejoins and pulls fresh
parameters).

torchrun (multi-host, same config everywhere): ranks ``0 .. ps.servers-1`` are servers, the
rest are workers (worker rank = RANK - ps.servers).  Servers publish their address in the
rendezvous store torchrun already runs; ``ps.secret`` (or ``PARATRAIN_PS_SECRET``) must be
set to the same value on every node, and ``ps.bind`` to an address other hosts can reach.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from paratrain import checkpoint as ckpt
from paratrain.config import Config, ConfigError
from paratrain.processes import die_with_parent, restart_count, stop_processes
from paratrain.ps.server_main import check_resume, run_server
from paratrain.ps.strategy import ENDPOINTS_ENV, SECRET_ENV

MAX_SERVER_RESTARTS = 10
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def free_ports(host: str, n: int) -> list[int]:
    """``n`` TCP ports free on ``host`` right now (bound and released together)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _connect_host(bind: str) -> str:
    return "127.0.0.1" if bind in ("0.0.0.0", "*", "::", "") else bind


def resume_source(cfg: Config) -> Path | None:
    """The checkpoint the trainer will resume from (so servers start from the same one)."""

    if cfg.checkpoint.path:
        return Path(cfg.checkpoint.path)
    if cfg.checkpoint.resume:
        return ckpt.latest(cfg.run_dir / "checkpoints")
    return None


class ServerGroup:
    """The local server processes of one job, restarted when they die."""

    def __init__(self, cfg: Config, n_workers: int, secret: str):
        ps = cfg.ps
        self.cfg, self.n_workers, self.secret = cfg, n_workers, secret
        self.run_dir = cfg.run_dir.resolve()
        self.job_id = uuid.uuid4().hex[:12]
        self.initial = resume_source(cfg)
        check_resume(self.initial, ps.servers)  # one line now, not a crash loop of servers later
        (self.run_dir / "ps").mkdir(parents=True, exist_ok=True)
        self.tmp = None
        if ps.transport == "ipc":
            self.tmp = tempfile.mkdtemp(prefix="paratrain-ps-")
            os.chmod(self.tmp, 0o700)
            self.bind = [f"ipc://{self.tmp}/server{i}.sock" for i in range(ps.servers)]
            self.endpoints = list(self.bind)
        else:
            if ps.bind not in LOOPBACK:
                print(f"paratrain: warning: parameter servers listen on {ps.bind} (ps.bind), not loopback",
                      file=sys.stderr)
            host = _connect_host(ps.bind)
            ports = [ps.port + i for i in range(ps.servers)] if ps.port else free_ports(host, ps.servers)
            self.bind = [f"tcp://{ps.bind}:{p}" for p in ports]
            self.endpoints = [f"tcp://{host}:{p}" for p in ports]
        self.procs: list[subprocess.Popen | None] = [None] * ps.servers
        self.restarts = [0] * ps.servers
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self._monitor = threading.Thread(target=self._watch, name="ps-servers", daemon=True)

    def start(self) -> None:
        for i in range(len(self.procs)):
            self._spawn(i)
        self._monitor.start()

    def _spawn(self, i: int) -> None:
        log = self.run_dir / "ps" / f"server{i}.log"
        cmd = [sys.executable, "-m", "paratrain.ps.server_main", "--config", str(self.run_dir / "config.toml"),
               "--index", str(i), "--endpoint", self.bind[i], "--workers", str(self.n_workers),
               "--servers", str(len(self.procs)), "--restart-count", str(self.restarts[i]),
               "--resume", str(self.initial or ""), "--job-id", self.job_id, "--log", str(log)]
        env = dict(os.environ, **{SECRET_ENV: self.secret, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
        with open(log, "ab") as out:
            self.procs[i] = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=out,
                                             preexec_fn=lambda: die_with_parent(signal.SIGTERM))

    def _watch(self) -> None:
        while not self.stopping.wait(0.1):
            with self.lock:
                for i, p in enumerate(self.procs):
                    code = p.poll() if p is not None else None
                    if code is None or self.stopping.is_set():
                        continue
                    if self.restarts[i] >= MAX_SERVER_RESTARTS:
                        self.procs[i] = None
                        print(f"paratrain: parameter server {i} died {self.restarts[i] + 1} times; giving up",
                              file=sys.stderr)
                        continue
                    self.restarts[i] += 1
                    why = f"signal {-code}" if code < 0 else f"exit code {code}"
                    print(f"paratrain: parameter server {i} died ({why}); restarting it from its latest checkpoint",
                          file=sys.stderr)
                    self._spawn(i)

    def stop(self) -> None:
        """Terminate every server (SIGTERM, then SIGKILL after 3 s); idempotent."""
        self.stopping.set()
        with self.lock:
            stop_processes([p for p in self.procs if p is not None])
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)


@contextlib.contextmanager
def local_servers(cfg: Config, n_workers: int | None = None) -> Iterator[ServerGroup]:
    """Run the job's parameter servers for the duration of the block.

    The shared secret (``ps.secret``, or a fresh random one) and the endpoints go to the
    workers through ``PARATRAIN_PS_SECRET`` / ``PARATRAIN_PS_ENDPOINTS`` (never the run dir)."""
    secret = cfg.ps.secret or secrets.token_hex(32)
    group = ServerGroup(cfg, n_workers or cfg.parallel.nproc, secret)
    saved = {k: os.environ.get(k) for k in (SECRET_ENV, ENDPOINTS_ENV)}
    os.environ[SECRET_ENV] = secret
    os.environ[ENDPOINTS_ENV] = ",".join(group.endpoints)
    try:
        group.start()
        yield group
    finally:
        group.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---- torchrun ------------------------------------------------------------------------------------
def _advertise_host(master: str) -> str:
    """This host's address as seen on the route to the rendezvous master."""
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((master, 9))
        return s.getsockname()[0]
    return socket.gethostbyname(socket.gethostname())


def run_torchrun_role(cfg: Config) -> dict[str, Any] | None:
    """Under torchrun: serve as server ``RANK`` (< ps.servers) and return its summary, or -- for a
    worker -- publish nothing, point this process at the servers (``RANK`` becomes
    ``RANK - ps.servers``) and return None so the caller trains."""
    import torch.distributed as dist


    rank, world, n_servers = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), cfg.ps.servers
    if world <= n_servers:
        raise ConfigError(f"under torchrun, parallel.sync = 'ps' needs more processes than ps.servers "
                          f"({world} <= {n_servers}): ranks 0..{n_servers - 1} are servers, the rest workers")
    secret = os.environ.get(SECRET_ENV, "") or cfg.ps.secret
    if len(secret) < 16:
        raise ConfigError(f"under torchrun set ps.secret (or {SECRET_ENV}) to the same value of at least "
                          "16 characters on every node")
    master, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    store = dist.TCPStore(master, port, is_master=False, timeout=datetime.timedelta(seconds=300))
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "job")
    restarts = restart_count()
    prefix = f"paratrain/ps/{run_id}/{restarts}"
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    if rank < n_servers:
        bind = cfg.ps.bind
        host = _connect_host(bind) if bind in LOOPBACK else _advertise_host(master)
        p = cfg.ps.port + rank if cfg.ps.port else free_ports(_connect_host(bind), 1)[0]
        (cfg.run_dir / "ps").mkdir(exist_ok=True)
        log_path = cfg.run_dir / "ps" / f"server{rank}.log"
        run_server(cfg, rank, f"tcp://{bind}:{p}", secret.encode(), world - n_servers, n_servers,
                   restart_count=restarts, initial=resume_source(cfg), log_path=log_path, exit_when_done=True,
                   on_ready=lambda _: store.set(f"{prefix}/server{rank}", f"tcp://{host}:{p}"))
        return {"status": "ok", "role": f"server {rank}"}
    endpoints = [store.get(f"{prefix}/server{i}").decode() for i in range(n_servers)]
    os.environ.update({"RANK": str(rank - n_servers), "WORLD_SIZE": str(world - n_servers),
                       ENDPOINTS_ENV: ",".join(endpoints), SECRET_ENV: secret})
    return None
