"""Tests for paratrain.data: tokenizers, shards, the cache, tasks and the data-parallel batcher."""

from __future__ import annotations

import json
import threading
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from paratrain.config import Config, ConfigError
from paratrain.data.cache import cached_corpus
from paratrain.data.loader import DistributedBatches, LMWindows, MLMWindows, build_data, val_batches
from paratrain.data.prepare import prepare
from paratrain.data.shards import TokenStream
from paratrain.data.sources import stdlib_files, text_files
from paratrain.data.tasks import TaskDataset, split_of
from paratrain.data.tokenizer import BPETokenizer, ByteTokenizer, load_tokenizer

TEXT = "def f(x):\n    return x * 2  # héllo wörld ✓ 🚀\n"


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PARATRAIN_CACHE", str(tmp_path / "cache"))


def _write_corpus(d: Path, n_files: int, chars_per_file: int) -> list[Path]:
    d.mkdir(parents=True, exist_ok=True)
    files = [d / f"doc{i:02d}.txt" for i in range(n_files)]
    for i, p in enumerate(files):  # lines are at least 30 characters long
        lines = (f"line {i}.{k}: value = {k * 7919 % 10007} ünïcode ✓ {'x' * (k % 50)}\n"
                 for k in range(chars_per_file // 30 + 1))
        p.write_text("".join(lines), encoding="utf-8")
    return files


def _expected_tokens(files: list[Path]) -> np.ndarray:
    parts = []
    for f in files:
        parts += [np.frombuffer(f.read_bytes(), np.uint8).astype(np.uint16), np.array([258], np.uint16)]
    return np.concatenate(parts)


# ---- tokenizers -------------------------------------------------------------------------------
def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    ids = tok.encode(TEXT)
    assert ids == list(TEXT.encode("utf-8")) and max(ids) < 256
    assert tok.decode(ids) == TEXT
    assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id]) == TEXT
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.sep_id, tok.mask_id, tok.vocab_size) == (
        256, 257, 258, 259, 260, 261)
    assert tok.decode([0xC3]) == "\ufffd"
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)


def test_bpe_tokenizer_train_save_load(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT * 200 + "import os\nprint(os.getcwd())\n" * 100, encoding="utf-8")
    tok = BPETokenizer().train([corpus], vocab_size=320)
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3, 4)
    assert tok.name == "bpe" and 261 <= tok.vocab_size <= 320
    sample = "def g(y):\n\treturn y  # ünseen ✓\n"
    assert tok.decode(tok.encode(TEXT)) == TEXT and tok.decode(tok.encode(sample)) == sample
    assert len(tok.encode(TEXT)) < len(TEXT.encode())  # merges were learned
    tok.save(tmp_path / "tok")
    again = load_tokenizer(tmp_path / "tok")
    assert isinstance(again, BPETokenizer) and again.encode(sample) == tok.encode(sample)
    from_iter = BPETokenizer().train(iter([TEXT] * 50), vocab_size=300)
    assert from_iter.decode(from_iter.encode(sample)) == sample
    with pytest.raises(ConfigError, match="no BPE tokenizer"):
        BPETokenizer.load(tmp_path / "nothing")


# ---- shards ------------------------------------------------------------------------------------
def test_prepare_streams_with_bounded_memory(tmp_path):
    files = _write_corpus(tmp_path / "src", 6, 500_000) + _write_corpus(tmp_path / "big", 1, 1_200_000)
    total_bytes = sum(f.stat().st_size for f in files)
    assert total_bytes > 4 * 2**20  # four times the cap
    cap_mb = 1.0
    tracemalloc.start()
    try:
        meta = prepare(files, tmp_path / "out", shard_tokens=300_000, max_memory_mb=cap_mb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < (cap_mb + 0.5) * 2**20, f"peak {peak / 2**20:.2f} MiB exceeds the cap"
    expected = _expected_tokens(files)
    assert meta["total_tokens"] == len(expected) == total_bytes + len(files)
    assert meta["documents"] == len(files) and meta["tokenizer"] == "byte"
    assert all(s["tokens"] <= 300_000 for s in meta["shards"]) and len(meta["shards"]) >= 14
    stream = TokenStream(tmp_path / "out", verify=True)
    assert len(stream) == len(expected)
    assert np.array_equal(stream.slice(0, len(stream)), expected)
    assert np.array_equal(stream.slice(299_990, 600_010), expected[299_990:600_010])  # spans 3 shards
    assert stream.slice(5, 5).size == 0
    with pytest.raises(IndexError):
        stream.slice(0, len(stream) + 1)


def test_shard_dir_errors(tmp_path):
    files = _write_corpus(tmp_path / "src", 2, 3000)
    out = tmp_path / "out"
    prepare(files, out, shard_tokens=2000)
    meta_path = out / "meta.json"
    good = meta_path.read_text()

    meta_path.unlink()
    with pytest.raises(ConfigError, match=r"has no meta.json; run `paratrain prepare SOURCE --out"):
        TokenStream(out)
    meta_path.write_text(good[: len(good) // 2])
    with pytest.raises(ConfigError, match="corrupt meta.json"):
        TokenStream(out)
    meta = json.loads(good)
    meta["total_tokens"] += 1
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="corrupt meta.json"):
        TokenStream(out)
    meta_path.write_text(good)
    shard1 = out / "shard_00001.bin"
    data = shard1.read_bytes()
    shard1.write_bytes(data[:-2])
    with pytest.raises(ConfigError, match="wrong size"):
        TokenStream(out)
    shard1.write_bytes(bytes([data[0] ^ 1]) + data[1:])
    TokenStream(out)  # sizes are fine; only verify=True hashes
    with pytest.raises(ConfigError, match="sha256"):
        TokenStream(out, verify=True)
    shard1.unlink()
    with pytest.raises(ConfigError, match="missing shard_00001.bin"):
        TokenStream(out)
    with pytest.raises(ConfigError, match="matched no files"):
        text_files(str(tmp_path / "nope" / "*.txt"))
    with pytest.raises(ConfigError):
        prepare([], tmp_path / "empty")


def test_prepare_bpe_and_cached_corpus(tmp_path):
    _write_corpus(tmp_path / "src", 3, 4000)
    source = f"text:{tmp_path / 'src' / '*.txt'}"
    d = cached_corpus(source, tokenizer="bpe", bpe_vocab=400)
    stream = TokenStream(d)
    tok = stream.tokenizer
    assert isinstance(tok, BPETokenizer) and stream.vocab_size == tok.vocab_size <= 400
    eos_at = np.flatnonzero(stream.slice(0, len(stream)) == tok.eos_id)
    assert len(eos_at) == 3 and eos_at[-1] == len(stream) - 1
    first = (tmp_path / "src" / "doc00.txt").read_text()
    assert tok.decode(stream.slice(0, int(eos_at[0]))) == first

    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(cached_corpus(source))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and results[0] == results[1] != d
    assert cached_corpus(f"shards:{results[0]}") == results[0]
    (tmp_path / "src" / "doc00.txt").write_text("changed\n")
    assert cached_corpus(source) != results[0]  # the key follows file sizes and mtimes


def test_stdlib_files():
    files = stdlib_files()
    assert len(files) > 100 and files == sorted(files)
    assert all(f.suffix == ".py" for f in files)
    bad = {"site-packages", "dist-packages", "test", "tests", "idlelib"}
    assert not any(bad & set(f.parts) for f in files)


# ---- datasets ----------------------------------------------------------------------------------
def _range(n: int) -> list[dict[str, torch.Tensor]]:
    return [{"x": torch.tensor([i, -i])} for i in range(n)]  # a list is a map-style dataset


def test_batches_disjoint_across_ranks():
    ds, B, dp = _range(103), 4, 2
    ranks = [DistributedBatches(ds, B, r, dp, seed=7) for r in range(dp)]
    assert ranks[0].batches_per_epoch == 103 // 8
    for epoch in range(2):
        seen = [r.epoch_indices(epoch) for r in ranks]
        assert not set(seen[0]) & set(seen[1])
        assert sorted(seen[0] + seen[1]) == sorted(ranks[0].permutation(epoch)[:96].tolist())
    assert ranks[0].epoch_indices(0) != ranks[0].epoch_indices(1)
    plain = DistributedBatches(ds, B, 1, dp, shuffle=False)
    assert plain.epoch_indices(0)[:8] == [4, 5, 6, 7, 12, 13, 14, 15]
    with pytest.raises(ConfigError, match="fewer than one global batch of 120"):
        DistributedBatches(ds, 60, 0, 2)


def test_batches_one_rank_equals_two():
    ds = _range(50)
    single = DistributedBatches(ds, 8, 0, 1, seed=3)
    pair = [DistributedBatches(ds, 4, r, 2, seed=3) for r in range(2)]
    for _ in range(20):  # crosses two epoch boundaries (6 micro-batches per epoch)
        both = torch.cat([next(pair[0])["x"], next(pair[1])["x"]])
        assert torch.equal(next(single)["x"], both)


def test_batches_resume():
    ds = _range(40)
    a = DistributedBatches(ds, 3, 1, 2, seed=11)
    for _ in range(5):
        next(a)
    state = a.state_dict()
    assert state == {"micro_batch": 5}
    expected = [next(a)["x"] for _ in range(6)]
    b = DistributedBatches(ds, 3, 1, 2, seed=11)
    b.load_state_dict(state)
    assert all(torch.equal(next(b)["x"], e) for e in expected)


ANSWER = {"reverse": lambda p: p[::-1], "sort": lambda p: "".join(sorted(p)),
          "add": lambda p: str(sum(int(x) for x in p.split("+")))}


@pytest.mark.parametrize("task", ["reverse", "sort", "add"])
def test_synthetic_tasks(task):
    tok = ByteTokenizer()
    s2s = TaskDataset(task, 50, 5, seed=1, split="train", arch="seq2seq", seq_len=12)
    gpt = TaskDataset(task, 50, 5, seed=1, split="train", arch="gpt", seq_len=20)
    for i in range(0, 50, 7):
        it = s2s[i]
        assert all(v.dtype == torch.long and v.shape == (12,) for v in it.values())
        problem = tok.decode(it["src"])
        answer_ids = it["labels"][it["labels"] != -100].tolist()
        assert answer_ids[-1] == tok.eos_id and tok.decode(answer_ids) == ANSWER[task](problem)
        assert it["tgt_in"][0] == tok.bos_id and torch.equal(it["tgt_in"][1:len(answer_ids)],
                                                             it["labels"][:len(answer_ids) - 1])
        g = gpt[i]
        ids, labels = g["input_ids"], g["labels"]
        sep = int((ids == tok.sep_id).nonzero())
        assert tok.decode(ids[1:sep]) == problem and (labels[:sep] == -100).all()
        scored = labels[labels != -100].tolist()
        assert tok.decode(scored) == ANSWER[task](problem) and scored[-1] == tok.eos_id
        assert torch.equal(labels[:-1], torch.where(labels[:-1] == -100, labels[:-1], ids[1:]))
    again = TaskDataset(task, 50, 5, seed=1, split="train", arch="seq2seq", seq_len=12)
    assert all(torch.equal(again[i]["src"], s2s[i]["src"]) for i in range(10))
    other = TaskDataset(task, 50, 5, seed=2, split="train", arch="seq2seq", seq_len=12)
    assert any(not torch.equal(other[i]["src"], s2s[i]["src"]) for i in range(10))
    val = TaskDataset(task, 50, 5, seed=1, split="val", arch="seq2seq", seq_len=12)
    train_problems = {s2s.example(i)[0] for i in range(50)}
    val_problems = {val.example(i)[0] for i in range(50)}
    assert not train_problems & val_problems and all(split_of(p) == "val" for p in val_problems)
    with pytest.raises(ConfigError, match=r"too short for task .* \(needs >= "):
        TaskDataset(task, 5, 5, seed=1, arch="gpt", seq_len=11)


def test_lm_and_mlm_windows(tmp_path):
    files = _write_corpus(tmp_path / "src", 2, 5000)
    prepare(files, tmp_path / "out")
    stream = TokenStream(tmp_path / "out")
    flat = torch.from_numpy(stream.slice(0, len(stream)).astype(np.int64))
    train, val = (LMWindows(stream, 16, split, 0.1) for split in ("train", "val"))
    total = len(stream) // 17
    assert len(train) + len(val) == total and len(val) == max(1, int(total * 0.1))
    assert torch.equal(train[3]["input_ids"], flat[51:67]) and torch.equal(train[3]["labels"], flat[52:68])
    assert torch.equal(val[0]["input_ids"], flat[len(train) * 17:len(train) * 17 + 16])

    tok = ByteTokenizer()
    mlm = MLMWindows(stream, 64, "train", 0.1, mask_prob=0.15, tokenizer=tok, seed=5)
    same = MLMWindows(stream, 64, "train", 0.1, mask_prob=0.15, tokenizer=tok, seed=5)
    other = MLMWindows(stream, 64, "train", 0.1, mask_prob=0.15, tokenizer=tok, seed=6)
    n_masked = n_tokens = 0
    for i in range(len(mlm)):
        a, b = mlm[i], same[i]
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
        orig = flat[i * 64:(i + 1) * 64]
        chosen = a["labels"] != -100
        assert chosen.any() and torch.equal(a["labels"][chosen], orig[chosen])
        assert torch.equal(a["input_ids"][~chosen], orig[~chosen])
        n_masked, n_tokens = n_masked + int(chosen.sum()), n_tokens + 64
    assert 0.1 < n_masked / n_tokens < 0.2
    assert any(not torch.equal(other[i]["labels"], mlm[i]["labels"]) for i in range(5))


def test_build_data_and_val_batches(tmp_path):
    _write_corpus(tmp_path / "src", 2, 20_000)
    cfg = Config.from_dict({"data": {"source": f"text:{tmp_path / 'src' / '*.txt'}", "seq_len": 32,
                                     "batch_size": 4, "val_fraction": 0.05}})
    b0, b1 = build_data(cfg, 0, 2), build_data(cfg, 1, 2)
    assert (b0.task, b0.exact_match, b0.vocab_size, b0.pad_id) == ("lm", False, 261, 256)
    batch = next(b0.train)
    assert set(batch) == {"input_ids", "labels"} and batch["input_ids"].shape == (4, 32)
    v0, v1 = val_batches(b0, 4, 0, 2, max_batches=3), val_batches(b1, 4, 1, 2, max_batches=3)
    assert len(v0) == len(v1) == 3 and not torch.equal(v0[0]["input_ids"], v1[0]["input_ids"])
    assert torch.equal(v0[1]["input_ids"][0], b0.val_dataset[8]["input_ids"])

    cfg = Config.from_dict({"data": {"source": "synthetic:add", "seq_len": 24, "task_len": 4,
                                     "num_samples": 64, "batch_size": 8}, "model": {"arch": "seq2seq"}})
    bundle = build_data(cfg, 0, 1)
    assert bundle.task == "seq2seq-task" and bundle.exact_match
    assert set(next(bundle.train)) == {"src", "tgt_in", "labels"}
    assert len(val_batches(bundle, 100, 0, 2)) == 1  # smaller than one global batch: one short batch
