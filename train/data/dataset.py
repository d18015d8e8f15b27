"""``prepare``: a DataConfig -> a ready ``Dataset`` (data sources + tokenizer),
and the ``Dataset``'s train and eval iterators."""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Iterator, Sequence
from typing import Any, Optional

import grain
import numpy as np
import tensorflow_datasets as tfds

from ..data import pipeline
from ..data import tfds_source
from ..data import tokenizer as tokenizer_lib
from ..data.errors import (FeatureNotFoundError, TokenizerError,
                           UnknownDatasetError)
from ..data.tokenizer import Tokenizer

# {'inputs', 'targets'}: int32 [B, L]; unpacked data adds 'weights' float32.
Batch = dict[str, np.ndarray]


@dataclasses.dataclass
class Dataset:
  """A prepared data set: random-access splits plus a tokenizer.

  Attributes:
    name: ``data.name`` as configured.
    builder: the TFDS builder (``builder.info`` describes the data).
    sources: split name -> random-access source of examples (dicts).
    tokenizer: the SentencePiece tokenizer.
    text_key: the example field holding the text.
    train_split, eval_split: split names.
    shuffle: whether ``train_iter`` shuffles by default.
    eval_shuffle: whether the eval reads its documents in a fixed shuffled
      order (seed 0) rather than in stored order.
    packing: pack documents into rows (True) or give each document its own
      row, truncated or padded to ``seq_len`` with pads weighted 0 (False).
  """
  name: str
  builder: tfds.core.DatasetBuilder
  sources: dict[str, Sequence[Any]]
  tokenizer: Tokenizer
  text_key: str = 'text'
  train_split: str = 'train'
  eval_split: str = 'validation'
  shuffle: bool = True
  packing: bool = True
  eval_shuffle: bool = False

  @property
  def vocab_size(self) -> int:
    """The tokenizer's vocabulary size (<= the model's)."""
    return self.tokenizer.vocab_size

  @property
  def eos_id(self) -> int:
    return self.tokenizer.eos_id

  def num_documents(self, split: str) -> int:
    return len(self.sources[split])

  def tokenize_fn(self, split: str) -> pipeline.ReadAndTokenize:
    return pipeline.ReadAndTokenize(self.sources[split], self.tokenizer,
                                    self.text_key)

  def _pad(self, seq_len: int) -> Optional[pipeline.PadOrTruncate]:
    if self.packing:
      return None
    return pipeline.PadOrTruncate(seq_len, self.tokenizer.pad_id,
                                  self.tokenizer.eos_id)

  def _batches(self, split, batch_size, seq_len, *, shuffle, seed,
               process_index, process_count) -> grain.IterDataset:
    """This process's endless batches of ``split``, after checking that
    an epoch of its shard can fill one."""
    if batch_size % process_count:
      raise ValueError(f'batch_size={batch_size} is not divisible by '
                       f'process_count={process_count}.')
    local_batch = batch_size // process_count
    if local_batch < 1 or seq_len < 1:
      raise ValueError(f'need batch_size >= process_count and seq_len >= 1, '
                       f'got {batch_size}, {seq_len}.')
    epoch = pipeline.document_indices(
        self.num_documents(split), shuffle=shuffle, seed=seed,
        process_index=process_index, process_count=process_count,
        split=split)
    tokenize = self.tokenize_fn(split)
    if self.packing:
      pipeline.check_enough_tokens(epoch, tokenize,
                                   local_batch * seq_len + 1, split,
                                   process_index, process_count)
    else:  # Rows repeat forever; an epoch needs one loss token to count on.
      pipeline.check_enough_tokens(
          epoch, tokenize, 1, split, process_index, process_count,
          count=lambda tokens: min(len(tokens), seq_len) - 1)
    return pipeline.batches(epoch, tokenize, batch_size=local_batch,
                            seq_len=seq_len, pad=self._pad(seq_len))

  def train_iter(self, batch_size: int, seq_len: int, seed: int, *,
                 process_index: int = 0, process_count: int = 1,
                 shuffle: Optional[bool] = None) -> grain.DatasetIterator:
    """Endless training batches for this process.

    Each ``next()`` gives {'inputs', 'targets'}: int32
    ``[batch_size // process_count, seq_len]``, targets the inputs shifted by
    one (and ``weights`` float32, the loss mask, when ``packing`` is off).
    The order is a function of (seed, process_index, process_count,
    batch_size, seq_len) only. The iterator is a grain ``DatasetIterator``:
    ``get_state()`` (a small JSON-able dict) / ``set_state()`` resume exactly,
    and grain's Orbax handler (``grain.checkpoint.CheckpointSave``) saves it.
    """
    shuffle = self.shuffle if shuffle is None else shuffle
    return iter(self._batches(
        self.train_split, batch_size, seq_len, shuffle=shuffle, seed=seed,
        process_index=process_index, process_count=process_count))

  def eval_batches(self, batch_size: int, seq_len: int, num_tokens: int, *,
                   process_index: int = 0, process_count: int = 1
                   ) -> list[Batch]:
    """This process's part of the first global batches of the eval split
    that together hold at least ``num_tokens`` loss tokens.

    In stored order (a fixed shuffled order with ``eval_shuffle``); the
    split is repeated if it is shorter. Same every
    call and the same number of batches on every process: packed batches
    hold ``batch_size * seq_len`` loss tokens each, and unpacked ones are
    counted over every process's rows (each process reads the others'
    documents to count their pads).
    """
    def rows(index):
      return iter(self._batches(
          self.eval_split, batch_size, seq_len, shuffle=self.eval_shuffle,
          seed=0, process_index=index, process_count=process_count))

    own = rows(process_index)
    if self.packing:
      num_batches = -(-num_tokens // (batch_size * seq_len))
      return [next(own) for _ in range(num_batches)]
    others = [rows(q) for q in range(process_count) if q != process_index]
    loss_tokens = lambda batch: int(np.count_nonzero(batch['weights']))
    batches, total = [], 0
    while total < num_tokens:
      batches.append(next(own))
      total += loss_tokens(batches[-1]) + sum(loss_tokens(next(it))
                                              for it in others)
    return batches

  def texts(self, split: str, limit: Optional[int] = None) -> Iterator[str]:
    """The texts of ``split`` in stored order, up to ``limit``."""
    return texts(self.sources[split], self.text_key, limit)

  def documents_holding(self, split: str, num_tokens: int) -> int:
    """How many documents of ``split``, in the order the eval reads them
    (stored, or shuffled with ``eval_shuffle``), hold its first
    ``num_tokens`` tokens (each document's tokens and its EOS): where
    :meth:`eval_batches` reads from on one process (all of them when the
    split is shorter)."""
    order = pipeline.document_indices(
        self.num_documents(split), shuffle=self.eval_shuffle, seed=0,
        process_index=0, process_count=1, split=split)
    tokenize = self.tokenize_fn(split)
    total, count = 0, 0
    for index in order:
      if total >= num_tokens:
        break
      total += len(tokenize(index))
      count += 1
    return count


def texts(source: Sequence[Any], text_key: str,
          limit: Optional[int] = None) -> Iterator[str]:
  """``example[text_key]`` of the first ``limit`` examples, as str."""
  n = len(source) if limit is None else min(limit, len(source))
  for i in range(n):
    text = source[i][text_key]
    yield (text.decode('utf-8', errors='replace')
           if isinstance(text, bytes) else text)


def tokenizer_path(data_dir: str | os.PathLike,
                   builder: tfds.core.DatasetBuilder, vocab_size: int
                   ) -> pathlib.Path:
  """Where the trained BPE model for the embedded data set is cached."""
  return (pathlib.Path(data_dir) / 'tokenizers' /
          f'{builder.name}_{builder.version}_bpe_{vocab_size}.model')


def prepare(config, vocab_size: int) -> Dataset:
  """Opens (preparing on first use) the data set and tokenizer of ``config``.

  Args:
    config: a ``train.config.DataConfig``.
    vocab_size: the model's vocabulary size; the embedded data set's BPE
      model is trained with this many pieces, a user's model must not have
      more.

  ``config.name`` ``'embedded'`` or ``'python_source'``: builds that data set
  under ``config.data_dir`` once (array_record), and trains a BPE model on its
  training split once (cached in ``<data_dir>/tokenizers/``) unless
  ``config.tokenizer`` names a model file. Any other name is a TFDS data set
  (``'c4/en'``, ``'c4/en:3.1.0'``) already prepared in array_record format
  under ``config.data_dir`` and needs ``config.tokenizer``.
  """
  builder = tfds_source.open_builder(config.name, config.data_dir)
  features = builder.info.features
  if config.text_key not in features:
    raise FeatureNotFoundError(
        f'data.text_key={config.text_key!r} is not a feature of data set '
        f'{config.name!r} ({builder.info.full_name} under {config.data_dir}); '
        f'it has {sorted(features.keys())}.')
  splits = list(dict.fromkeys([config.train_split, config.eval_split]))
  sources = tfds_source.data_sources(builder, splits)
  embedded = isinstance(builder, tfds_source.EmbeddedText)
  if config.tokenizer:
    tokenizer = tokenizer_lib.load(config.tokenizer, vocab_size)
  elif embedded:
    tokenizer = tokenizer_lib.trained_bpe(
        tokenizer_path(config.data_dir, builder, vocab_size),
        texts(sources[config.train_split], config.text_key), vocab_size)
  else:
    raise UnknownDatasetError(
        f'data.tokenizer is not set: data set {config.name!r} needs a '
        f'SentencePiece model file (for c4, the T5 model: vocab 32000).')
  if not config.packing and tokenizer.pad_id < 0:
    raise TokenizerError(
        f'data.packing=false pads documents with the tokenizer\'s pad id, but '
        f'SentencePiece model {str(tokenizer.path)!r} has no pad piece; use '
        f'data.packing=true or a model with one (T5\'s has pad id 0).')
  return Dataset(name=config.name, builder=builder, sources=sources,
                 tokenizer=tokenizer, text_key=config.text_key,
                 train_split=config.train_split, eval_split=config.eval_split,
                 shuffle=config.shuffle, packing=config.packing,
                 eval_shuffle=config.eval_shuffle)


__all__ = ['Batch', 'Dataset', 'prepare', 'texts', 'tokenizer_path']
