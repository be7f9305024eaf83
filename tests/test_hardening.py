"""Crashed launchers, run directories that never mix, and bad input: one test per case.

Every bad-input case must end with one line naming the problem (exit code 2) and leave what was
on disk as it was."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from paratrain import checkpoint as ckpt
from paratrain import cli
from paratrain.config import Config, ConfigError
from paratrain.data.prepare import prepare
from paratrain.data.shards import TokenStream
from paratrain.training import rundir
from tests.conftest import TINY_MODEL

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["train", *TINY_MODEL, "--data.batch_size=4", "--parallel.nproc=1", "--train.steps=3"]


def train(run_dir: Path, corpus: Path, *extra: str) -> int:
    """``paratrain train`` in this process (nproc = 1 unless ``extra`` says otherwise)."""
    return cli.main([*TRAIN, f"--run.dir={run_dir}", f'--data.source="text:{corpus}/*.txt"', *extra])


def one_line(capsys, code: int, expect: str) -> str:
    """The run's stderr is one `paratrain: error:` line containing ``expect`` (exit code ``code``)."""
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("paratrain: error:") and "\n" not in err and "Traceback" not in err, err
    assert expect in err, err
    return err


def snapshot(d: Path) -> dict[str, str]:
    """sha256 of every file under ``d`` (minus the lock), to show that nothing changed."""
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file() and p.name != rundir.LOCK_FILE}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus) -> Path:
    """A finished 3-step run with checkpoints at steps 2 and 3 (copied by each test that changes it)."""
    d = tmp_path_factory.mktemp("trained") / "run"
    assert train(d, corpus, "--checkpoint.every=2") == 0
    return d


def copy_run(trained: Path, tmp_path: Path) -> Path:
    d = tmp_path / "run"
    shutil.copytree(trained, d)
    return d


def _children(pid: int) -> list[int]:
    kids = []
    for p in Path("/proc").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            if p.name.isdigit() and int((p / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(p.name))
    return kids


def _running(pid: int) -> bool:
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) != "Z"
    except OSError:
        return False


# ---- 5. orphaned workers, one writer per run dir ------------------------------------------------------
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_die_with_their_launcher(tmp_path, corpus):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "paratrain.cli", *TRAIN, "--parallel.nproc=2", "--train.steps=1000000",
           f"--run.dir={run}", f'--data.source="text:{corpus}/*.txt"']
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    launcher = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    workers: list[int] = []
    try:
        deadline = time.time() + 120
        metrics = run / "metrics.jsonl"
        while not (metrics.exists() and metrics.stat().st_size) and time.time() < deadline:
            assert launcher.poll() is None, "the launcher ended early"
            time.sleep(0.2)
        workers = [w for w in _children(launcher.pid) if _running(w)]
        assert len(workers) == 2, workers  # the supervisor runs inside the launcher process
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait(timeout=10)
        deadline = time.time() + 5
        while any(_running(w) for w in workers) and time.time() < deadline:
            time.sleep(0.1)
        assert not any(_running(w) for w in workers), "workers outlived their launcher"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(launcher.pid, signal.SIGKILL)
        for w in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(w, signal.SIGKILL)
        launcher.wait(timeout=10)


_HOLDER = ("import sys, time; from pathlib import Path; from paratrain.training import rundir; "
           "rundir._acquire(Path(sys.argv[1])); print('held', flush=True); time.sleep(120)")


def _hold_in_child(run: Path) -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run)], stdout=subprocess.PIPE, text=True,
                             env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert child.stdout.readline().strip() == "held"
    return child


def test_second_run_into_a_locked_dir_refuses(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    child = _hold_in_child(run)
    try:
        one_line(capsys, train(run, corpus), f"in use by another run (pid {child.pid} on ")
        assert sorted(p.name for p in run.iterdir()) == [rundir.LOCK_FILE]  # nothing written
    finally:
        child.kill()
        child.wait(timeout=10)


def test_stale_lock_of_a_dead_job_is_taken_over(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    child = _hold_in_child(run)
    child.kill()  # SIGKILL: the lock file stays behind, naming a dead process
    child.wait(timeout=10)
    assert json.loads((run / rundir.LOCK_FILE).read_text())["pid"] == child.pid
    assert train(run, corpus) == 0
    assert f"taking over the stale lock of {run} left by pid {child.pid}" in capsys.readouterr().err
    assert not (run / rundir.LOCK_FILE).exists()  # released at the end of the run


# ---- 6. runs that never mix ----------------------------------------------------------------------
def test_fresh_run_into_a_dir_with_checkpoints_refuses(trained, tmp_path, corpus, capsys):
    run = copy_run(trained, tmp_path)
    before = snapshot(run)
    one_line(capsys, train(run, corpus), "holds checkpoints of an earlier run (newest: step_3)")
    assert snapshot(run) == before


def test_overwrite_clears_the_earlier_run(trained, tmp_path, corpus, capsys):
    run = copy_run(trained, tmp_path)
    (run / "notes.txt").write_text("mine")
    assert train(run, corpus, "--run.overwrite=true", "--train.steps=1", "--checkpoint.keep=1") == 0
    assert [p.name for p in ckpt.list_checkpoints(run / "checkpoints")] == ["step_1"]
    assert [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()] == [1]
    assert (run / "notes.txt").read_text() == "mine"  # only paratrain's own outputs are cleared


def test_resuming_a_finished_run_is_a_noop(trained, tmp_path, corpus, capsys):
    run = copy_run(trained, tmp_path)
    before = snapshot(run)
    assert train(run, corpus, "--checkpoint.resume=true", "--json") == 0
    out, err = capsys.readouterr()
    assert "already finished at step 3 (train.steps = 3); nothing to do" in err
    assert json.loads(out.splitlines()[0])["steps"] == 3
    assert snapshot(run) == before


def test_final_step_is_always_checkpointed(trained):
    # every = 2, steps = 3: step 2 periodically, step 3 because it is the last
    assert [p.name for p in ckpt.list_checkpoints(trained / "checkpoints")] == ["step_2", "step_3"]
    for every, keep, step, saved in ((100, 2, 250, True), (50, 2, 250, False), (0, 2, 7, True), (0, 0, 7, False)):
        c = Config.default().checkpoint
        c.every, c.keep = every, keep
        assert ckpt.final_save_due(c, step, 0) is saved, (every, keep, step)


def test_diverged_run_has_strict_json_and_exit_1(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    code = train(run, corpus, "--train.steps=40", "--train.lr=10", "--train.grad_clip=0", "--train.optimizer=sgd",
                 "--train.warmup_steps=0")
    assert code == 1
    assert "training failed: diverged: loss is nan" in capsys.readouterr().err

    def no_constants(name: str):
        raise AssertionError(f"non-strict JSON constant {name}")

    summary = json.loads((run / "summary.json").read_text(), parse_constant=no_constants)
    assert summary["status"] == "diverged" and summary["final_loss"] is None
    lines = (run / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(ln, parse_constant=no_constants) for ln in lines]
    assert records[-1]["loss"] is None and records[-1]["step"] == summary["steps"] < 40
    assert not (run / "checkpoints").exists()  # the diverged weights are not checkpointed


# ---- 7. bad input ---------------------------------------------------------------------------------
def test_non_finite_float_settings_are_refused():
    cfg = Config()
    floats = [(s.name, f.name) for s in dataclasses.fields(cfg) for f in dataclasses.fields(getattr(cfg, s.name))
              if f.type in ("float", float)]
    assert len(floats) >= 15 and ("train", "lr") in floats and ("ps", "heartbeat_s") in floats
    for section, key in floats:
        for bad in ("nan", "inf", "-inf"):
            with pytest.raises(ConfigError, match=rf"^{section}\.{key} = \S+ is not a finite number"):
                Config.load(None, [f"--{section}.{key}={bad}"])


def test_config_file_that_is_not_utf8(tmp_path, capsys):
    bad = tmp_path / "latin1.toml"
    bad.write_bytes('[run]\nname = "café"\n'.encode("latin-1"))
    one_line(capsys, cli.main(["train", "-c", str(bad)]), "is not UTF-8 text (byte 0xe9 at offset 17)")


def test_run_dir_naming_a_file(tmp_path, corpus, capsys):
    f = tmp_path / "results.txt"
    f.write_text("keep me")
    one_line(capsys, train(f, corpus), "is a file, not a directory")
    one_line(capsys, train(f / "sub", corpus), "is a file, not a directory")
    assert f.read_text() == "keep me"


def test_nccl_backend_without_cuda(tmp_path, corpus, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # this check must hold on GPU hosts too
    for nproc in (1, 2):
        one_line(capsys, train(tmp_path / "run", corpus, "--parallel.backend=nccl", f"--parallel.nproc={nproc}"),
                 "parallel.backend = 'nccl' needs CUDA GPUs")
    assert not (tmp_path / "run").exists()


def test_prepare_of_an_empty_input_and_bad_options(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("")
    (src / "b.txt").write_text("")
    out = tmp_path / "shards"
    one_line(capsys, cli.main(["prepare", str(src), "--out", str(out)]), "file(s) are all empty")
    assert not out.exists()
    (src / "a.txt").write_text("some text")
    one_line(capsys, cli.main(["prepare", str(src), "--out", str(out), "--max-memory-mb", "nan"]),
             "max_memory_mb = nan must be a positive number of MB")
    one_line(capsys, cli.main(["prepare", str(src), "--out", str(out), "--tokenizer", "bpe:x"]),
             "the BPE vocabulary size must be a whole number")
    one_line(capsys, cli.main(["prepare", str(src), "--out", str(out), "--tokenizer", "bpe:5"]),
             "BPE vocab size 5 must be between 300")
    assert not out.exists()  # (refused before anything was written)


def _resume(run: Path, corpus: Path, *extra: str) -> int:
    return train(run, corpus, "--checkpoint.resume=true", "--train.steps=5", *extra)


def test_checkpoint_manifest_that_is_empty(trained, tmp_path, corpus, capsys):
    run = copy_run(trained, tmp_path)
    (run / "checkpoints" / "step_3" / "manifest.json").write_text("{}")
    before = snapshot(run)
    one_line(capsys, _resume(run, corpus), "step_3: manifest.json does not list the checkpoint's files")
    assert snapshot(run) == before


def test_checkpoint_meta_with_a_bad_step(trained, tmp_path, corpus, capsys):
    run = copy_run(trained, tmp_path)
    d = run / "checkpoints" / "step_3"
    for bad in (-1, "3", 3.5, 7, None):
        meta = json.loads((d / "meta.json").read_text())
        meta["step"] = bad
        (d / "meta.json").write_text(json.dumps(meta))
        manifest = json.loads((d / "manifest.json").read_text())  # checksums right: only the step is wrong
        manifest["files"]["meta.json"] = {"sha256": ckpt.sha256_file(d / "meta.json"),
                                          "bytes": (d / "meta.json").stat().st_size}
        (d / "manifest.json").write_text(json.dumps(manifest))
        before = snapshot(run)
        one_line(capsys, _resume(run, corpus), f"meta.json has step {bad!r}, not the whole number 3")
        assert snapshot(run) == before


def test_checkpoint_of_a_different_model_shape(trained, tmp_path, corpus, capsys):
    run = copy_run(trained, tmp_path)
    ckpts = snapshot(run / "checkpoints")
    # two workers: the error is raised in a worker and reported by the launcher as its own line
    err = one_line(capsys, _resume(run, corpus, "--model.d_ff=96", "--parallel.nproc=2"),
                   "has shape [64, 32] but this model's has [96, 32]")
    assert "tensor 'layers.0.ffn.fc1.weight'" in err and "resume with the [model] settings it was trained with" in err
    assert snapshot(run / "checkpoints") == ckpts


@pytest.fixture()
def shards(tmp_path, corpus) -> Path:
    out = tmp_path / "shards"
    f = sorted(corpus.glob("*.txt"))[0]
    meta = prepare([f], out, shard_tokens=f.stat().st_size // 3 + 1)
    assert 2 <= len(meta["shards"]) <= 4  # the sampled check hashes up to 4 shards: here all of them
    return out


def _poke(shards: Path, value: int, fix_sha: bool) -> None:
    """Write token ``value`` into the middle of the first shard (and update its sha256 if asked)."""
    f = shards / "shard_00000.bin"
    tokens = np.fromfile(f, dtype="<u2")
    i = len(tokens) // 2
    while tokens[i] == value:  # the file must change
        i += 1
    tokens[i] = value
    tokens.tofile(f)
    if fix_sha:
        meta = json.loads((shards / "meta.json").read_text())
        meta["shards"][0]["sha256"] = ckpt.sha256_file(f)
        (shards / "meta.json").write_text(json.dumps(meta))


def test_token_ids_outside_the_vocabulary(shards, tmp_path, corpus, capsys):
    _poke(shards, 60_000, fix_sha=True)
    for mode in ("sample", "full"):
        with pytest.raises(ConfigError, match="has token id 60000 in shard_00000.bin, outside its vocabulary of"):
            TokenStream(shards, verify=mode)
    code = train(tmp_path / "run", corpus, f'--data.source="shards:{shards}"')
    one_line(capsys, code, "outside its vocabulary")


def test_token_shard_with_a_wrong_sha256(shards, tmp_path, corpus, capsys):
    _poke(shards, 65, fix_sha=False)
    for mode in ("sample", "full"):  # with few shards the sampled check hashes all of them
        with pytest.raises(ConfigError, match="shard_00000.bin with a wrong sha256"):
            TokenStream(shards, verify=mode)
    one_line(capsys, train(tmp_path / "run", corpus, f'--data.source="shards:{shards}"', "--data.verify=full"),
             "wrong sha256")


def test_json_output_into_a_closed_pipe(tmp_path, corpus):
    plan = ["plan", "--layers", "2", "--hidden", "64", "--heads", "2", "--json"]
    run = tmp_path / "run"
    train = [*TRAIN, "--json", f"--run.dir={run}", f'--data.source="text:{corpus}/*.txt"']
    # plan: 141 (128 + SIGPIPE) as for any filter; train: its progress lines met the closed pipe first,
    # after which the run prints nowhere and ends as it would have (0)
    for args, code in ((plan, 141), (train, 0)):
        p = subprocess.Popen([sys.executable, "-m", "paratrain.cli", *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        p.stdout.close()  # the reader left before the first byte (`| head -c 0`)
        err = p.stderr.read().decode()
        assert p.wait(timeout=120) == code and "Traceback" not in err, err
    assert json.loads((run / "summary.json").read_text())["status"] == "ok"
