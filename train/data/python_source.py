"""The ``python_source`` data set: the running Python's standard library.

Documents are the standard library's ``.py`` files (tests included, third-party
``site-packages`` excluded), one document per file, sorted by path relative to
the library's root; about 1,800 files and 31 MB of code for CPython 3.11. A
file that is not UTF-8 is decoded with replacement characters. Every 25th file
goes to validation (``corpus.split_documents``, as for the embedded corpus),
and the tokenizer is a BPE model trained on the training split, as for the
embedded corpus (``train.data.prepare``). That tokenizer collapses every run
of whitespace into one space (SentencePiece's default normalizer, as in the T5
vocabulary), so the model sees the code without its newlines and indentation.

The files come from the interpreter that prepares the data set, so they differ
between Python versions: ``dataset_info`` records, in its metadata, the
SHA-256 of the file list (each path with the SHA-256 of its bytes), the number
of files, of bytes, and of lexical tokens (identifiers, numbers and single
punctuation characters: a count that no tokenizer choice changes).
"""

from __future__ import annotations

import hashlib
import pathlib
import re
import sysconfig
from collections.abc import Sequence
from typing import Any

import tensorflow_datasets as tfds

from ..data.tfds_source import EmbeddedText

_LEXICAL_TOKEN = re.compile(r'\w+|[^\w\s]')


def stdlib_root() -> pathlib.Path:
  """The running Python's standard library folder."""
  return pathlib.Path(sysconfig.get_paths()['stdlib'])


def stdlib_files(root: pathlib.Path | None = None) -> list[str]:
  """The library's ``.py`` files as sorted POSIX paths relative to ``root``."""
  root = root or stdlib_root()
  return sorted(
      p.relative_to(root).as_posix() for p in root.rglob('*.py')
      if p.is_file() and 'site-packages' not in p.relative_to(root).parts)


def file_list_sha256(files: Sequence[str], contents: Sequence[bytes]) -> str:
  """SHA-256 over ``<path>\\t<sha256 of its bytes>\\n`` for each file."""
  digest = hashlib.sha256()
  for name, content in zip(files, contents, strict=True):
    digest.update(f'{name}\t{hashlib.sha256(content).hexdigest()}\n'.encode())
  return digest.hexdigest()


def lexical_tokens(text: str) -> int:
  """Identifiers/numbers (``\\w+``) plus other non-space characters."""
  return sum(1 for _ in _LEXICAL_TOKEN.finditer(text))


class PythonSource(EmbeddedText):
  """The standard library's source files as a text data set.

  Nothing is downloaded. Subclasses may override ``root`` (tests build a few
  files through the same code).
  """

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Sorted stdlib .py files of the running Python; '
                            'every 25th file to validation.'}

  def root(self) -> pathlib.Path:
    return stdlib_root()

  def _contents(self) -> tuple[list[str], list[bytes]]:
    root = self.root()
    files = stdlib_files(root)
    if not files:
      raise FileNotFoundError(f'no .py files under {root}.')
    return files, [(root / name).read_bytes() for name in files]

  def documents(self) -> Sequence[str]:
    return [c.decode('utf-8', errors='replace') for c in self._contents()[1]]

  def describe(self) -> dict[str, Any]:
    """The metadata recorded in ``dataset_info`` (module docstring)."""
    files, contents = self._contents()
    return {'root': str(self.root()), 'files': len(files),
            'file_list_sha256': file_list_sha256(files, contents),
            'bytes': sum(len(c) for c in contents),
            'lexical_tokens': sum(lexical_tokens(t) for t in self.documents())}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description=__doc__,
        features=tfds.features.FeaturesDict({'text': tfds.features.Text()}),
        metadata=tfds.core.MetadataDict(), disable_shuffling=True)

  def _split_generators(self, dl_manager):
    self.info.metadata.update(self.describe())
    return super()._split_generators(dl_manager)
