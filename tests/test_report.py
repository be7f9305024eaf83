"""paratrain report: PNG plots that are valid images, referenced from report.md; clean errors."""

from __future__ import annotations

import json

from matplotlib.image import imread

from paratrain.cli import main


def fake_run(run_dir, with_staleness=True):
    run_dir.mkdir(parents=True)
    rows = []
    for step in range(1, 31):
        r = {"step": step, "loss": 5.0 / step ** 0.3, "lr": 1e-3, "tokens_per_s": 1000 + step,
             "step_ms": 10.0, "comm_bytes": 4096 * step}
        if with_staleness:
            r["staleness"] = step % 3
        if step % 10 == 0:
            r["val_loss"] = 4.0 / step ** 0.3
        rows.append(r)
    lines = [json.dumps(r) for r in rows] + ['{"step": 31, "loss": 1.0']  # a line cut by a crash
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    summary = {"status": "ok", "steps": 30, "final_loss": 1.8, "val_loss": 1.5, "peak_rss_mb": [300.0, 310.0, 120.0],
               "world_size": 2, "strategy": "ps-ssp", "goodput": 0.7,
               "recoveries": [{"attempt": 1, "failed_after_step": 13, "resumed_from_step": 10, "lost_s": 4.2}]}
    (run_dir / "summary.json").write_text(json.dumps(summary))


def test_report_writes_valid_pngs_referenced_from_the_markdown(tmp_path, capsys):
    run_dir = tmp_path / "run"
    fake_run(run_dir)
    assert main(["report", str(run_dir)]) == 0
    md = (run_dir / "report.md").read_text()
    pngs = ["loss.png", "tokens_per_s.png", "memory.png", "comm_bytes.png", "staleness.png"]
    for name in pngs:
        path = run_dir / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        img = imread(path)
        assert img.shape[0] > 100 and img.shape[1] > 100
        assert f"]({name})" in md
    assert "| strategy | ps-ssp |" in md and "| goodput | 0.7 |" in md
    assert "restart 1: failed after step 13, resumed from step 10, lost 4.2 s" in md
    assert "wrote" in capsys.readouterr().out


def test_report_without_staleness_and_to_another_dir(tmp_path):
    run_dir, out = tmp_path / "run", tmp_path / "out"
    fake_run(run_dir, with_staleness=False)
    assert main(["report", str(run_dir), "--out", str(out)]) == 0
    assert not (out / "staleness.png").exists() and (out / "loss.png").exists()
    assert "No parameter-server staleness" in (out / "report.md").read_text()


def test_report_errors_are_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing")]) == 2
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and "does not exist" in err and "not a paratrain run dir" in err


def test_monitor_adds_mfu_and_memory_and_feeds_tensorboard(monkeypatch, tmp_path):
    import pytest

    from paratrain.config import Config
    from paratrain.parallel import ParallelDims
    from paratrain.training import monitor

    logged = []

    class FakeWriter:
        def add_scalar(self, tag, value, step):
            logged.append(("scalar", tag, value, step))

        def add_histogram(self, tag, values, step):
            logged.append(("hist", tag, sorted(values.tolist()), step))

        def close(self):
            logged.append(("closed",))

    monkeypatch.setattr(monitor, "_tensorboard", lambda run_dir: FakeWriter())
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    cfg = Config.load(None, [f'--run.dir="{tmp_path}"'])
    m = monitor.RunMonitor(cfg, ParallelDims(), 0.0, 0, peak_flops=1e9, flops_per_token=1e3)
    record = {"step": 1, "loss": 2.0, "tokens_per_s": 1000.0, "val_loss": 1.5, "ps_staleness_hist": {"0": 2, "3": 1}}
    m.step_end(1, 0.1, record)
    assert record["mfu"] == pytest.approx(1e-3) and record["rss_mb"] > 0
    assert ("scalar", "train/loss", 2.0, 1) in logged and ("scalar", "val/val_loss", 1.5, 1) in logged
    assert ("scalar", "train/mfu", record["mfu"], 1) in logged
    assert ("hist", "train/ps_staleness_hist", [0.0, 0.0, 3.0], 1) in logged
    summary = m.summary()
    m.close()
    assert logged[-1] == ("closed",)
    assert summary["restarts"] == 0 and summary["productive_s"] == pytest.approx(0.1)
    assert 0 < summary["goodput"] <= 1 and (tmp_path / "goodput.json").is_file()


def test_report_of_odd_files_is_written_or_refused_in_one_line(tmp_path, capsys):
    (tmp_path / "list").mkdir()
    (tmp_path / "list" / "summary.json").write_text("[1, 2]")
    assert main(["report", str(tmp_path / "list")]) == 2
    assert "summary.json is not a JSON object" in capsys.readouterr().err
    odd = tmp_path / "odd"  # values of the wrong type or out of range are left out, not fatal
    odd.mkdir()
    rows = [{"step": "x", "loss": 1.0}, [1, 2], {"step": 1, "loss": float("nan"), "tokens_per_s": 1e308},
            {"step": 2, "loss": 2.0, "staleness": {"a": 1}}, {"step": 3, "loss": 1.5, "staleness": float("inf")}]
    (odd / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (odd / "summary.json").write_text(json.dumps({"status": "ok", "peak_rss_mb": ["x", 10.0], "world_size": "two",
                                                  "recoveries": [5, {"attempt": 1}], "staleness_hist": {"1": 1e400}}))
    assert main(["report", str(odd)]) == 0
    md = (odd / "report.md").read_text()
    assert "](loss.png)" in md and "](memory.png)" in md and "restart 1:" in md
