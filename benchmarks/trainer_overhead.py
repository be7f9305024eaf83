"""How much does paratrain's trainer cost over a hand-written DDP loop?  And its MFU.

In one process tree: two gloo ranks each hold a paratrain ``Trainer`` and a minimal
hand-written DDP loop over the same model, data and optimizer, and run them interleaved
(R rounds of K steps each), so machine noise hits both alike.  Then one process trains
the default model alone and reports MFU against the fp32 matmul ceiling measured here, and
``train.compile`` against eager: for the default model and a 6-layer 384-wide one, an eager
and a compiled trainer in one process (after the compiled one's warm-up, which is when it
compiles), interleaved in rounds.

    python benchmarks/trainer_overhead.py [--rounds 6] [--steps 10] [--skip-ddp] [--skip-compile]

Prints one JSON object: step_time_ratio (paratrain / hand-written, target <= 1.05),
mfu_single (target >= 0.35), and per model compile vs eager tokens/s (``compile_speedup``).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from paratrain.config import Config  # noqa: E402
from paratrain.data import build_data, cached_corpus  # noqa: E402
from paratrain.mfu import measure_cpu_peak, mfu  # noqa: E402
from paratrain.models import build_model  # noqa: E402
from paratrain.parallel import ParallelDims  # noqa: E402
from paratrain.training.spec import RunSpec  # noqa: E402
from paratrain.training.trainer import Trainer, lr_lambda  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(nproc: int, run_dir: str, *extra: str) -> Config:
    return Config.load(None, [f"--parallel.nproc={nproc}", f'--run.dir="{run_dir}"', "--train.log_every=10",
                              "--train.eval_every=0", "--train.threads=1", *extra])


def _hand_written(cfg: Config, rank: int, world: int):
    """The minimal loop a user would write: DDP, AdamW, clip, LR schedule."""
    data = build_data(cfg, rank, world)
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg.model, data.vocab_size, data.pad_id)
    ddp = DDP(model, bucket_cap_mb=cfg.parallel.bucket_cap_mb, gradient_as_bucket_view=True)
    t = cfg.train
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay}, {"params": rest, "weight_decay": 0}],
                            lr=t.lr, betas=(0.9, 0.95), foreach=False)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))

    def step():
        batch = next(data.train)
        logits = ddp(batch["input_ids"])
        loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()

    return step


def join_gloo(rank: int, world: int, port: int) -> None:
    """Set the torchrun-style environment of one local rank (ParallelDims reads it)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)


def interleaved_times(trainer: Trainer, hand, rounds: int, steps: int) -> dict[str, list[float]]:
    """Step times of paratrain and the hand-written loop, alternating in rounds (round 0 is warm-up)."""
    times: dict[str, list[float]] = {"paratrain": [], "hand": []}
    for r in range(rounds + 1):
        for name, fn in (("paratrain", trainer.train_step), ("hand", hand)):
            for _ in range(steps):
                dist.barrier()
                t0 = time.perf_counter()
                fn()
                if name == "paratrain":  # what fit() adds per step: the logged loss every log_every steps
                    trainer.step += 1
                    if trainer.step % trainer.cfg.train.log_every == 0:
                        trainer.reduced_loss(torch.zeros(()), 1.0)
                if r:
                    times[name].append(time.perf_counter() - t0)
    return times


def finish(rank: int, times: dict[str, list[float]], out: str) -> None:
    """Rank 0 writes the times for the parent; then every rank leaves the group."""
    if rank == 0:
        with open(out, "w") as f:
            json.dump(times, f)
    dist.barrier()
    dist.destroy_process_group()


def _worker(rank: int, world: int, port: int, rounds: int, steps: int, run_dir: str, out: str) -> None:
    join_gloo(rank, world, port)
    cfg = _config(world, run_dir)
    dims = ParallelDims.from_env(cfg)
    trainer = Trainer(cfg, dims, RunSpec.from_config(cfg, dims.dp_rank, dims.dp))
    finish(rank, interleaved_times(trainer, _hand_written(cfg, rank, world), rounds, steps), out)


def single_process_mfu(run_dir: str, steps: int = 40) -> dict:
    """The default model on one process and one thread: model FLOP/s over the matmul ceiling."""
    os.environ.pop("RANK", None)
    torch.set_num_threads(1)
    cfg = _config(1, run_dir)
    trainer = Trainer(cfg, ParallelDims.from_env(cfg, init=False), RunSpec.from_config(cfg))
    for _ in range(5):
        trainer.train_step()
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    dt = time.perf_counter() - t0
    tokens_per_s = steps * trainer.tokens_per_step / dt
    peak = measure_cpu_peak()
    return {"tokens_per_s_single": tokens_per_s, "matmul_peak_gflops_1thread": peak / 1e9,
            "mfu_single": mfu(trainer.flops_per_token, tokens_per_s, 1, peak)}


# model name -> overrides; "default" is the default config's model
COMPILE_MODELS = {"default": [], "6L-384d": ["--model.n_layer=6", "--model.d_model=384", "--model.n_head=6",
                                              "--model.d_ff=1536"]}


def compile_vs_eager(run_dir: str, rounds: int, steps: int) -> dict:
    """Eager and compiled trainers of each model in one process, one thread, interleaved."""
    os.environ.pop("RANK", None)
    torch.set_num_threads(1)
    out = {}
    for name, overrides in COMPILE_MODELS.items():
        trainers = {}
        for mode, extra in (("eager", []), ("compile", ["--train.compile=true"])):
            cfg = _config(1, os.path.join(run_dir, f"{name}-{mode}"), *overrides, *extra)
            trainers[mode] = Trainer(cfg, ParallelDims.from_env(cfg, init=False), RunSpec.from_config(cfg))
        t0 = time.perf_counter()
        for tr in trainers.values():  # warm-up; the compiled trainer compiles here
            for _ in range(3):
                tr.train_step()
        compile_s = time.perf_counter() - t0
        times: dict[str, list[float]] = {m: [] for m in trainers}
        for _ in range(rounds):
            for mode, tr in trainers.items():
                for _ in range(steps):
                    s0 = time.perf_counter()
                    tr.train_step()
                    times[mode].append(time.perf_counter() - s0)
        tok = {m: trainers[m].tokens_per_step / statistics.median(t) for m, t in times.items()}
        out[name] = {"params": trainers["eager"].n_params, "eager_tokens_per_s": tok["eager"],
                     "compile_tokens_per_s": tok["compile"], "compile_speedup": tok["compile"] / tok["eager"],
                     "warmup_with_compile_s": compile_s}
        print(json.dumps({name: out[name]}), file=sys.stderr, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--skip-ddp", action="store_true", help="leave out the 2-rank hand-written comparison")
    ap.add_argument("--skip-compile", action="store_true", help="leave out compile vs eager")
    args = ap.parse_args()
    import tempfile

    result: dict = {"benchmark": "trainer_overhead"}
    with tempfile.TemporaryDirectory() as tmp:
        cached_corpus("stdlib")
        if not args.skip_ddp:
            out = os.path.join(tmp, "times.json")
            mp.spawn(_worker, args=(2, free_port(), args.rounds, args.steps, tmp, out), nprocs=2, join=True)
            times = json.load(open(out))
            para, hand = statistics.median(times["paratrain"]), statistics.median(times["hand"])
            result.update({"world_size": 2, "steps_each": len(times["paratrain"]),
                           "paratrain_step_ms_median": para * 1000, "hand_written_step_ms_median": hand * 1000,
                           "step_time_ratio": para / hand, "target_ratio": 1.05})
        result.update(single_process_mfu(tmp), target_mfu=0.35)
        if not args.skip_compile:
            result["compile_vs_eager"] = compile_vs_eager(tmp, args.rounds, args.steps)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
