"""Packing: documents (int32 token arrays, each ending in EOS) concatenated
into one stream and cut into windows of ``length + 1`` tokens that overlap by
one token (window k is ``stream[k*length : (k+1)*length + 1]``), each yielded
as ``{'inputs': w[:-1], 'targets': w[1:]}``. Every token of the stream after
the first is a target exactly once; nothing is padded or dropped except the
incomplete tail of a finite stream.

The iterator's state is the parent's state before the document holding the
next window's first token, plus that token's offset in the document: small,
integers only (JSON-safe), and exact on restore. (Grain's
``ConcatThenSplitIterDataset`` keeps tuples in its state, which a JSON round
trip through an Orbax checkpoint turns into lists that it then misreads.)
"""

from __future__ import annotations

import collections
from typing import Any

import numpy as np
import grain


class PackIterDataset(grain.IterDataset):
  """Concatenate-then-split packing of 1-D int token arrays."""

  def __init__(self, parent: grain.IterDataset, *, length: int):
    super().__init__(parent)
    if length < 1:
      raise ValueError(f'length must be positive, got {length}.')
    self._length = length

  def __iter__(self) -> grain.DatasetIterator:
    return PackDatasetIterator(self._parent.__iter__(), length=self._length)

  def __str__(self) -> str:
    return f'PackIterDataset(length={self._length})'


class PackDatasetIterator(grain.DatasetIterator):
  """See the module docstring. ``length`` is the number of inputs per row."""

  def __init__(self, parent: grain.DatasetIterator, *, length: int):
    super().__init__(parent)
    self._length = length
    # Documents pulled from the parent not yet fully consumed, with the
    # parent's state before each: deque of (state, tokens).
    self._docs: collections.deque = collections.deque()
    self._available = 0  # tokens in self._docs from self._offset on
    self._offset = 0  # position of the next window's first token in docs[0]
    self._state_before_next_doc = self._parent.get_state()

  def _pull(self) -> bool:
    state = self._parent.get_state()
    try:
      tokens = next(self._parent)
    except StopIteration:
      return False
    tokens = np.asarray(tokens, dtype=np.int32).reshape(-1)
    if not self._docs:  # a restored offset applies to the first doc pulled
      self._available -= self._offset
    self._docs.append((state, tokens))
    self._available += len(tokens)
    return True

  def __next__(self) -> dict[str, np.ndarray]:
    need = self._length + 1
    while self._available < need:
      if not self._pull():
        raise StopIteration
    window = np.empty(need, dtype=np.int32)
    filled, pos = 0, self._offset
    for _, tokens in self._docs:
      take = min(len(tokens) - pos, need - filled)
      window[filled:filled + take] = tokens[pos:pos + take]
      filled += take
      pos = 0
      if filled == need:
        break
    # Advance the start by `length`: the last token starts the next window.
    self._offset += self._length
    self._available -= self._length
    while self._docs and self._offset >= len(self._docs[0][1]):
      self._offset -= len(self._docs[0][1])
      self._docs.popleft()
    if not self._docs:
      self._state_before_next_doc = self._parent.get_state()
    return {'inputs': window[:-1], 'targets': window[1:]}

  def get_state(self) -> dict[str, Any]:
    parent = self._docs[0][0] if self._docs else self._state_before_next_doc
    return {'parent': parent, 'offset': int(self._offset)}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state['parent'])
    self._docs.clear()
    self._offset = int(state['offset'])
    self._available = 0
    self._state_before_next_doc = state['parent']
