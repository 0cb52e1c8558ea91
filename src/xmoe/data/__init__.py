"""Corpus loading, tokenizer training/caching and LM batches."""

from .corpus import Document, load_documents, shakespeare_documents, split_documents
from .dataset import TokenData, prepare_data
from .tokenizer import train_tokenizer

__all__ = [
    "Document",
    "TokenData",
    "load_documents",
    "prepare_data",
    "shakespeare_documents",
    "split_documents",
    "train_tokenizer",
]
