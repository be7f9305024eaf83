"""Data: tokenizers, corpora, memory-mapped token shards, synthetic tasks and the DP batcher."""

from paratrain.data.cache import cache_root, cached_corpus, corpus_for
from paratrain.data.loader import (
    DataBundle,
    DistributedBatches,
    LMWindows,
    MLMWindows,
    build_data,
    collate,
    val_batches,
)
from paratrain.data.prepare import prepare
from paratrain.data.shards import TokenStream, read_meta
from paratrain.data.sources import Corpus, iter_documents, open_corpus, source_files, stdlib_files, text_files
from paratrain.data.tasks import TaskDataset, make_example
from paratrain.data.tokenizer import BPETokenizer, ByteTokenizer, HFTokenizer, load_tokenizer

__all__ = [
    "BPETokenizer",
    "ByteTokenizer",
    "Corpus",
    "DataBundle",
    "DistributedBatches",
    "HFTokenizer",
    "LMWindows",
    "MLMWindows",
    "TaskDataset",
    "TokenStream",
    "build_data",
    "cache_root",
    "cached_corpus",
    "corpus_for",
    "collate",
    "iter_documents",
    "load_tokenizer",
    "make_example",
    "open_corpus",
    "prepare",
    "read_meta",
    "source_files",
    "stdlib_files",
    "text_files",
    "val_batches",
]
