"""data.packing=false: one document a row, truncated or padded, pads masked."""

import dataclasses
import json
import os

import numpy as np
import pytest

from train import data
from train.config import DataConfig
from train.data import tfds_source
from train.data import tokenizer as tokenizer_lib

# 1 to ~60 tokens each: with L=24 some rows are truncated, most padded.
DOCS = [f'doc {i} ' + ' '.join(f'w{(i * 7 + j) % 50}'
                            for j in range((i * 13) % 40))
        for i in range(60)]
L = 24


class UnpackedText(tfds_source.EmbeddedText, skip_registration=True):
  name = 'unpacked_text'

  def documents(self):
    return DOCS


@pytest.fixture(scope='module')
def root(tmp_path_factory):
  return tmp_path_factory.mktemp('unpacked')


@pytest.fixture(scope='module')
def ds(root):
  tfds_source.prepare_builder(UnpackedText(data_dir=os.fspath(root),
                                           file_format='array_record'))
  model = root / 'spm.model'
  tokenizer_lib.write_atomic(model, tokenizer_lib.train_bpe(DOCS, 100))
  return data.prepare(DataConfig(name='unpacked_text', data_dir=os.fspath(root),
                                 tokenizer=os.fspath(model), packing=False),
                      vocab_size=128)


def test_rows_are_documents_truncated_or_padded(ds):
  assert not ds.packing and ds.tokenizer.pad_id == 0
  n = ds.num_documents('train')
  it = ds.train_iter(4, L, seed=0, shuffle=False)
  rows = [row for _ in range(n // 4) for row in zip(*next(it).values())]
  saw_truncated = saw_padded = False
  for k, (inputs, targets, weights) in enumerate(rows):
    doc = ds.tokenize_fn('train')(k)
    m = min(len(doc), L)
    assert weights.dtype == np.float32 and inputs.dtype == np.int32
    np.testing.assert_array_equal(inputs[1:], targets[:-1])
    np.testing.assert_array_equal(weights, np.arange(L) < m - 1)
    np.testing.assert_array_equal(inputs[:m - 1], doc[:m - 1])
    assert inputs[m - 1] == ds.eos_id  # EOS kept when truncated, as T5 does
    assert (inputs[m:] == ds.tokenizer.pad_id).all()
    assert (targets[m - 1:] == ds.tokenizer.pad_id).all()
    saw_truncated |= len(doc) > L
    saw_padded |= len(doc) < L
  assert saw_truncated and saw_padded


@pytest.mark.parametrize('k', [0, 3, 40])  # 40: after an epoch
def test_resume_from_state(ds, k):
  it = ds.train_iter(4, L, seed=11)
  for _ in range(k):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # as a checkpoint stores it
  expected = [next(it) for _ in range(3)]
  restored = ds.train_iter(4, L, seed=11)
  next(restored)
  restored.set_state(state)
  for want in expected:
    got = next(restored)
    for key in ('inputs', 'targets', 'weights'):
      np.testing.assert_array_equal(got[key], want[key])


@pytest.mark.parametrize('process_count', [1, 2])
def test_eval_batches_hold_the_loss_tokens_asked_for(ds, process_count):
  want = 300
  parts = [ds.eval_batches(4, L, want, process_index=p,
                           process_count=process_count)
           for p in range(process_count)]
  assert len({len(p) for p in parts}) == 1  # same count on every process
  per_batch = [sum(int(p[k]['weights'].sum()) for p in parts)
               for k in range(len(parts[0]))]
  assert sum(per_batch) >= want > sum(per_batch[:-1])
  # Packed: whole batches of B x L tokens.
  packed = dataclasses.replace(ds, packing=True)
  assert len(packed.eval_batches(1, 8, 8)) == 1
  assert len(packed.eval_batches(1, 8, 8 + 1)) == 2


def test_a_tokenizer_without_pad_is_refused(ds, root, tmp_path):
  import io  # pylint: disable=g-import-not-at-top
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  out = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(DOCS), model_writer=out, model_type='bpe',
      vocab_size=100, hard_vocab_limit=False, pad_id=-1, eos_id=1, unk_id=2,
      bos_id=-1, minloglevel=2)
  model = tmp_path / 'nopad.model'
  model.write_bytes(out.getvalue())
  config = DataConfig(name='unpacked_text', data_dir=os.fspath(root),
                      tokenizer=os.fspath(model), packing=False)
  with pytest.raises(data.TokenizerError, match='data.packing=false.*no pad'):
    data.prepare(config, vocab_size=128)
