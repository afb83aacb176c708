"""Data: document sources, tokenizers, the embedded corpus, packing and the grain pretraining pipeline.

Typical use (the trainer)::

    tok = build_tokenizer(config)                      # loaded, or trained once and cached
    it = make_iterator(config, tok, process_index=jax.process_index(),
                       process_count=jax.process_count())
    batch = next(it)                                   # int32 [per_process_batch, seq_len] arrays
    state = it.get_state()                             # JSON-able; save with the checkpoint
    it.set_state(state)                                # exact resume

Supervised fine-tuning reads conversations instead (``chat.py``: the chat format; ``sft.py``: the pipeline)::

    it = make_sft_iterator(config, tok, process_index=..., process_count=...)   # the same LM_KEYS batches
    r = render(messages, tok, thinking=True)           # ids, loss_mask (assistant tokens), text
"""

from joyjax.data.chat import (
    ChatTemplate,
    Rendered,
    add_chat_tokens,
    load_template,
    parse,
    render,
    render_prompt,
    template_from_config,
    to_messages,
)
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
    open_rows,
    open_source,
)
from joyjax.data.sft import SftIterator, make_sft_dataset, make_sft_eval_dataset, make_sft_iterator
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
    "ArrayRecordSource", "BOS", "ChatTemplate", "DataError", "DataIterator", "DocumentSource", "EOS",
    "JsonlSource", "PAD", "PackIterDataset", "ParquetSource", "Rendered", "SftIterator", "TextSource", "Tokenizer",
    "add_chat_tokens", "build_embedded_corpus", "build_tokenizer", "cached_train_tokenizer", "check_vocab_fits",
    "detect_format", "expand_paths", "load_template", "load_tokenizer", "make_dataset", "make_iterator",
    "make_sft_dataset", "make_sft_eval_dataset", "make_sft_iterator", "open_corpus", "open_rows", "open_source",
    "parse", "render", "render_prompt", "select_stdlib_files", "template_from_config", "to_example",
    "to_messages", "train_tokenizer",
]
