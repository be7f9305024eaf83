"""Samples/s of a Hugging Face transformers GPT-2 under paratrain DDP(2) vs a minimal hand-written DDP loop.

In one process tree: two gloo ranks each hold a paratrain ``Trainer`` with the injected GPT-2
factory (what ``paratrain.train(cfg, model=make_gpt2)`` runs per rank) and a hand-written DDP
loop over an identical GPT-2, the same corpus batches and the same optimizer (AdamW, clipping,
LR schedule).  They run interleaved, R rounds of K steps each, so machine noise hits both alike.

    python benchmarks/hf_ddp.py [--rounds 4] [--steps 8]

Prints one JSON object; ``samples_per_s_ratio`` (paratrain / hand-written) targets >= 0.95.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from benchmarks.trainer_overhead import finish, free_port, interleaved_times, join_gloo  # noqa: E402
from paratrain.config import Config  # noqa: E402
from paratrain.data import build_data, cached_corpus  # noqa: E402
from paratrain.parallel import ParallelDims  # noqa: E402
from paratrain.training.spec import RunSpec  # noqa: E402
from paratrain.training.trainer import Trainer, lr_lambda  # noqa: E402

SEQ, BATCH = 128, 8


def make_gpt2():
    """The examples/hf_gpt2.py model: 4 layers, d = 128, byte vocabulary, random init."""
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=261, n_positions=SEQ, n_embd=128, n_layer=4, n_head=4,
                                      bos_token_id=0, eos_token_id=0, use_cache=False))


def _config(run_dir: str) -> Config:
    return Config.load(None, ["--parallel.nproc=2", f'--run.dir="{run_dir}"', "--data.source=stdlib",
                              f"--data.seq_len={SEQ}", f"--data.batch_size={BATCH}", "--train.lr=1e-3",
                              "--train.log_every=10", "--train.eval_every=0", "--train.threads=1"])


def _hand_written(cfg: Config, rank: int, world: int):
    """The loop a user would write around the same model: DDP, AdamW, clip, LR schedule."""
    data = build_data(cfg, rank, world)
    torch.manual_seed(cfg.run.seed)
    model = make_gpt2()
    ddp = DDP(model)
    t = cfg.train
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(0.9, 0.95), weight_decay=t.weight_decay,
                            foreach=False)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))

    def step():
        batch = next(data.train)
        logits = ddp(input_ids=batch["input_ids"]).logits
        loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()

    return step


def _worker(rank: int, world: int, port: int, rounds: int, steps: int, run_dir: str, out: str) -> None:
    join_gloo(rank, world, port)
    cfg = _config(run_dir)
    dims = ParallelDims.from_env(cfg)
    trainer = Trainer(cfg, dims, RunSpec.from_user(cfg, dims.dp_rank, dims.dp, model=make_gpt2))
    finish(rank, interleaved_times(trainer, _hand_written(cfg, rank, world), rounds, steps), out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        cached_corpus("stdlib")
        out = os.path.join(tmp, "times.json")
        mp.spawn(_worker, args=(2, free_port(), args.rounds, args.steps, tmp, out), nprocs=2, join=True)
        times = json.load(open(out))
    samples = 2 * BATCH  # per step, both ranks
    para, hand = statistics.median(times["paratrain"]), statistics.median(times["hand"])
    k = args.steps
    rounds = [statistics.median(times["hand"][i:i + k]) / statistics.median(times["paratrain"][i:i + k])
              for i in range(0, len(times["hand"]), k)]
    print(json.dumps({
        "benchmark": "hf_ddp",
        "model": "transformers GPT2LMHeadModel (4 layers, d=128, seq 128, random init)",
        "transformers": transformers.__version__,
        "world_size": 2,
        "global_batch": samples,
        "steps_each": len(times["paratrain"]),
        "paratrain_samples_per_s": samples / para,
        "hand_written_samples_per_s": samples / hand,
        "samples_per_s_ratio": hand / para,
        "ratio_per_round": [round(r, 3) for r in rounds],
        "target_ratio": 0.95,
    }, indent=1))


if __name__ == "__main__":
    main()
