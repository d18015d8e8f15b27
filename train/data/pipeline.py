"""The grain pipeline: document indices -> (shard, shuffle, repeat) ->
read + tokenize -> pack (or pad each document) -> batch.

Per process: the documents ``process_index::process_count`` of the split
(disjoint shards), shuffled with ``seed`` differently each epoch (grain's
``shuffle`` then ``repeat`` folds the epoch into the seed), repeated forever.
Everything runs in the calling thread: no worker processes, no thread pool.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Optional

import grain
import numpy as np

from ..data.errors import SplitTooSmallError
from ..data.packing import PackIterDataset
from ..data.tokenizer import Tokenizer

SEED_MOD = 2**32  # grain's shuffle takes a uint32 seed


class PadOrTruncate:
  """Tokens of one document -> one row of ``seq_len`` loss positions.

  The document is cut to ``seq_len`` tokens, ending in EOS as the T5 tokenizer
  truncates, and padded with ``pad_id``. Row position i predicts token i + 1
  of the document, so a document of n <= seq_len tokens gives n - 1 loss
  tokens (``weights`` 1) and the rest of the row weighs 0: the official
  release's rows (HF labels with pads set to -100).
  """

  def __init__(self, seq_len: int, pad_id: int, eos_id: int):
    self.seq_len = seq_len
    self.pad_id = pad_id
    self.eos_id = eos_id

  def __call__(self, tokens: np.ndarray) -> dict[str, np.ndarray]:
    n = min(len(tokens), self.seq_len)
    row = np.full(self.seq_len + 1, self.pad_id, dtype=np.int32)
    row[:n] = tokens[:n]
    if len(tokens) > self.seq_len:
      row[n - 1] = self.eos_id
    weights = np.zeros(self.seq_len, dtype=np.float32)
    weights[:n - 1] = 1.0
    return {'inputs': row[:-1], 'targets': row[1:], 'weights': weights}


class ReadAndTokenize:
  """Source index -> int32 tokens of the example's text, then EOS."""

  def __init__(self, source: Sequence[Any], tokenizer: Tokenizer,
               text_key: str):
    self.source = source
    self.tokenizer = tokenizer
    self.text_key = text_key

  def text(self, index: int) -> bytes | str:
    return self.source[int(index)][self.text_key]

  def __call__(self, index: int) -> np.ndarray:
    return self.tokenizer.encode_document(self.text(index))


def document_indices(num_documents: int, *, shuffle: bool, seed: int,
                     process_index: int, process_count: int,
                     split: str) -> grain.MapDataset:
  """One epoch of this process's document indices, in stream order.

  Its ``repeat()`` is the endless stream: index ``j`` past the first epoch
  is document ``j mod len`` of a differently shuffled epoch.
  """
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} is not in '
                     f'[0, process_count={process_count}).')
  ds = grain.MapDataset.range(num_documents)[process_index::process_count]
  if len(ds) == 0:  # pylint: disable=g-explicit-length-test
    raise SplitTooSmallError(
        f'Split {split!r} has {num_documents} documents: none for process '
        f'{process_index} of {process_count}.')
  if shuffle:
    ds = ds.shuffle(seed % SEED_MOD)
  return ds


def check_enough_tokens(epoch: grain.MapDataset, tokenize: ReadAndTokenize,
                        needed: int, split: str, process_index: int,
                        process_count: int,
                        count: Callable[[np.ndarray], int] = len) -> None:
  """Raises unless one epoch of this shard has ``needed`` tokens.

  ``count(tokens)`` is what a document contributes (default: its length).
  Reads only as many documents as it takes (a handful for a real split).
  """
  total = 0
  for j in range(len(epoch)):
    total += count(tokenize(epoch[j]))
    if total >= needed:
      return
  shard = (f' (the shard of process {process_index} of {process_count})'
           if process_count > 1 else '')
  raise SplitTooSmallError(
      f'Split {split!r}{shard} has {total} tokens in {len(epoch)} documents, '
      f'fewer than one batch needs ({needed}); use a smaller batch or '
      f'sequence length, or a bigger split.')


def batches(epoch: grain.MapDataset, tokenize: ReadAndTokenize, *,
            batch_size: int, seq_len: int,
            pad: Optional[PadOrTruncate] = None) -> grain.IterDataset:
  """{'inputs', 'targets'}: int32 [batch_size, seq_len] batches, endless.

  Packed by default; with ``pad``, one document a row and a float32
  ``weights`` [batch_size, seq_len] loss mask.
  """
  docs = epoch.repeat().map(tokenize)
  if pad is not None:
    docs = docs.map(pad)
  # In the calling thread: grain's default reads with a pool of 16 threads.
  ds = docs.to_iter_dataset(grain.ReadOptions(num_threads=0,
                                              prefetch_buffer_size=0))
  if pad is None:
    ds = PackIterDataset(ds, length=seq_len)
  return ds.batch(batch_size, drop_remainder=True)
