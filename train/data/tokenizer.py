"""SentencePiece tokenizers: a BPE model trained once on the embedded training
split and cached in data_dir, or a user's model file (the T5 model for c4).

Special ids of the trained models follow T5's: ``pad=0``, ``eos=1``,
``unk=2``, no BOS. Documents are encoded as their pieces followed by EOS
(the separator when documents are packed). Pad fills the rows of unpacked
documents (``data.packing: false``, which needs a pad piece); packing leaves
no padding. A user's model must have an EOS piece.
"""

from __future__ import annotations

import io
import os
import pathlib
import tempfile
from collections.abc import Iterable

import numpy as np
import sentencepiece as spm

from ..data.errors import TokenizerError

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2


class Tokenizer:
  """A SentencePiece model plus the ids the pipeline needs."""

  def __init__(self, model_proto: bytes, path: str | os.PathLike):
    self.path = pathlib.Path(path)
    self._proto = model_proto
    self.processor = spm.SentencePieceProcessor(model_proto=model_proto)
    self.vocab_size: int = self.processor.get_piece_size()
    self.eos_id: int = self.processor.eos_id()
    self.pad_id: int = self.processor.pad_id()  # -1: none
    self.bos_id: int = self.processor.bos_id()  # -1: none

  def encode(self, text: str) -> list[int]:
    return self.processor.encode(text)

  def encode_document(self, text: str | bytes) -> np.ndarray:
    """Pieces of ``text`` then EOS, as int32."""
    if isinstance(text, bytes):
      text = text.decode('utf-8', errors='replace')
    ids = self.processor.encode(text)
    ids.append(self.eos_id)
    return np.asarray(ids, dtype=np.int32)

  def decode(self, ids: Iterable[int]) -> str:
    return self.processor.decode([int(i) for i in ids])

  def __getstate__(self):  # picklable (for grain worker processes)
    return {'model_proto': self._proto, 'path': os.fspath(self.path)}

  def __setstate__(self, state):
    self.__init__(state['model_proto'], state['path'])

  def __repr__(self):
    return (f'Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size}, '
            f'eos_id={self.eos_id})')


def load(path: str | os.PathLike, max_vocab_size: int) -> Tokenizer:
  """Loads a SentencePiece model file; checks it fits a model vocabulary."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(
        f'SentencePiece model file {str(path)!r} not found '
        f'({path.absolute()}); set data.tokenizer to an existing .model file.')
  try:
    tokenizer = Tokenizer(path.read_bytes(), path)
  except (RuntimeError, OSError) as e:
    raise TokenizerError(
        f'SentencePiece model file {str(path)!r} does not load: {e}') from None
  if tokenizer.vocab_size > max_vocab_size:
    raise TokenizerError(
        f'SentencePiece model {str(path)!r} has {tokenizer.vocab_size} pieces, '
        f'more than model.vocab_size={max_vocab_size}; raise model.vocab_size '
        f'to at least {tokenizer.vocab_size}.')
  if tokenizer.eos_id < 0:
    raise TokenizerError(
        f'SentencePiece model {str(path)!r} has no EOS piece; the pipeline '
        f'separates documents with EOS.')
  return tokenizer


def train_bpe(lines: Iterable[str], vocab_size: int) -> bytes:
  """Trains a BPE model on ``lines`` (one sentence each); returns its bytes.

  With a small corpus the model may end up with fewer than ``vocab_size``
  pieces (never more). The model keeps SentencePiece's default normalizer
  (``nmt_nfkc``, extra whitespace removed), as the T5 vocabulary the paper
  used does: encoding turns every run of whitespace, newlines and
  indentation included, into one space, so ``decode(encode(text))`` is
  ``text`` with its whitespace collapsed.
  """
  out = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines),
      model_writer=out,
      model_type='bpe',
      vocab_size=vocab_size,
      hard_vocab_limit=False,
      pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
      character_coverage=1.0,
      max_sentence_length=1 << 16,
      num_threads=max(1, min(4, os.cpu_count() or 1)),
      minloglevel=2,
  )
  return out.getvalue()


def write_atomic(path: pathlib.Path, data: bytes) -> None:
  """Writes ``data`` to a temporary file beside ``path``, then renames it."""
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.',
                             suffix='.tmp')
  try:
    os.chmod(tmp, 0o644)  # mkstemp makes it private
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def trained_bpe(path: pathlib.Path, texts: Iterable[str],
                vocab_size: int) -> Tokenizer:
  """The BPE model cached at ``path``, trained on ``texts`` if missing.

  Texts are cut into lines (SentencePiece skips "sentences" longer than
  ``max_sentence_length``; whole documents can be).
  """
  if not path.is_file():
    lines = (line for text in texts for line in text.splitlines()
             if line.strip())
    try:
      proto = train_bpe(lines, vocab_size)
    except RuntimeError as e:
      raise TokenizerError(
          f'Training a {vocab_size}-piece BPE model for {path} failed: {e}'
      ) from None
    write_atomic(path, proto)
  return load(path, vocab_size)
