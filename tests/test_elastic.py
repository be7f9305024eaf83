"""Elastic recovery: SIGKILL one of 2 workers mid-run; the agent restarts both, they resume and finish.

The losses after the restart equal an uninterrupted run's (deterministic mode), and
summary.json carries the goodput with the lost time of the recovery.
"""

from __future__ import annotations

import json

import pytest

from paratrain.training.launch import launch
from tests.conftest import tiny_config

pytestmark = pytest.mark.slow  # multi-process runs: `make test-fast` leaves them out

COMMON = ["--train.steps=20", "--checkpoint.every=10", "--checkpoint.keep=2", "--train.deterministic=true",
          "--parallel.nproc=2", "--data.batch_size=4"]
KILL = ["--parallel.max_restarts=1", "--debug.kill_rank=1", "--debug.kill_at_step=14"]


def losses(run_dir) -> dict[int, float]:
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus):
    run_dir = tmp_path_factory.mktemp("elastic") / "uninterrupted"
    summary = launch(tiny_config(run_dir, corpus, *COMMON))
    assert summary["status"] == "ok"
    return run_dir, summary


def check_recovered(run_dir, summary, ref_dir, tol):
    assert summary["status"] == "ok", summary
    a, b = losses(ref_dir), losses(run_dir)
    assert sorted(b) == list(range(1, 21))
    for step in range(11, 21):
        assert abs(a[step] - b[step]) < tol, (step, a[step], b[step])
    assert summary["restarts"] == 1 and len(summary["recoveries"]) == 1
    rec = summary["recoveries"][0]
    assert rec["resumed_from_step"] == 10 and rec["failed_after_step"] == 13  # rank 1 died before step 14
    assert rec["lost_s"] > 0 and summary["lost_s"] == pytest.approx(rec["lost_s"])
    assert 0 < summary["goodput"] < 1 and summary["productive_s"] > 0


def test_killed_worker_is_restarted_and_the_run_finishes(reference, corpus):
    ref_dir, ref = reference
    assert ref["restarts"] == 0 and ref["recoveries"] == [] and 0 < ref["goodput"] < 1
    run_dir = ref_dir.parent / "killed"
    summary = launch(tiny_config(run_dir, corpus, *COMMON, *KILL))
    check_recovered(run_dir, summary, ref_dir, 1e-6)
    # the redone steps 11..13 are not productive: productive time covers 20 steps, not 23
    assert summary["productive_s"] < summary["wall_s"]


def test_killed_zero_worker_recovers(reference, corpus):
    ref_dir, _ = reference
    run_dir = ref_dir.parent / "zero"
    summary = launch(tiny_config(run_dir, corpus, *COMMON, *KILL, "--parallel.zero=1"))
    check_recovered(run_dir, summary, ref_dir, 1e-5)  # ZeRO-1 vs DDP: parity tolerance
