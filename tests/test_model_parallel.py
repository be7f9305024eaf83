"""ZeRO 1/2/3, tensor, pipeline parallel and their combinations: parity with one process.

Every layout trains 10 fp32 steps on the same global batch as a single process and must
report the same losses within 1e-5.  To stay inside the test budget on 2 cores, the
multi-process layouts of one world size run one after another inside one set of worker
processes (each run is a real ``run_worker`` with its own process group), see
:func:`run_group`; the single-process references run in this process through ``launch``.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch

from paratrain.config import Config
from paratrain.training.launch import launch, prepare_data, prepare_run_dir
from tests.conftest import tiny_config

pytestmark = pytest.mark.slow  # multi-process runs: `make test-fast` leaves them out

STEPS = ["--train.steps=10", "--model.n_head=4", "--data.seq_len=16", "--checkpoint.keep=0"]
GPT = [*STEPS, "--data.batch_size=8"]
GPT_UNTIED = [*GPT, "--model.tie_embeddings=false", "--model.n_layer=4"]
S2S = [*STEPS, "--model.arch=seq2seq", '--data.source="synthetic:reverse"', "--data.task_len=4",
       "--data.seq_len=10", "--data.batch_size=8", "--data.num_samples=512"]
CKPT5 = ["--checkpoint.every=5", "--checkpoint.keep=2"]
# the scale doubles every 2 clean steps and halves on overflow: it changes within 5 steps
FP16_GROWING = ["--train.precision=fp16", "--train.loss_scale_growth_interval=2"]
ROOT = Path(__file__).resolve().parents[1]


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def assert_parity(ref: Path, run: Path, tol: float = 1e-5, steps: range = range(1, 11)) -> None:
    a, b = losses(ref), losses(run)
    assert summary(run)["status"] == "ok", summary(run)
    for s in steps:
        assert abs(a[s] - b[s]) < tol, (run.name, s, a[s], b[s])
    assert abs(summary(ref)["val_loss"] - summary(run)["val_loss"]) < tol, run.name  # eval, last stage included


def run_group(world: int, cfgs: list[Config], timeout: float = 300.0) -> None:
    """Run ``cfgs`` (all for ``world`` ranks) one after another in ``world`` worker processes.

    One launcher process imports torch and paratrain once and forks the ranks (imports are
    most of a tiny run's CPU time); it runs in its own session so a timeout kills all of it.
    """
    paths = []
    for cfg in cfgs:
        prepare_run_dir(cfg)
        prepare_data(cfg)
        paths.append(str(cfg.run_dir / "config.toml"))
    t0 = time.monotonic()
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1", MP_TEST_TIMEOUT=str(timeout))
    proc = subprocess.Popen([sys.executable, "-m", "tests.test_model_parallel", str(world), *paths], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            _, err = proc.communicate()
        assert proc.returncode == 0, f"group of {world} failed ({proc.returncode}): {err[-6000:]}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    print(f"group of {world}: {len(cfgs)} runs in {time.monotonic() - t0:.1f} s", file=sys.stderr)


def _group_main(world: int, paths: list[str]) -> int:
    """Fork ``world`` ranks that each train every config in ``paths`` in turn.

    Each run's process group rendezvous through a fresh file next to its config (no ports
    to collide with anything else on a shared machine); ``run_worker`` finds it initialized.
    """
    import faulthandler

    import torch.distributed as dist

    import paratrain.parallel.model_parallel  # noqa: F401  (the heavy imports, before forking)
    import paratrain.parallel.pipeline  # noqa: F401
    import paratrain.parallel.sharding  # noqa: F401
    import paratrain.parallel.tensor_parallel  # noqa: F401
    from paratrain.parallel import dist_checkpoint  # noqa: F401
    from paratrain.training import trainer as trainer_module

    # Keep every run's trainer alive until the rank exits (os._exit, no destructors): freeing a
    # DDP reducer frees its gloo group with the GIL held, and if gloo's worker thread is just then
    # dropping a collective whose tensors have Python objects (it needs the GIL) the join deadlocks.
    # A worker process exits after one run, so this only bites when one process trains many.
    kept = []
    init = trainer_module.Trainer.__init__

    def init_and_keep(self, *args, **kwargs):
        init(self, *args, **kwargs)
        kept.append(self)

    trainer_module.Trainer.__init__ = init_and_keep

    pids = {}
    for rank in range(world):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                faulthandler.dump_traceback_later(float(os.environ["MP_TEST_TIMEOUT"]) - 15, exit=True)
                faulthandler.register(signal.SIGUSR1)
                os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                                  LOCAL_WORLD_SIZE=str(world))
                for path in paths:
                    print(f"rank {rank}: {path}", file=sys.stderr, flush=True)
                    dist.init_process_group("gloo", init_method=f"file://{path}.rdzv", rank=rank, world_size=world,
                                            timeout=datetime.timedelta(seconds=120))
                    trainer_module.run_worker(Config.load(path))
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        pids[pid] = rank
    failed = 0
    while pids:
        pid, status = os.wait()
        pids.pop(pid, None)
        if status and not failed:
            failed = 1
            for other in pids:  # where the others are, then stop them (they would wait for the dead rank)
                os.kill(other, signal.SIGUSR1)
            time.sleep(1.0)
            for other in pids:
                os.kill(other, signal.SIGKILL)
    return failed


# ---- the runs -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus) -> Path:
    root = tmp_path_factory.mktemp("mp")
    t0 = time.monotonic()

    def cfg(name: str, base: list[str], *extra: str, from_ckpt: str = "") -> Config:
        if from_ckpt:  # resume that run's step-5 checkpoint under this layout
            extra = (*extra, f'--checkpoint.path="{root / from_ckpt / "checkpoints" / "step_5"}"')
        return tiny_config(root / name, None if "--model.arch=seq2seq" in base else corpus, *base, *extra)

    # single-process references (in this process)
    for name, base, extra in [("single", GPT, CKPT5), ("single_untied", GPT_UNTIED, ()), ("s2s_single", S2S, ()),
                              ("single_fp16", GPT, [*FP16_GROWING, *CKPT5]),
                              ("ac_full", GPT, ["--train.activation_checkpointing=full"]),
                              ("ac_selective", GPT, ["--train.activation_checkpointing=selective"])]:
        assert launch(cfg(name, base, "--parallel.nproc=1", *extra))["status"] == "ok"
    assert launch(cfg("single_fp16_resumed", GPT, "--parallel.nproc=1", *FP16_GROWING,
                      from_ckpt="single_fp16"))["status"] == "ok"
    dp2 = ["--parallel.nproc=2", "--data.batch_size=4"]
    pp2 = ["--parallel.nproc=2", "--parallel.pp=2", "--parallel.microbatches=4"]
    run_group(2, [
        cfg("zero1", GPT, *dp2, "--parallel.zero=1"),
        cfg("zero2", GPT, *dp2, "--parallel.zero=2"),
        cfg("zero3", GPT, *dp2, "--parallel.zero=3", *CKPT5),
        cfg("zero3_offload", GPT, *dp2, "--parallel.zero=3", "--parallel.cpu_offload=true"),
        cfg("zero2_fp16", GPT, *dp2, "--parallel.zero=2", "--train.precision=fp16"),
        cfg("tp2", GPT, "--parallel.nproc=2", "--parallel.tp=2", "--parallel.loss_parallel=true", *CKPT5),
        cfg("s2s_tp2", S2S, "--parallel.nproc=2", "--parallel.tp=2"),
        cfg("pp2_gpipe", GPT_UNTIED, *pp2, "--parallel.pp_schedule=gpipe"),
        cfg("pp2_1f1b", GPT_UNTIED, *pp2, "--parallel.pp_schedule=1f1b", "--train.activation_checkpointing=full",
            *CKPT5),
        cfg("pp2_interleaved", GPT_UNTIED, *pp2, "--parallel.pp_schedule=interleaved"),
        cfg("zero3_to_zero1", GPT, *dp2, "--parallel.zero=1", *CKPT5, from_ckpt="zero3"),
    ])
    # zero3 saved at step 5 on 2 ranks -> one process; tp2's step-5 checkpoint -> DDP on 4 ranks
    assert launch(cfg("zero3_to_single", GPT, "--parallel.nproc=1", from_ckpt="zero3"))["status"] == "ok"
    run_group(4, [
        cfg("tp4", GPT, "--parallel.nproc=4", "--parallel.tp=4", "--train.activation_checkpointing=selective"),
        cfg("s2s_tp4", S2S, "--parallel.nproc=4", "--parallel.tp=4"),
        cfg("dp2_tp2", GPT, "--parallel.nproc=4", "--parallel.tp=2", "--data.batch_size=4"),
        cfg("dp2_pp2", GPT_UNTIED, "--parallel.nproc=4", "--parallel.pp=2", "--data.batch_size=4"),
        cfg("tp2_to_dp4", GPT, "--parallel.nproc=4", "--data.batch_size=2", from_ckpt="tp2"),
        cfg("pp2_to_dp2tp2", GPT_UNTIED, "--parallel.nproc=4", "--parallel.tp=2", "--data.batch_size=4",
            from_ckpt="pp2_1f1b"),
    ])
    run_group(8, [cfg("dp2_tp2_pp2", GPT_UNTIED, "--parallel.nproc=8", "--parallel.tp=2", "--parallel.pp=2",
                      "--data.batch_size=4", "--parallel.microbatches=2")])
    print(f"model-parallel runs: {time.monotonic() - t0:.1f} s")
    return root


@pytest.mark.parametrize("name", ["zero1", "zero2", "zero3", "zero3_offload", "tp2", "tp4", "dp2_tp2"])
def test_gpt_layouts_match_single_process(runs, name):
    assert_parity(runs / "single", runs / name)


def test_fp16_loss_scaling_under_sharding(runs):
    # every rank skips the same overflowing steps (each sees only its gradient shard), and the
    # run trains like the single fp16 one (a skipped step shifts it a little: no exact parity)
    fp16 = summary(runs / "zero2_fp16")["fp16"]
    assert len(set(fp16["loss_scale"])) == 1 and len(set(fp16["skipped_steps"])) == 1, fp16
    a, b = losses(runs / "single_fp16"), losses(runs / "zero2_fp16")
    assert all(abs(a[s] - b[s]) < 0.2 for s in a) and b[10] < b[1] - 0.3, (a, b)


def test_fp16_resume_keeps_the_loss_scale(runs):
    # the scale backs off on overflow: a resume that restarted it at 2^16 would take other steps
    fp16, resumed = summary(runs / "single_fp16")["fp16"], summary(runs / "single_fp16_resumed")["fp16"]
    assert fp16["skipped_steps"][0] > 0 and fp16 == resumed, (fp16, resumed)
    assert_parity(runs / "single_fp16", runs / "single_fp16_resumed", tol=1e-6, steps=range(6, 11))


@pytest.mark.parametrize("name", ["s2s_tp2", "s2s_tp4"])
def test_seq2seq_tensor_parallel_matches_single_process(runs, name):
    assert_parity(runs / "s2s_single", runs / name)


@pytest.mark.parametrize("name", ["pp2_gpipe", "pp2_1f1b", "pp2_interleaved", "dp2_pp2", "dp2_tp2_pp2"])
def test_pipeline_layouts_match_single_process(runs, name):
    assert_parity(runs / "single_untied", runs / name)
    pipe = summary(runs / name)["pipeline"]
    assert pipe["bubble_theory"] == pytest.approx((2 - 1) / (pipe["microbatches"] * pipe["virtual_stages"]))
    assert pipe["bubble_measured"] > 0


def test_activation_checkpointing_does_not_change_losses(runs):
    assert_parity(runs / "single", runs / "ac_full", tol=1e-6)
    assert_parity(runs / "single", runs / "ac_selective", tol=1e-6)


def test_strategy_names_and_per_rank_memory(runs):
    expect = {"zero1": "zero1", "zero2": "zero2", "zero3": "fsdp", "tp2": "tp2", "dp2_tp2": "dp2-tp2",
              "pp2_1f1b": "pp2-1f1b", "pp2_interleaved": "pp2-interleaved", "dp2_pp2": "dp2-pp2-1f1b",
              "dp2_tp2_pp2": "dp2-tp2-pp2-1f1b"}
    for run, name in expect.items():
        s = summary(runs / run)
        assert s["strategy"] == name
        assert len(s["peak_rss_mb"]) == s["world_size"] and min(s["peak_rss_mb"]) > 50
    assert summary(runs / "dp2_tp2_pp2")["world_size"] == 8


def test_checkpoints_load_under_another_layout(runs):
    # steps 6..10 after the resume repeat the uninterrupted run's losses
    for run in ("zero3_to_single", "tp2_to_dp4", "zero3_to_zero1"):
        assert_parity(runs / "single", runs / run, steps=range(6, 11))
    assert_parity(runs / "single_untied", runs / "pp2_to_dp2tp2", steps=range(6, 11))
    # every layout also leaves the full model state dict for tools that read model.pt
    from paratrain.models import build_model

    state = torch.load(runs / "zero3" / "checkpoints" / "step_10" / "model.pt", weights_only=True)
    cfg = Config.load(runs / "zero3" / "config.toml")
    ref = torch.load(runs / "single" / "checkpoints" / "step_10" / "model.pt", weights_only=True)
    build_model(cfg.model, ref["tok_emb.weight"].shape[0], 0).load_state_dict(state)
    for k, v in ref.items():
        assert torch.allclose(v, state[k], atol=1e-5), k


if __name__ == "__main__":
    sys.exit(_group_main(int(sys.argv[1]), sys.argv[2:]))
