"""The embedded corpus, the TFDS builders (no TensorFlow), generic TFDS
data sets by name (the c4 path) and their errors."""

import json
import os
import sys

import pytest
import tensorflow_datasets as tfds

from train.config import DataConfig
from train import data
from train.data import corpus
from train.data import tfds_source
from train.data import tokenizer as tokenizer_lib

TINY_DOCS = [f'Document number {i}. ' + 'The quick brown fox jumps. ' * (i % 5 + 1)
             for i in range(60)]


class TinyText(tfds_source.EmbeddedText, skip_registration=True):
  """The embedded builder on a tiny corpus."""
  name = 'tiny_text'
  fail_after = None  # raise after this many examples (an interrupted run)

  def documents(self):
    return TINY_DOCS

  def _generate_examples(self, docs):
    for i, text in enumerate(docs):
      if self.fail_after is not None and i >= self.fail_after:
        raise RuntimeError('interrupted')
      yield i, {'text': text}


class FakeC4(tfds_source.EmbeddedText, skip_registration=True):
  """A c4-like data set: config 'en', version 3.1.0, text + url features.
  Not registered, so reading it by name goes through the prepared files,
  as for c4 (whose TFDS code needs TensorFlow)."""
  name = 'fake_c4'
  VERSION = tfds.core.Version('3.1.0')
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name='en')]

  def documents(self):
    return TINY_DOCS

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, description='fake c4',
        features=tfds.features.FeaturesDict({'text': tfds.features.Text(),
                                             'url': tfds.features.Text()}))

  def _generate_examples(self, docs):
    for i, text in enumerate(docs):
      yield f'k{i}', {'text': text, 'url': f'http://x/{i}'}


def test_corpus_documents_and_split():
  docs = corpus.documents()
  assert len(docs) > 1200
  assert docs[0].startswith('Genesis 1\nIn the beginning')
  splits = corpus.split_documents(docs)
  assert len(splits['train']) + len(splits['validation']) == len(docs)
  assert 0.02 <= len(splits['validation']) / len(docs) <= 0.05
  assert corpus.split_documents(docs) == splits  # deterministic
  assert 'bible' not in sys.modules  # located without importing it


def test_tiny_builder_both_splits_without_tensorflow(tmp_path):
  builder = tfds_source.prepare_builder(
      TinyText(data_dir=os.fspath(tmp_path), file_format='array_record'))
  assert builder.is_prepared()
  sources = tfds_source.data_sources(builder, ['train', 'validation'])
  expected = corpus.split_documents(TINY_DOCS)
  for split in ('train', 'validation'):
    got = [sources[split][i]['text'].decode() for i in range(len(sources[split]))]
    assert got == expected[split]  # stored in corpus order
  assert 'tensorflow' not in sys.modules
  files = {p.name for p in (tmp_path / 'tiny_text' / '1.0.0').iterdir()}
  assert 'tiny_text-train.array_record-00000-of-00001' in files
  assert 'dataset_info.json' in files


def test_interrupted_prepare_leaves_nothing_usable(tmp_path):
  TinyText.fail_after = 5
  try:
    with pytest.raises(RuntimeError, match='interrupted'):
      tfds_source.prepare_builder(
          TinyText(data_dir=os.fspath(tmp_path), file_format='array_record'))
  finally:
    TinyText.fail_after = None
  base = tmp_path / 'tiny_text'
  assert not (base / '1.0.0').exists()
  assert not list(base.glob('incomplete*'))  # temp dir removed
  # A killed preparer leaves a temp dir behind: it is ignored.
  (base / 'incomplete.ABCDEF_1.0.0').mkdir(parents=True)
  (base / 'incomplete.ABCDEF_1.0.0' / 'junk.array_record-00000-of-00001'
   ).write_bytes(b'half')
  builder = TinyText(data_dir=os.fspath(tmp_path), file_format='array_record')
  assert not builder.is_prepared()
  builder = tfds_source.prepare_builder(builder)
  assert len(builder.as_data_source('train')) == len(
      corpus.split_documents(TINY_DOCS)['train'])


def test_real_embedded_builder(tmp_path):
  builder = tfds_source.embedded_builder(tmp_path)
  info = json.loads((tmp_path / 'embedded_text' / '1.0.0' /
                     'dataset_info.json').read_text())
  assert info['name'] == 'embedded_text'
  src = tfds.data_source('embedded_text', data_dir=os.fspath(tmp_path),
                         download=False)
  assert set(src) == {'train', 'validation'}
  n = len(corpus.documents())
  assert len(src['train']) + len(src['validation']) == n
  assert src['train'][0]['text'].startswith(b'Genesis 1')
  assert builder.info.splits['validation'].num_examples == len(src['validation'])
  assert 'tensorflow' not in sys.modules


@pytest.fixture(scope='module')
def fake_c4(tmp_path_factory):
  """(data_dir, tokenizer file) of a prepared c4-like data set."""
  root = tmp_path_factory.mktemp('fake_c4')
  tfds_source.prepare_builder(FakeC4(data_dir=os.fspath(root / 'tfds'),
                                     config='en', file_format='array_record'))
  model = root / 'spm.model'
  tokenizer_lib.write_atomic(model, tokenizer_lib.train_bpe(TINY_DOCS, 96))
  return root / 'tfds', model


@pytest.mark.parametrize('name', ['fake_c4/en', 'fake_c4/en:3.1.0', 'fake_c4'])
def test_generic_tfds_by_name_with_user_tokenizer(fake_c4, name):
  data_dir, model = fake_c4
  ds = data.prepare(DataConfig(name=name, data_dir=os.fspath(data_dir),
                               tokenizer=os.fspath(model)), vocab_size=128)
  assert not isinstance(ds.builder, tfds_source.EmbeddedText)  # read from files
  assert ds.tokenizer.path == model and ds.vocab_size <= 128
  assert ds.num_documents('train') + ds.num_documents('validation') == 60
  batch = next(ds.train_iter(4, 16, seed=0))
  assert batch['inputs'].shape == (4, 16)
  assert 'tensorflow' not in sys.modules


def test_generic_errors(fake_c4, tmp_path):
  data_dir, model = fake_c4
  cfg = lambda **kw: DataConfig(**{'data_dir': os.fspath(data_dir),  # noqa
                                   'tokenizer': os.fspath(model), **kw})
  with pytest.raises(data.UnknownDatasetError, match='no_such_set.*data_dir'):
    data.prepare(cfg(name='no_such_set'), 128)
  empty = os.fspath(tmp_path / 'empty')
  with pytest.raises(data.DatasetNotPreparedError,
                     match=r"'c4/en' is not prepared under data_dir=.*empty.*"
                           r'tfds build c4'):
    data.prepare(DataConfig(name='c4/en', data_dir=empty, tokenizer='x'), 128)
  with pytest.raises(FileNotFoundError):  # the not-prepared error is one
    data.prepare(DataConfig(name='c4/en:3.1.0', data_dir=empty), 128)
  with pytest.raises(data.UnknownDatasetError, match='data.tokenizer'):
    data.prepare(cfg(name='fake_c4/en', tokenizer=None), 128)
  with pytest.raises(ValueError, match="text_key='content'.*'text', 'url'"):
    data.prepare(cfg(name='fake_c4/en', text_key='content'), 128)
  with pytest.raises(ValueError, match="'test' not found.*fake_c4"):
    data.prepare(cfg(name='fake_c4/en', eval_split='test'), 128)
  with pytest.raises(FileNotFoundError, match='nope.model'):
    data.prepare(cfg(name='fake_c4/en', tokenizer=os.fspath(tmp_path / 'nope.model')), 128)
  bad = tmp_path / 'bad.model'
  bad.write_bytes(b'not a sentencepiece model')
  with pytest.raises(data.TokenizerError, match='bad.model.*does not load'):
    data.prepare(cfg(name='fake_c4/en', tokenizer=os.fspath(bad)), 128)
  with pytest.raises(data.TokenizerError, match='96 pieces.*vocab_size=64'):
    data.prepare(cfg(name='fake_c4/en'), 64)
