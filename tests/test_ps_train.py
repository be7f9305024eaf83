"""Parameter-server training end to end: real server and worker processes on real sockets.

Four launches, each checked for several things: sync mode equals one process on the global
batch (SGD, 1 server; AdamW, 2 servers), a worker killed with SIGKILL is dropped and the run
completes (sync and async), a server killed with SIGKILL restarts from its checkpoint and the
workers' replayed pushes keep the losses exactly on the uninterrupted path, and SSP never
lets a worker run more than ``staleness`` clocks ahead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from paratrain.training.launch import launch
from tests.conftest import tiny_config

pytestmark = pytest.mark.slow  # multi-process runs: `make test-fast` leaves them out

STEPS = 14
BASE = [f"--train.steps={STEPS}", "--model.n_layer=1", "--checkpoint.keep=2", "--ps.heartbeat_s=0.1",
        "--ps.dead_after_s=1.0"]
PS2 = ["--parallel.nproc=2", "--data.batch_size=4", "--parallel.sync=ps"]


def metrics(run_dir) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(run_dir) if "loss" in r}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus):
    root = tmp_path_factory.mktemp("ps")

    def run(name: str, *over: str) -> dict:
        return launch(tiny_config(root / name, corpus, *BASE, *over))

    out = {
        "ref_sgd": run("ref_sgd", "--parallel.nproc=1", "--data.batch_size=8", "--train.optimizer=sgd"),
        "ref_adamw": run("ref_adamw", "--parallel.nproc=1", "--data.batch_size=8", "--train.eval_every=3"),
        # sync, SGD, 1 server; worker 1 is SIGKILLed before step 12
        "sync_sgd": run("sync_sgd", *PS2, "--ps.mode=sync", "--train.optimizer=sgd", "--debug.kill_rank=1",
                        "--debug.kill_at_step=12", '--ps.secret="user-given-secret-abcdef"'),
        # sync, AdamW, 2 servers (two-phase clipping, pushes during backward); server 1 is SIGKILLed at step 7,
        # checkpoints every 4; logged every 2 steps and evaluated every 3, so most replies are installed by the
        # next forward (not by the logged-loss collective) and evals run right after a deferred push
        "sync_adamw": run("sync_adamw", *PS2, "--ps.mode=sync", "--ps.servers=2", "--checkpoint.every=4",
                          "--debug.kill_server=1", "--debug.kill_server_at_step=7", "--train.log_every=2",
                          "--train.eval_every=3"),
        # async, 2 servers, ipc transport, fp16 gradients; worker 1 is SIGKILLed before step 5;
        # rank 0 slowed a little so the run outlasts a few heartbeats (they carry per-worker stats)
        "async": run("async", *PS2, "--ps.mode=async", "--ps.servers=2", "--ps.transport=ipc",
                     "--compression.gradient=fp16", "--debug.kill_rank=1", "--debug.kill_at_step=5",
                     "--debug.delay_rank=0", "--debug.delay_ms=25"),
        # ssp, staleness 1, worker 1 slowed down
        "ssp": run("ssp", *PS2, "--ps.mode=ssp", "--ps.staleness=1", "--debug.delay_rank=1", "--debug.delay_ms=60"),
    }
    return root, out


def test_sync_matches_single_process_sgd_one_server_and_survives_a_dead_worker(runs):
    root, r = runs
    s = r["sync_sgd"]
    assert s["status"] == "ok" and s["strategy"] == "ps-sync" and s["steps"] == STEPS, s
    a, b = losses(root / "ref_sgd"), losses(root / "sync_sgd")
    assert sorted(b) == list(range(1, STEPS + 1))
    for step in range(1, 12):  # both workers alive: the same updates as one process on the global batch
        assert abs(a[step] - b[step]) < 1e-5, (step, a[step], b[step])
    assert s["ps_dropped_workers"] == [1] and s["ps_failed_workers"] == {"1": "killed by signal 9"}
    log = (root / "sync_sgd" / "ps" / "server0.log").read_text()
    assert "worker 1 dropped" in log
    assert "user-given-secret" not in (root / "sync_sgd" / "config.toml").read_text()
    assert "PARATRAIN_PS_SECRET" not in os.environ


def test_sync_adamw_two_servers_matches_even_across_a_server_crash(runs):
    root, r = runs
    s = r["sync_adamw"]
    assert s["status"] == "ok" and s["ps_servers"] == 2 and s["ps_overlap"] is True, s
    assert s["ps_server_restarts"] == [0, 1]
    log = (root / "sync_adamw" / "ps" / "server1.log").read_text()
    assert "killing myself" in log and "resumed from" in log and "step_4" in log
    m = [x for x in metrics(root / "sync_adamw") if "ps_log_mem_bytes" in x]  # the replay log lives on disk
    assert m and max(x["ps_log_mem_bytes"] for x in m) <= 3 * s["comm_bytes_per_step"] < max(
        x["ps_log_disk_bytes"] for x in m)
    assert not (root / "sync_adamw" / "ps" / "pushlog" / "worker0").exists()  # removed when the worker ends
    a, b = losses(root / "ref_adamw"), losses(root / "sync_adamw")
    assert sorted(b) == list(range(2, STEPS + 1, 2))
    assert sum(x["ps_early_pushes"] for x in m) > STEPS  # ps.overlap: most server pushes left during backward
    for step in b:  # replayed pushes (read back from the disk log): nothing acknowledged was lost
        assert abs(a[step] - b[step]) < 1e-5, (step, a[step], b[step])
    va = {x["step"]: x["val_loss"] for x in metrics(root / "ref_adamw") if "val_loss" in x}
    vb = {x["step"]: x["val_loss"] for x in metrics(root / "sync_adamw") if "val_loss" in x}
    assert sorted(vb) == [3, 6, 9, 12, 14]
    for step in vb:  # evals see the round's parameters, though step() returned before they came back
        assert abs(va[step] - vb[step]) < 1e-5, (step, va[step], vb[step])
    assert len(s["peak_rss_mb"]) == 4 and min(s["peak_rss_mb"]) > 20  # 2 workers + 2 servers


def test_async_run_completes_without_its_killed_worker(runs):
    root, r = runs
    s = r["async"]
    assert s["status"] == "ok" and s["strategy"] == "ps-async" and s["steps"] == STEPS, s
    assert s["ps_dropped_workers"] == [1] and "worker 1 dropped" in (root / "async" / "ps" / "server0.log").read_text()
    m = [x for x in metrics(root / "async") if "loss" in x]
    assert m[-1]["loss"] < m[0]["loss"] - 0.3
    assert all(k in m[-1] for k in ("ps_pushes_per_s", "ps_pull_ms", "ps_staleness_hist", "comm_bytes"))
    assert any("0" in x.get("ps_workers", {}) for x in m)  # per-worker stats, as server 0 has them
    assert s["comm_bytes_per_step"] > 0 and s["compression"] == "fp16"
    assert sum(s["ps_staleness_hist"].values()) > STEPS and max(int(k) for k in s["ps_staleness_hist"]) >= 1


def test_ssp_never_exceeds_its_staleness_bound(runs):
    root, r = runs
    s = r["ssp"]
    assert s["status"] == "ok" and s["strategy"] == "ps-ssp", s
    assert s["ps_max_clock_gap"] == 1  # the bound was reached (worker 1 is slow) and never exceeded
    assert all(int(g) <= 1 for g in s["ps_clock_gaps"])
    assert max(m.get("ps_clock_gap", 0) for m in metrics(root / "ssp")) <= 1
    m = losses(root / "ssp")
    assert m[STEPS] < m[1] - 0.3


def test_torchrun_roles_by_rank(tmp_path, corpus):
    """torchrun with 3 processes: rank 0 is the server, ranks 1-2 are workers 0-1."""
    from tests.conftest import TINY_MODEL

    run_dir = tmp_path / "torchrun"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=3", "--rdzv_backend=c10d",
           "--rdzv_endpoint=127.0.0.1:0", "-m", "paratrain.cli", "train", *TINY_MODEL, "--model.n_layer=1",
           "--train.steps=4", f"--run.dir={run_dir}", f"--data.source=text:{corpus}/*.txt",
           "--parallel.sync=ps", "--ps.mode=sync", "--data.batch_size=4"]
    env = dict(os.environ, PARATRAIN_PS_SECRET="torchrun-test-secret-0123456789")
    r = subprocess.run(cmd, env=env, timeout=300, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["status"] == "ok" and s["strategy"] == "ps-sync" and s["world_size"] == 2 and s["steps"] == 4
    assert len(s["peak_rss_mb"]) == 3  # 2 workers + 1 server
    log = (run_dir / "ps" / "server0.log").read_text()
    assert "worker 0 left" in log and "worker 1 left" in log
