"""Corpus formats (jsonl, parquet, local datasets), Hugging Face tokenizer files, parallel prepare,
uint32 shards, document boundaries and document packing."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from paratrain import cli
from paratrain.config import Config, ConfigError
from paratrain.data import HFTokenizer, TokenStream, build_data, cached_corpus, load_tokenizer, open_corpus, prepare
from paratrain.data.packing import DocWindows, document_ends, pack_windows

DOCS = [f"document {i}: " + "héllo wörld ✓ " * (i % 5 + 1) + "x" * (i * 7 % 40) for i in range(40)]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PARATRAIN_CACHE", str(tmp_path / "cache"))


def byte_tokens(docs: list[str], bos: bool = False, eos: bool = True) -> np.ndarray:
    out: list[int] = []
    for d in docs:
        out += [257] * bos + list(d.encode()) + [258] * eos
    return np.array(out)


def write_sources(d: Path, docs: list[str]) -> dict[str, str]:
    """The same documents as jsonl (two files), parquet (two files) and a datasets directory."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    d.mkdir(parents=True, exist_ok=True)
    half = len(docs) // 2
    for i, part in enumerate((docs[:half], docs[half:])):
        lines = [json.dumps({"id": k, "body": t}) for k, t in enumerate(part)]
        (d / f"part{i}.jsonl").write_text("\n".join(lines[:3]) + "\n\n" + "\n".join(lines[3:]) + "\n")
        pq.write_table(pa.table({"id": list(range(len(part))), "body": part}), d / f"part{i}.parquet",
                       row_group_size=7)
    datasets.Dataset.from_dict({"body": docs}).save_to_disk(str(d / "ds"))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": docs})}).save_to_disk(str(d / "dsd"))
    return {"jsonl": f"jsonl:{d}/*.jsonl", "parquet": f"parquet:{d}/*.parquet", "ds": f"hf-dataset:{d}/ds",
            "dsd": f"hf-dataset:{d}/dsd"}


def test_record_sources_give_one_document_per_record(tmp_path):
    sources = write_sources(tmp_path / "src", DOCS)
    expected = byte_tokens(DOCS)
    for name, src in sources.items():
        meta = prepare(open_corpus(src, "body"), tmp_path / name, shard_tokens=500)
        assert meta["documents"] == len(DOCS) and meta["dtype"] == "uint16", name
        stream = TokenStream(tmp_path / name, verify=True)
        assert np.array_equal(stream.slice(0, len(stream)), expected), name
    both = prepare(open_corpus(sources["jsonl"], "body"), tmp_path / "b", boundary="bos_eos")
    assert np.array_equal(TokenStream(tmp_path / "b").slice(0, both["total_tokens"]),
                          byte_tokens(DOCS, bos=True))
    for src in (sources["jsonl"], sources["parquet"], sources["ds"]):
        with pytest.raises(ConfigError, match=r"has no text field 'text' \(it has: .*body.*\); set data.text_field"):
            prepare(open_corpus(src), tmp_path / "x")
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\nnot json\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:2 is not valid JSON"):
        prepare(open_corpus(f"jsonl:{tmp_path}/bad.jsonl"), tmp_path / "x")
    (tmp_path / "num.jsonl").write_text('{"text": "a"}\n{"text": 7}\n')
    with pytest.raises(ConfigError, match=r"num.jsonl:2: text field 'text' is a number, not a string"):
        prepare(open_corpus(f"jsonl:{tmp_path}/num.jsonl"), tmp_path / "x")
    import datasets

    datasets.Dataset.from_dict({"n": [1, 2]}).save_to_disk(str(tmp_path / "ds_int"))
    for src, field in ((sources["parquet"], "id"), (f"hf-dataset:{tmp_path}/ds_int", "n")):
        with pytest.raises(ConfigError, match=rf"text field '{field}' holds int64, not strings"):
            prepare(open_corpus(src, field), tmp_path / "x")
    with pytest.raises(ConfigError, match="not a datasets directory"):
        open_corpus(f"hf-dataset:{tmp_path}/src")


def test_jsonl_prepare_memory_stays_bounded(tmp_path):
    big = tmp_path / "big.jsonl"
    with open(big, "w") as f:
        for i in range(20_000):
            f.write(json.dumps({"text": f"record {i} " + "abcdefgh ✓ " * 20}) + "\n")
    assert big.stat().st_size > 4 * 2**20
    tracemalloc.start()
    try:
        meta = prepare(open_corpus(f"jsonl:{big}"), tmp_path / "out", shard_tokens=1 << 20, max_memory_mb=1.0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert meta["documents"] == 20_000 and peak < 1.5 * 2**20, f"peak {peak / 2**20:.2f} MiB"


def hf_tokenizer_file(d: Path, docs: list[str]) -> Path:
    """A BPE tokenizer.json with Llama-style special tokens, trained here on ``docs``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer)
    d.mkdir(parents=True, exist_ok=True)
    tok.save(str(d / "tokenizer.json"))
    return d / "tokenizer.json"


def test_hf_tokenizer_parallel_prepare_and_training_data(tmp_path):
    path = hf_tokenizer_file(tmp_path / "tok", DOCS)
    tok = load_tokenizer(f"hf:{path}")
    assert isinstance(tok, HFTokenizer) and (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)
    assert tok.decode(tok.encode(DOCS[3])) == DOCS[3]
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<s>"}}))
    assert HFTokenizer.load(tmp_path / "tok").eos_id == 1  # tokenizer_config.json names win
    (tmp_path / "tok" / "tokenizer_config.json").unlink()

    sources = write_sources(tmp_path / "src", DOCS * 5)
    one = prepare(open_corpus(sources["parquet"], "body"), tmp_path / "one", tokenizer=f"hf:{path}",
                  boundary="bos_eos", shard_tokens=500, max_memory_mb=0.05)
    two = prepare(open_corpus(sources["parquet"], "body"), tmp_path / "two", tokenizer=f"hf:{path}",
                  boundary="bos_eos", shard_tokens=500, max_memory_mb=0.05, workers=2)
    a, b = TokenStream(tmp_path / "one"), TokenStream(tmp_path / "two")
    assert one["shards"] == two["shards"] and one["tokenizer"] == "hf" and len(one["shards"]) > 3
    flat = a.slice(0, len(a))
    expected = np.concatenate([[1, *tok.encode(t), 2] for t in DOCS * 5])
    assert np.array_equal(flat, expected) and np.array_equal(b.slice(0, len(b)), expected)
    assert isinstance(b.tokenizer, HFTokenizer) and b.tokenizer.eos_id == 2

    cfg = Config.from_dict({"data": {"source": sources["jsonl"], "text_field": "body", "tokenizer": f"hf:{path}",
                                     "seq_len": 16, "batch_size": 2, "packing": "docs"}})
    bundle = build_data(cfg)
    assert bundle.task == "lm-docs" and bundle.vocab_size == tok.vocab_size
    for i in range(len(bundle.train_dataset)):
        item = bundle.train_dataset[i]
        ids, labels = item["input_ids"], item["labels"]
        n = int((labels != -100).sum()) + 1  # tokens of this window
        assert (ids[n:] == tok.pad_id).all() and (labels[n - 1:] == -100).all()
        m = min(n, 16)
        assert torch.equal(labels[:m - 1], ids[1:m])


def test_uint32_shards_for_large_vocabularies(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(70_000)} | {"</s>": 70_000, "<unk>": 70_001}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "c.txt").write_text("w69999 w5 w65536\nw1")
    meta = prepare([tmp_path / "c.txt"], tmp_path / "out", tokenizer=f"hf:{tmp_path}/tokenizer.json")
    stream = TokenStream(tmp_path / "out", verify=True)
    assert meta["dtype"] == "uint32" and stream.slice(0, 5).tolist() == [69999, 5, 65536, 1, 70_000]


def test_bpe_vocab_spec_and_config_checks(tmp_path):
    (tmp_path / "a.txt").write_text("\n".join(DOCS))
    d = cached_corpus(f"text:{tmp_path}/a.txt", "bpe:320")
    assert 261 <= TokenStream(d).vocab_size <= 320 and TokenStream(d).tokenizer.name == "bpe"
    for data, match in (({"tokenizer": "gpt2"}, "data.tokenizer = 'gpt2' is not"),
                        ({"tokenizer": "bpe:12"}, "bpe:VOCAB"),
                        ({"packing": "docs", "boundary": "none"}, "set data.boundary"),
                        ({"source": "csv:x"}, "'jsonl:GLOB', 'parquet:GLOB', 'hf-dataset:DIR'")):
        with pytest.raises(ConfigError, match=match):
            Config.from_dict({"data": data})


def test_pack_windows():
    # documents end at 3, 5, 12 (a long one), 14; windows of 4 tokens
    assert pack_windows(np.array([3, 5, 12, 14]), 4).tolist() == [0, 3, 5, 9, 12, 14]
    assert pack_windows(np.array([2, 4, 6]), 4).tolist() == [0, 4, 6]


def test_doc_windows_split(tmp_path):
    (tmp_path / "a.txt").write_text("abc")
    (tmp_path / "b.txt").write_text("de" * 20)
    prepare(sorted(tmp_path.glob("*.txt")), tmp_path / "out")
    stream = TokenStream(tmp_path / "out")
    train = DocWindows(stream, 8, "train", 0.2)
    assert train.bounds.tolist()[:3] == [0, 4, 13]  # "abc"+EOS alone: the next document does not fit
    assert train[0]["input_ids"].tolist() == [97, 98, 99, 258, 256, 256, 256, 256]
    assert train[0]["labels"].tolist() == [98, 99, 258] + [-100] * 5
    prepare(sorted(tmp_path.glob("*.txt")), tmp_path / "bos", boundary="bos")
    assert document_ends(TokenStream(tmp_path / "bos")).tolist() == [4, 45]  # [BOS]abc | [BOS]dede...


def test_cli_prepare_jsonl_with_workers(tmp_path, capsys):
    sources = write_sources(tmp_path / "src", DOCS)
    path = hf_tokenizer_file(tmp_path / "tok", DOCS)
    rc = cli.main(["prepare", sources["jsonl"], "--out", str(tmp_path / "out"), "--tokenizer", f"hf:{path}",
                   "--workers", "2", "--text-field", "body"])
    out = capsys.readouterr()
    assert rc == 0 and "tokens/s" in out.out and "prepare:" in out.err
    assert read_documents(tmp_path / "out") == len(DOCS)
    assert cli.main(["prepare", sources["jsonl"], "--out", str(tmp_path / "o2")]) == 2
    assert "has no text field 'text'" in capsys.readouterr().err


def read_documents(d: Path) -> int:
    return json.loads((d / "meta.json").read_text())["documents"]
