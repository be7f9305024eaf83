"""Data: tokenizers, corpora, memory-mapped token shards, synthetic tasks and the DP batcher."""

from paratrain.data.loader import (
    DataBundle,
    DistributedBatches,
    LMWindows,
    MLMWindows,
    build_data,
    collate,
    val_batches,
)
from paratrain.data.shards import TokenStream, cache_root, cached_corpus, prepare, read_meta
from paratrain.data.sources import iter_documents, source_files, stdlib_files, text_files
from paratrain.data.tasks import TaskDataset, make_example
from paratrain.data.tokenizer import BPETokenizer, ByteTokenizer, load_tokenizer

__all__ = [
    "BPETokenizer",
    "ByteTokenizer",
    "DataBundle",
    "DistributedBatches",
    "LMWindows",
    "MLMWindows",
    "TaskDataset",
    "TokenStream",
    "build_data",
    "cache_root",
    "cached_corpus",
    "collate",
    "iter_documents",
    "load_tokenizer",
    "make_example",
    "prepare",
    "read_meta",
    "source_files",
    "stdlib_files",
    "text_files",
    "val_batches",
]
