"""Data pipeline: text inputs, tokenizers, text -> packed MDS shards, and resumable streaming
loaders."""
from .loader import DataError, batches, build_loader, read_meta
from .prepare import prepare_dataset
from .texts import SOURCES_HELP, iter_texts
from .tokenizer import Tokenizer, load_tokenizer, train_sentencepiece

__all__ = [
    "DataError", "SOURCES_HELP", "Tokenizer", "batches", "build_loader", "iter_texts", "load_tokenizer",
    "prepare_dataset",
    "read_meta", "train_sentencepiece",
]
