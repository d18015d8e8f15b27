"""The grain pipeline: packing, determinism, resume, sharding, eval, errors."""

import dataclasses
import json
import os
import sys

import numpy as np
import pytest

from train.config import DataConfig
from train import data
from train.data import pipeline
from train.data import tfds_source
from train.data import tokenizer as tokenizer_lib

# Documents of very different lengths (1 to ~150 tokens).
DOCS = [f'doc {i} ' + ' '.join(f'w{(i * 7 + j) % 50}' for j in range((i * 37) % 90))
        for i in range(100)]


class PipeText(tfds_source.EmbeddedText, skip_registration=True):
  name = 'pipe_text'

  def documents(self):
    return DOCS


@pytest.fixture(scope='module')
def ds(tmp_path_factory):
  root = tmp_path_factory.mktemp('pipe')
  tfds_source.prepare_builder(PipeText(data_dir=os.fspath(root),
                                       file_format='array_record'))
  model = root / 'spm.model'
  tokenizer_lib.write_atomic(model, tokenizer_lib.train_bpe(DOCS, 100))
  return data.prepare(DataConfig(name='pipe_text', data_dir=os.fspath(root),
                                 tokenizer=os.fspath(model)), vocab_size=128)


def _stream(ds, split, order):
  return np.concatenate([ds.tokenize_fn(split)(i) for i in order])


def _windows(batches):
  return [np.append(row_in, row_t[-1]) for b in batches
          for row_in, row_t in zip(b['inputs'], b['targets'])]


def test_packing_is_the_document_stream_in_order(ds):
  B, L = 4, 32
  n = ds.num_documents('train')
  stream = _stream(ds, 'train', list(range(n)) * 3)
  num_batches = int(2.2 * len(stream) / 3) // (B * L)  # > 2 epochs
  it = ds.train_iter(B, L, seed=0, shuffle=False)
  batches = [next(it) for _ in range(num_batches)]
  for b in batches:
    assert set(b) == {'inputs', 'targets'}
    assert b['inputs'].shape == b['targets'].shape == (B, L)
    assert b['inputs'].dtype == b['targets'].dtype == np.int32
    np.testing.assert_array_equal(b['inputs'][:, 1:], b['targets'][:, :-1])
  windows = _windows(batches)
  for k, w in enumerate(windows):  # windows overlap by one token
    np.testing.assert_array_equal(w, stream[k * L:k * L + L + 1])
  # Every token of the stream (but the first) is a target exactly once.
  targets = np.concatenate([b['targets'].ravel() for b in batches])
  np.testing.assert_array_equal(targets, stream[1:len(targets) + 1])
  # EOS ends every document, and nothing else is EOS.
  doc_ends = np.cumsum([len(ds.tokenize_fn('train')(i)) for i in range(n)]) - 1
  first_epoch = stream[:doc_ends[-1] + 1]
  assert set(np.flatnonzero(first_epoch == ds.eos_id)) == set(doc_ends)


def test_deterministic_by_seed_and_shuffled(ds):
  a = [next(it) for it in [ds.train_iter(4, 16, seed=3)] for _ in range(20)]
  b = [next(it) for it in [ds.train_iter(4, 16, seed=3)] for _ in range(20)]
  c = [next(it) for it in [ds.train_iter(4, 16, seed=4)] for _ in range(20)]
  plain = [next(it) for it in [ds.train_iter(4, 16, seed=3, shuffle=False)]
           for _ in range(20)]
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x['inputs'], y['inputs'])
  assert any((x['inputs'] != y['inputs']).any() for x, y in zip(a, c))
  assert any((x['inputs'] != y['inputs']).any() for x, y in zip(a, plain))


@pytest.mark.parametrize('k', [0, 1, 7, 33, 95])  # 95: several epochs in
def test_resume_from_state(ds, k):
  B, L = 4, 16
  it = ds.train_iter(B, L, seed=11)
  for _ in range(k):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # as a checkpoint stores it
  expected = [next(it) for _ in range(3)]
  restored = ds.train_iter(B, L, seed=11)
  next(restored)  # a used iterator, to be sure set_state resets it
  restored.set_state(state)
  for want in expected:
    got = next(restored)
    np.testing.assert_array_equal(got['inputs'], want['inputs'])
    np.testing.assert_array_equal(got['targets'], want['targets'])


def test_process_shards_are_disjoint(ds):
  n = ds.num_documents('train')
  shards = []
  for p in range(3):
    idx = pipeline.document_indices(n, shuffle=True, seed=5, process_index=p,
                                    process_count=3, split='train')
    epoch = [int(idx[j]) for j in range(len(idx))]
    assert len(set(epoch)) == len(epoch)
    # Every epoch visits the same shard, in a new order.
    stream = idx.repeat()
    second = [int(stream[j]) for j in range(len(epoch), 2 * len(epoch))]
    assert sorted(second) == sorted(epoch) and second != epoch
    shards.append(set(epoch))
  assert set.union(*shards) == set(range(n))
  assert not (shards[0] & shards[1] or shards[0] & shards[2]
              or shards[1] & shards[2])
  per_process = [next(ds.train_iter(6, 16, seed=5, process_index=p,
                                    process_count=3)) for p in range(3)]
  for b in per_process:
    assert b['inputs'].shape == (2, 16)
  assert (per_process[0]['inputs'] != per_process[1]['inputs']).any()
  with pytest.raises(ValueError, match='not divisible'):
    ds.train_iter(7, 16, seed=0, process_count=3)


def test_eval_batches_in_order_repeating(ds):
  n_val = ds.num_documents('validation')
  stream = _stream(ds, 'validation', list(range(n_val)) * 4)
  L = 8
  per_pass = (len(stream) // 4) // L
  num_batches = per_pass + 2  # more than the split holds: it repeats
  evals = ds.eval_batches(1, L, num_batches * L)  # L loss tokens a batch
  assert len(evals) == num_batches
  for k, w in enumerate(_windows(evals)):
    np.testing.assert_array_equal(w, stream[k * L:k * L + L + 1])
  again = ds.eval_batches(1, L, num_batches * L)
  for x, y in zip(evals, again):
    np.testing.assert_array_equal(x['inputs'], y['inputs'])


def test_documents_holding_counts_the_documents_the_eval_reads(ds):
  n_val = ds.num_documents('validation')
  ends = np.cumsum([len(ds.tokenize_fn('validation')(i))
                    for i in range(n_val)])  # Each document with its EOS.
  assert ds.documents_holding('validation', 1) == 1
  assert ds.documents_holding('validation', int(ends[0])) == 1
  assert ds.documents_holding('validation', int(ends[2])) == 3
  assert ds.documents_holding('validation', int(ends[2]) + 1) == 4
  assert ds.documents_holding('validation', int(ends[-1]) * 2) == n_val


def test_eval_shuffle_reads_the_split_in_one_fixed_shuffled_order(ds):
  shuffled = dataclasses.replace(ds, eval_shuffle=True)
  n_val = ds.num_documents('validation')
  order = list(pipeline.document_indices(
      n_val, shuffle=True, seed=0, process_index=0, process_count=1,
      split='validation'))
  assert sorted(order) == list(range(n_val)) and order != sorted(order)
  stream = _stream(ds, 'validation', order)
  L = 8
  num_tokens = (len(stream) - 1) // L * L  # One pass: every document.
  evals = shuffled.eval_batches(1, L, num_tokens)
  for k, w in enumerate(_windows(evals)):
    np.testing.assert_array_equal(w, stream[k * L:k * L + L + 1])
  for x, y in zip(evals, shuffled.eval_batches(1, L, num_tokens)):  # Fixed.
    np.testing.assert_array_equal(x['inputs'], y['inputs'])
  first = len(ds.tokenize_fn('validation')(order[0]))
  assert shuffled.documents_holding('validation', first) == 1
  assert shuffled.documents_holding('validation', first + 1) == 2


def test_split_too_small(ds):
  total = len(_stream(ds, 'validation', range(ds.num_documents('validation'))))
  with pytest.raises(data.SplitTooSmallError,
                     match=rf"'validation' has {total} tokens"):
    ds.eval_batches(total, 2, 1)
  with pytest.raises(data.SplitTooSmallError, match="'validation'.*process 1 of"):
    ds.eval_batches(8, total // 4, 1, process_index=1, process_count=8)
  with pytest.raises(data.SplitTooSmallError, match='none for process 9'):
    ds.eval_batches(10, 2, 1, process_index=9, process_count=10)


def test_unigram_perplexity(ds):
  ppl = data.unigram_perplexity(ds)
  assert np.isfinite(ppl) and 1 < ppl < ds.vocab_size
  assert 'tensorflow' not in sys.modules
