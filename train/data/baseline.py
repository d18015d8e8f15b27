"""The unigram baseline: the perplexity of token frequencies.

Frequencies are counted on training tokens (documents with their EOS) with
add-one smoothing over the tokenizer's vocabulary; perplexity is measured on
the eval split's token stream, or on the targets of given batches (the
tokens a model is scored on). A trained language model must beat it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import numpy as np


def token_counts(dataset, split: str,
                 max_documents: Optional[int] = None) -> np.ndarray:
  """Token frequencies (int64 [vocab_size]) of ``split``, EOS included."""
  counts = np.zeros(dataset.vocab_size, dtype=np.int64)
  texts = list(dataset.texts(split, max_documents))
  for start in range(0, len(texts), 1024):
    chunk = texts[start:start + 1024]
    ids = dataset.tokenizer.processor.encode(chunk)
    flat = np.concatenate([np.asarray(doc, dtype=np.int64) for doc in ids]
                          + [np.zeros(0, np.int64)])
    counts += np.bincount(flat, minlength=dataset.vocab_size)
    counts[dataset.eos_id] += len(chunk)
  return counts


def unigram_perplexity(dataset, *, batches: Optional[Sequence[dict]] = None,
                       max_documents: Optional[int] = 100_000) -> float:
  """exp(mean -log p(t)) of the add-one smoothed unigram model.

  Args:
    dataset: a ``train.data.Dataset``.
    batches: score these batches' ``targets``; default: the whole eval split.
    max_documents: count training frequencies (and read the eval split) on at
      most this many documents per split (None: all).
  """
  train = token_counts(dataset, dataset.train_split, max_documents)
  log_p = (np.log(train + 1.0)
           - np.log(float(train.sum()) + dataset.vocab_size))
  if batches is not None:
    eval_counts = np.zeros_like(train)
    for batch in batches:
      eval_counts += np.bincount(np.asarray(batch['targets']).ravel(),
                                 minlength=dataset.vocab_size)[:dataset.vocab_size]
  else:
    eval_counts = token_counts(dataset, dataset.eval_split, max_documents)
  n = eval_counts.sum()
  if n == 0:
    raise ValueError('unigram_perplexity: no eval tokens.')
  return float(np.exp(-(eval_counts * log_p).sum() / n))
