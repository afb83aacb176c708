"""Data: document sources, tokenizers, the embedded corpus, packing and the grain pretraining pipeline.

Typical use (the trainer)::

    tok = build_tokenizer(config)                      # loaded, or trained once and cached
    it = make_iterator(config, tok, process_index=jax.process_index(),
                       process_count=jax.process_count())
    batch = next(it)                                   # int32 [per_process_batch, seq_len] arrays
    state = it.get_state()                             # JSON-able; save with the checkpoint
    it.set_state(state)                                # exact resume
"""

from joyjax.data.corpus import build_embedded_corpus, select_stdlib_files
from joyjax.data.packing import PackIterDataset, to_example
from joyjax.data.pipeline import (
    DataIterator,
    build_tokenizer,
    make_dataset,
    make_iterator,
    open_corpus,
)
from joyjax.data.sources import (
    ArrayRecordSource,
    DataError,
    DocumentSource,
    JsonlSource,
    ParquetSource,
    TextSource,
    detect_format,
    expand_paths,
    open_source,
)
from joyjax.data.tokenizer import (
    BOS,
    EOS,
    PAD,
    Tokenizer,
    cached_train_tokenizer,
    check_vocab_fits,
    load_tokenizer,
    train_tokenizer,
)

__all__ = [
    "ArrayRecordSource", "BOS", "DataError", "DataIterator", "DocumentSource", "EOS",
    "JsonlSource", "PAD", "PackIterDataset", "ParquetSource", "TextSource", "Tokenizer",
    "build_embedded_corpus", "build_tokenizer", "cached_train_tokenizer", "check_vocab_fits",
    "detect_format", "expand_paths", "load_tokenizer", "make_dataset", "make_iterator", "open_corpus",
    "open_source", "select_stdlib_files", "to_example", "train_tokenizer",
]
