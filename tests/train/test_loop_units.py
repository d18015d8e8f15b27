"""Units of the loop's host side: read-ahead positions, the duration line."""

from __future__ import annotations

import grain
import numpy as np

from train.config import load_config
from train.loop import expected_duration
from train.prefetch import DevicePrefetch


def _numbers():
  return iter(grain.MapDataset.range(100).to_iter_dataset())


def test_read_ahead_reports_the_position_after_the_last_batch_taken():
  plain = _numbers()
  ahead = DevicePrefetch(_numbers(), lambda x: {'x': np.asarray(x) * 10})
  assert int(next(ahead)['x']) == 0 and next(plain) == 0
  ahead.prefetch()  # Batch 1 read ahead: the position stays after batch 0.
  assert ahead.get_state() == plain.get_state()
  state = ahead.get_state()
  assert [int(next(ahead)['x']) for _ in range(3)] == [10, 20, 30]
  ahead.prefetch()
  ahead.set_state(state)  # A restore drops the batch read ahead.
  assert int(next(ahead)['x']) == 10


def test_expected_duration_counts_the_remaining_steps_and_evaluations():
  config = load_config('configs/tiny.yaml', ['train.steps=300',
                                             'train.eval_every=75'])
  line = expected_duration(config, step=6, step_s=1.0, elapsed_s=30.0,
                           eval_batches=15)
  # 294 steps + 4 evaluations of 15 batches at a third of a step: 314 s.
  assert line.startswith('expected duration: about 5.7 min in all, 5.2 min '
                         'from now (1000 ms per step measured, 294 steps and '
                         '4 evaluations to go)'), line
