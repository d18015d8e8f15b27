"""The data pipeline: TFDS data (no TensorFlow) -> SentencePiece -> grain.

Public API::

  ds = prepare(config.data, vocab_size=config.model.vocab_size)
  it = ds.train_iter(batch_size, seq_len, seed, process_index=..., process_count=...)
  batch = next(it)   # {'inputs', 'targets'}: int32 [batch_size // process_count, seq_len]
  state = it.get_state(); it.set_state(state)   # exact resume (JSON-able dict)
  evals = ds.eval_batches(batch_size, seq_len, num_tokens)   # list of batches
  baseline = unigram_perplexity(ds)

Stages, one module each: ``corpus`` (the embedded text), ``python_source``
(the standard library's source files), ``tfds_source``
(the TFDS builder and data sources), ``tokenizer`` (SentencePiece),
``packing`` (concatenate-then-split), ``pipeline`` (grain), ``dataset``
(prepare and the iterators), ``baseline`` (unigram perplexity), ``errors``.
"""

from ..data.baseline import token_counts, unigram_perplexity
from ..data.dataset import Batch, Dataset, prepare, tokenizer_path
from ..data.errors import (DatasetNotPreparedError, FeatureNotFoundError,
                           SplitNotFoundError, SplitTooSmallError,
                           TokenizerError, UnknownDatasetError)
from ..data.tfds_source import EmbeddedText, open_builder
from ..data.tokenizer import Tokenizer

__all__ = [
    'Batch', 'Dataset', 'DatasetNotPreparedError', 'EmbeddedText',
    'FeatureNotFoundError', 'SplitNotFoundError', 'SplitTooSmallError',
    'Tokenizer', 'TokenizerError', 'UnknownDatasetError', 'open_builder',
    'prepare', 'token_counts', 'tokenizer_path', 'unigram_perplexity',
]
