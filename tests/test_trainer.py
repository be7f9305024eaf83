"""End-to-end training: DDP(2) parity with one process, kill + resume equality, corrupt checkpoints."""

from __future__ import annotations

import json

import pytest

from paratrain.cli import main
from paratrain.training.launch import launch
from tests.conftest import tiny_config

pytestmark = pytest.mark.slow  # multi-process runs: `make test-fast` leaves them out

STEPS = ["--train.steps=20", "--checkpoint.every=10", "--checkpoint.keep=3", "--train.deterministic=true"]


def losses(run_dir) -> dict[int, float]:
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus):
    """One single-process run on the global batch and DDP runs: plain, killed at 12, resumed."""
    root = tmp_path_factory.mktemp("runs")
    single = launch(tiny_config(root / "single", corpus, *STEPS, "--parallel.nproc=1", "--data.batch_size=8"))
    ddp = launch(tiny_config(root / "ddp", corpus, *STEPS, "--parallel.nproc=2", "--data.batch_size=4"))
    ddp2 = ["--parallel.nproc=2", "--data.batch_size=4"]
    kill = ["--debug.kill_rank=1", "--debug.kill_at_step=12"]
    killed = launch(tiny_config(root / "resumed", corpus, *STEPS, *ddp2, *kill))
    resumed = launch(tiny_config(root / "resumed", corpus, *STEPS, *ddp2, "--checkpoint.resume=true"))
    return root, single, ddp, killed, resumed


def test_ddp_matches_single_process(runs):
    root, single, ddp, _, _ = runs
    assert single["status"] == "ok" and ddp["status"] == "ok"
    a, b = losses(root / "single"), losses(root / "ddp")
    assert sorted(a) == list(range(1, 21)) == sorted(b)
    for step in range(1, 21):
        assert abs(a[step] - b[step]) < 1e-5, (step, a[step], b[step])
    assert a[20] < a[1]


def test_summary_has_contract_keys(runs):
    root, _, ddp, _, _ = runs
    summary = json.loads((root / "ddp" / "summary.json").read_text())
    for key in ["status", "steps", "final_loss", "val_loss", "tokens_per_s", "samples_per_s",
                "step_time_ms_median", "mfu", "peak_rss_mb", "comm_bytes_per_step", "world_size",
                "strategy", "wall_s"]:
        assert key in summary, key
    assert summary["strategy"] == "ddp" and summary["world_size"] == 2
    assert len(summary["peak_rss_mb"]) == 2 and min(summary["peak_rss_mb"]) > 50
    assert summary["comm_bytes_per_step"] > 0 and 0 < summary["mfu"] < 1
    assert (root / "ddp" / "config.toml").is_file()


def test_killed_worker_then_resume_repeats_the_uninterrupted_losses(runs):
    root, _, _, killed, resumed = runs
    assert killed["status"] == "error"
    assert resumed["status"] == "ok"
    a, b = losses(root / "ddp"), losses(root / "resumed")
    assert sorted(b) == list(range(1, 21))
    for step in range(11, 21):
        assert abs(a[step] - b[step]) < 1e-6, (step, a[step], b[step])


def test_corrupt_checkpoint_is_a_clean_error(runs, capsys):
    root = runs[0]
    model = root / "single" / "checkpoints" / "step_20" / "model.pt"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    args = ["train", "--checkpoint.resume=true", f'--run.dir="{root / "single"}"', "--parallel.nproc=1"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "corrupt or truncated" in err and err.count("\n") == 1
    model.write_bytes(bytes(data[: len(data) // 3]))
    assert main(args) == 2
    assert "corrupt or truncated" in capsys.readouterr().err
