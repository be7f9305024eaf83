"""Hang diagnosis: one rank sleeps forever before a collective; the watchdog ends the job and names it."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from paratrain.training.watchdog import CollectiveLog, diagnose
from tests.conftest import TINY_MODEL


@pytest.mark.slow
def test_one_rank_hangs_the_job_exits_naming_it(tmp_path, corpus):
    run_dir = tmp_path / "hang"
    cmd = [sys.executable, "-m", "paratrain.cli", "train", *TINY_MODEL, f'--run.dir="{run_dir}"',
           f'--data.source="text:{corpus}/*.txt"', "--parallel.nproc=2", "--data.batch_size=2",
           "--train.steps=50", "--checkpoint.keep=0", "--train.hang_timeout_s=4",
           "--debug.hang_rank=1", "--debug.hang_at_step=3"]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=150)
    elapsed = time.monotonic() - t0
    assert proc.returncode != 0, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("paratrain: hang:")]
    assert lines, proc.stderr[-3000:]
    line = lines[0]
    assert "behind: rank 1 (step 2" in line and "_debug_hooks" in line, line
    assert "missing collective #" in line and "rank(s) 0 are waiting" in line, line
    # every rank dumped its stack and last collective; the summary carries the diagnosis
    assert "in _debug_hooks" in (run_dir / "hang" / "rank1.txt").read_text()
    assert "last collective #" in (run_dir / "hang" / "rank0.txt").read_text()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "error" and "behind: rank 1" in summary["error"]
    assert elapsed < 90, elapsed


def test_diagnose_names_the_rank_that_is_behind():
    now = time.time()

    def state(step, seq, where):
        hist = [{"seq": s, "name": "all_reduce", "bytes": 4 * s, "state": "done"} for s in range(1, seq + 1)]
        return {"step": step, "t": now, "coll": hist[-1] if hist else None, "history": hist, "where": where}

    states = {0: state(7, 15, "a.py:1 in f"), 1: state(7, 14, "trainer.py:9 in g"), 2: state(7, 15, "a.py:1 in f")}
    line = diagnose(states, 5)
    assert "behind: rank 1 (step 7" in line and "missing collective #15 all_reduce (60 B)" in line
    assert "rank(s) 0, 2 are waiting" in line
    assert "never reported" in diagnose({0: states[0], 1: None}, 5)
    assert "no rank is behind" in diagnose({0: states[0], 1: states[0]}, 5)


def test_collective_log_records_and_restores(monkeypatch):
    import torch
    import torch.distributed as dist

    calls = []
    monkeypatch.setattr(dist, "broadcast", lambda t, src=0, **kw: calls.append(t.numel()))
    original = dist.broadcast
    log = CollectiveLog()
    log.install()
    try:
        dist.broadcast(torch.zeros(10), src=0)
        dist.broadcast(torch.zeros(3, dtype=torch.float64), 0, async_op=True)
    finally:
        log.uninstall()
    assert dist.broadcast is original and calls == [10, 3]
    assert [c["seq"] for c in log.history] == [1, 2]
    assert log.history[0] | {"t": 0} == {"seq": 1, "name": "broadcast", "bytes": 40, "state": "done", "t": 0}
    assert log.last["bytes"] == 24 and log.last["state"] == "issued (async)"
