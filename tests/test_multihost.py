"""Two hosts on one machine: network namespaces joined by a veth pair, torchrun --nnodes=2.

Needs root and iproute2 (skipped otherwise).  Uses the settings gloo needs across namespaces
(without them the host name resolves to 127.0.0.1 and the job hangs): ``--rdzv-conf=is_host=1``
on node 0, ``--local-addr`` on both nodes, ``GLOO_SOCKET_IFNAME``.  All traffic stays on the veth
pair inside the two namespaces, and the namespaces are always deleted.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import TINY_MODEL

pytestmark = pytest.mark.slow  # multi-process runs: `make test-fast` leaves them out

SUBNET = "10.250.77"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=15)


@pytest.fixture
def two_hosts():
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2")
    tag = str(os.getpid() % 100000)
    hosts = {"a": (f"ptA{tag}", f"{SUBNET}.1", f"vpa{tag}"), "b": (f"ptB{tag}", f"{SUBNET}.2", f"vpb{tag}")}
    try:
        _ip("netns", "add", hosts["a"][0])
    except (subprocess.CalledProcessError, OSError) as e:
        pytest.skip(f"ip netns unavailable: {e}")
    try:
        _ip("netns", "add", hosts["b"][0])
        _ip("link", "add", hosts["a"][2], "type", "veth", "peer", "name", hosts["b"][2])
        for ns, addr, dev in hosts.values():
            _ip("link", "set", dev, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield hosts
    finally:
        for ns, _, _ in hosts.values():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=15)
        subprocess.run(["ip", "link", "del", hosts["a"][2]], capture_output=True, timeout=15)


def run_two_hosts(hosts, tmp_path, train_args, nproc=(1, 1), timeout=150):
    """torchrun on both 'hosts' (node 0 hosts the rendezvous); returns (return codes, logs)."""
    port = random.randint(20000, 40000)
    master = hosts["a"][1]
    procs, logs = [], []
    for i, (name, (ns, addr, dev)) in enumerate(hosts.items()):
        cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "torch.distributed.run", "--nnodes=2",
               f"--nproc-per-node={nproc[i]}", "--rdzv-backend=c10d", f"--rdzv-endpoint={master}:{port}",
               f"--rdzv-id=netns{port}", f"--rdzv-conf=is_host={int(i == 0)}", f"--local-addr={addr}",
               "--max-restarts=0", "-m", "paratrain.cli", "train", *train_args]
        log = tmp_path / f"{name}.log"
        logs.append(log)
        env = dict(os.environ, GLOO_SOCKET_IFNAME=dev, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1")
        procs.append(subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env,
                                      start_new_session=True))
    deadline = time.monotonic() + timeout
    try:
        codes = [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    except subprocess.TimeoutExpired:
        codes = [None, None]
        for p in procs:  # PYTHONFAULTHANDLER: SIGABRT makes every process print its stack into the log
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGABRT)
        time.sleep(3)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)
    return codes, "\n".join(f"--- {log.name}\n{log.read_text()[-6000:]}" for log in logs)


def _prepared_corpus(corpus):
    from paratrain.data import cached_corpus

    src = f"text:{corpus}/*.txt"
    cached_corpus(src, "byte")  # once, before two hosts race to build it
    return src


def test_ddp_across_two_namespaces(two_hosts, tmp_path, corpus):
    run_dir = tmp_path / "ddp"
    args = [*TINY_MODEL, f'--run.dir="{run_dir}"', f'--data.source="{_prepared_corpus(corpus)}"',
            "--train.steps=8", "--data.batch_size=2", "--checkpoint.keep=0", "--train.hang_timeout_s=60"]
    codes, logs = run_two_hosts(two_hosts, tmp_path, args)
    assert codes == [0, 0], logs
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["world_size"] == 2 and summary["steps"] == 8
    assert summary["strategy"] == "ddp"


def test_parameter_server_and_workers_on_different_hosts(two_hosts, tmp_path, corpus):
    run_dir = tmp_path / "ps"
    args = [*TINY_MODEL, f'--run.dir="{run_dir}"', f'--data.source="{_prepared_corpus(corpus)}"',
            "--train.steps=6", "--data.batch_size=2", "--checkpoint.keep=0", "--parallel.sync=ps",
            "--ps.servers=1", "--ps.mode=sync", "--train.hang_timeout_s=60", '--ps.bind="0.0.0.0"',
            '--ps.secret="netns-test-shared-secret"']
    codes, logs = run_two_hosts(two_hosts, tmp_path, args, nproc=(1, 2))
    assert codes == [0, 0], logs
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["steps"] == 6 and summary["strategy"].startswith("ps")
