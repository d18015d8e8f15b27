"""The `python_source` data set: the standard library's .py files."""

import hashlib
import os
import pathlib
import sysconfig

import pytest

from train.config import DataConfig
from train import data
from train.data import corpus
from train.data import python_source
from train.data import tfds_source

FILES = {
    'a.py': b'import os\nprint(os.sep)\n',
    'pkg/__init__.py': b'',
    'pkg/mod.py': b'def f(x):\n    return x + 1\n',
    'latin.py': b'# -*- coding: latin-1 -*-\ns = "\xe9"\n',  # not UTF-8
    'site-packages/third.py': b'x = 1\n',  # third-party: left out
    'notes.txt': b'not python\n',
}
MANY = [f'many/m{i:02d}.py' for i in range(30)]


def make_tree(root: pathlib.Path) -> pathlib.Path:
  for name, content in FILES.items():
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / name).write_bytes(content)
  for i, name in enumerate(MANY):
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / name).write_text(f'VALUE_{i} = {i} * 2\n')
  return root


EXPECTED_FILES = sorted(['a.py', 'latin.py', 'pkg/__init__.py', 'pkg/mod.py',
                         *MANY])


def builder_for(root):
  class Subset(python_source.PythonSource, skip_registration=True):
    name = 'python_source_subset'

    def root(self):
      return root
  return Subset


def test_stdlib_files_are_sorted_relative_and_skip_site_packages(tmp_path):
  root = make_tree(tmp_path / 'lib')
  assert python_source.stdlib_files(root) == EXPECTED_FILES


def test_the_real_standard_library_is_listed():
  files = python_source.stdlib_files()
  assert python_source.stdlib_root() == pathlib.Path(
      sysconfig.get_paths()['stdlib'])
  assert files == sorted(files) and len(files) > 1000
  assert {'json/decoder.py', 'os.py'} <= set(files)
  assert any(f.startswith('test/') for f in files)  # tests included
  assert not any('site-packages' in f for f in files)


def test_lexical_tokens_by_hand():
  # def, f, (, x, ), :, return, x, +, 1
  assert python_source.lexical_tokens('def f(x):\n    return x + 1\n') == 10
  assert python_source.lexical_tokens('s = "\ufffd"') == 5  # s = " ? "


def test_subset_builds_through_the_builder_with_its_metadata(tmp_path):
  root = make_tree(tmp_path / 'lib')
  builder = tfds_source.embedded_builder(tmp_path / 'data', builder_for(root))
  texts = [(root / f).read_bytes().decode('utf-8', errors='replace')
           for f in EXPECTED_FILES]
  want = corpus.split_documents(texts)
  sources = tfds_source.data_sources(builder, ['train', 'validation'])
  for split in ('train', 'validation'):
    got = [sources[split][i]['text'].decode()
           for i in range(len(sources[split]))]
    assert got == want[split]
  assert len(want['validation']) == 1  # document 12 of 34
  digest = hashlib.sha256()
  for name in EXPECTED_FILES:
    content = hashlib.sha256((root / name).read_bytes()).hexdigest()
    digest.update(f'{name}\t{content}\n'.encode())
  expected = {
      'root': str(root), 'files': len(EXPECTED_FILES),
      'file_list_sha256': digest.hexdigest(),
      'bytes': sum(len((root / f).read_bytes()) for f in EXPECTED_FILES),
      'lexical_tokens': sum(python_source.lexical_tokens(t) for t in texts),
  }
  assert dict(builder.info.metadata) == expected
  # Read back from disk by a fresh builder: the metadata is in dataset_info.
  again = builder_for(root)(data_dir=os.fspath(tmp_path / 'data'),
                            file_format='array_record')
  assert again.is_prepared() and dict(again.info.metadata) == expected
  # One changed file changes the hash.
  (root / 'a.py').write_bytes(b'import sys\n')
  other = tfds_source.embedded_builder(tmp_path / 'other', builder_for(root))
  assert other.info.metadata['file_list_sha256'] != expected['file_list_sha256']


def test_an_empty_library_is_an_error(tmp_path):
  with pytest.raises(FileNotFoundError, match='no .py files'):
    tfds_source.embedded_builder(tmp_path / 'data',
                                 builder_for(tmp_path / 'empty'))


@pytest.mark.slow
def test_whole_library_by_name_with_its_tokenizer(tmp_path):
  config = DataConfig(name='python_source', data_dir=str(tmp_path))
  ds = data.prepare(config, vocab_size=1024)
  meta = ds.builder.info.metadata
  assert meta['files'] == len(python_source.stdlib_files())
  assert meta['bytes'] > 20_000_000
  assert isinstance(ds.builder, python_source.PythonSource)
  assert ds.tokenizer.vocab_size == 1024
  assert (tmp_path / 'tokenizers').is_dir()
  batch = next(ds.train_iter(4, 64, seed=0))
  assert batch['inputs'].shape == (4, 64)
