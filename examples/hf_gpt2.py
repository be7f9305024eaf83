"""A Hugging Face transformers GPT-2 (small random-init config: nothing is downloaded) trained by
paratrain on the stdlib corpus: DDP, ZeRO-3 or the parameter server.

    pip install "paratrain[hf]"                      # transformers
    python examples/hf_gpt2.py                       # DDP over 2 local workers
    python examples/hf_gpt2.py --parallel.zero=3     # ZeRO-3 (FSDP2 per GPT2Block, found automatically)
    python examples/hf_gpt2.py --parallel.sync=ps --ps.mode=sync   # parameter server
    python examples/hf_gpt2.py --train.steps=50 ...  # any --section.key=value override

paratrain's corpus batches are {"input_ids", "labels"} with labels already shifted, so without a
loss_fn paratrain calls the model on input_ids only and scores ``out.logits`` itself.  On your own
data (train_data=...) with unshifted ``labels``, the model's own ``out.loss`` is used instead.
"""

import sys

from transformers import GPT2Config, GPT2LMHeadModel

import paratrain

SEQ_LEN = 128


def make_gpt2() -> GPT2LMHeadModel:
    """Module-level factory: every worker builds the same weights from the run seed."""
    config = GPT2Config(vocab_size=261, n_positions=SEQ_LEN, n_embd=128, n_layer=4, n_head=4,
                        bos_token_id=0, eos_token_id=0, use_cache=False)  # 261: paratrain's byte tokenizer
    return GPT2LMHeadModel(config)


if __name__ == "__main__":
    cfg = paratrain.Config.load(overrides=[
        "--run.dir=runs/hf-gpt2", "--data.source=stdlib", f"--data.seq_len={SEQ_LEN}", "--data.batch_size=8",
        "--parallel.nproc=2", "--train.steps=200", "--train.lr=1e-3", "--train.eval_every=50",
        "--checkpoint.every=100", "--run.overwrite=true", *sys.argv[1:],  # a re-run starts over
    ])
    result = paratrain.train(cfg, model=make_gpt2)
    print(f"{result.summary['strategy']}: final loss {result.final_loss:.3f}, val loss {result.val_loss:.3f}, "
          f"{result.summary['samples_per_s']:.1f} samples/s")
    result.export_safetensors(result.run_dir / "export" / "model.safetensors")  # full state dict, tied weights once
