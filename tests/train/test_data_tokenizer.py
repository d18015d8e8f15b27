"""The embedded data set's BPE tokenizer: trained once, cached atomically."""

import math
import os
import sys

import numpy as np
import pytest

from train.config import DataConfig
from train import data
from train.data import tokenizer as tokenizer_lib


def test_trained_once_and_cached(tmp_path, monkeypatch):
  config = DataConfig(data_dir=os.fspath(tmp_path))
  ds = data.prepare(config, vocab_size=512)
  path = tmp_path / 'tokenizers' / 'embedded_text_1.0.0_bpe_512.model'
  assert ds.tokenizer.path == path and path.is_file()
  assert ds.vocab_size == 512
  assert (ds.tokenizer.pad_id, ds.eos_id, ds.tokenizer.bos_id) == (0, 1, -1)
  assert not list(path.parent.glob('*.tmp'))  # no temp file left
  mtime = path.stat().st_mtime_ns

  def no_training(*args, **kwargs):
    raise AssertionError('retrained')
  monkeypatch.setattr(tokenizer_lib, 'train_bpe', no_training)
  again = data.prepare(config, vocab_size=512)
  assert path.stat().st_mtime_ns == mtime
  text = 'In the beginning God created the heaven and the earth.'
  ids = again.tokenizer.encode_document(text)
  assert ids.dtype == np.int32 and ids[-1] == again.eos_id
  assert again.tokenizer.decode(ids[:-1]) == text
  # The default normalizer (as T5's): any whitespace run becomes one space.
  code = 'def f(x):\n    if x:\n\treturn  x\n'
  assert again.tokenizer.decode(
      again.tokenizer.encode_document(code)[:-1]) == 'def f(x): if x: return x'
  assert 'tensorflow' not in sys.modules

  # Another vocabulary size is another model.
  monkeypatch.undo()
  other = data.prepare(config, vocab_size=300)
  assert other.vocab_size == 300 and other.tokenizer.path != path

  # The user's model file, when given, is used instead.
  user = data.prepare(DataConfig(data_dir=os.fspath(tmp_path),
                                 tokenizer=os.fspath(path)), vocab_size=1024)
  assert user.tokenizer.path == path and user.vocab_size == 512

  # Unigram baseline: finite, > 1, and computed on given batches too.
  ppl = data.unigram_perplexity(ds)
  assert math.isfinite(ppl) and 1 < ppl < 512
  batches = ds.eval_batches(4, 32, 2 * 4 * 32)
  ppl_b = data.unigram_perplexity(ds, batches=batches)
  assert math.isfinite(ppl_b) and ppl_b > 1


def test_write_atomic_keeps_old_file_on_failure(tmp_path, monkeypatch):
  path = tmp_path / 'm.model'
  tokenizer_lib.write_atomic(path, b'old')

  def broken_replace(src, dst):
    raise OSError('disk full')
  monkeypatch.setattr(os, 'replace', broken_replace)
  with pytest.raises(OSError):
    tokenizer_lib.write_atomic(path, b'new')
  monkeypatch.undo()
  assert path.read_bytes() == b'old'
  assert [p.name for p in tmp_path.iterdir()] == ['m.model']
