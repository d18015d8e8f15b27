"""Units of the loop's host side: read-ahead positions, the duration line,
when step metrics are read, the throughput clock, printing, metrics records."""

from __future__ import annotations

import grain
import hypothesis
from hypothesis import strategies as st
import numpy as np
import pytest

from train.config import load_config
from train.console import Console
from train.loop import StepMetrics, expected_duration
from train.metrics import read_records
from train.perf import Throughput
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


# ------------------------------------------------------------ StepMetrics --

class _Loop:
  """Drives StepMetrics as the trainer does, with host arrays as metrics."""

  def __init__(self, log_every: int, max_skips: int, first_step: int = 1,
               read_each_step: bool = False):
    self.reads: list[list[int]] = []  # Steps of each read.
    self.reported: list[tuple[int, int]] = []  # (step, skipped).
    self.queued = 0  # Newest step added.
    self.metrics = StepMetrics(first_step, log_every, max_skips,
                               read_each_step, self._report)

  def _report(self, read):
    self.reads.append([step for step, _, _ in read])
    for step, metrics, skipped in read:
      assert int(metrics['loss']) == step  # The step's own metrics.
      self.reported.append((step, skipped))

  def add(self, step: int, skipped: bool) -> None:
    self.queued = step
    self.metrics.add(step, {'loss': np.float32(step),
                            'skipped': np.int32(skipped)})

  def unread(self) -> int:
    return len(self.metrics.pending)


def test_metrics_are_read_every_log_every_steps_but_the_newest():
  loop = _Loop(log_every=4, max_skips=100)
  for step in range(1, 15):
    loop.add(step, skipped=False)
  # The first step at once; then 4 at a time, the newest left in flight.
  assert loop.reads == [[1], [2, 3, 4, 5], [6, 7, 8, 9], [10, 11, 12, 13]]
  assert loop.unread() == 1
  loop.metrics.read_all()
  assert loop.reads[-1] == [14] and loop.unread() == 0


def test_metrics_of_a_resumed_run_start_at_its_first_step():
  loop = _Loop(log_every=3, max_skips=100, first_step=41)
  for step in range(41, 46):
    loop.add(step, skipped=False)
  assert loop.reads == [[41], [42, 43, 44]]


def test_each_step_is_read_at_once_when_asked():
  loop = _Loop(log_every=10, max_skips=100, read_each_step=True)
  for step in range(1, 5):
    loop.add(step, skipped=False)
  assert loop.reads == [[1], [2], [3], [4]]


def test_a_run_near_the_skip_limit_is_read_sooner():
  loop = _Loop(log_every=10, max_skips=3)
  # Room for 2 unseen skips: one older step per read, the newest in flight.
  # Once step 4's skip is seen there is room for one: steps 5 and 6 are read
  # at once when 6 is queued (both could be skips).
  for step, skipped in [(1, False), (2, False), (3, False), (4, True),
                        (5, False), (6, False)]:
    loop.add(step, skipped)
  assert loop.reads == [[1], [2], [3], [4], [5, 6]]


@hypothesis.settings(max_examples=200, deadline=None)
@hypothesis.given(log_every=st.integers(1, 12), max_skips=st.integers(1, 12),
                  skipped=st.lists(st.booleans(), min_size=1, max_size=60))
def test_the_skip_limit_stops_on_its_last_skip_with_nothing_queued_after(
    log_every, max_skips, skipped):
  """Whatever the pattern of skipped steps: every step is reported once, in
  order, with its own flag; reads never wait longer than log_every steps;
  and the run stops on the step that completes max_skips skips in a row,
  with no later step queued."""
  loop = _Loop(log_every, max_skips)
  stopped_at = None
  for step, skip in enumerate(skipped, start=1):
    loop.add(step, skip)
    assert loop.unread() <= log_every
    if loop.metrics.skips_in_a_row >= max_skips:
      stopped_at = step
      break
  loop.metrics.read_all()
  ran = skipped[:loop.queued]
  assert loop.reported == [(s, int(k)) for s, k in enumerate(ran, start=1)]
  run, first_full_run = 0, None
  for step, skip in enumerate(skipped, start=1):
    run = run + 1 if skip else 0
    if run == max_skips:
      first_full_run = step
      break
  assert stopped_at == first_full_run
  if stopped_at is not None:
    assert loop.metrics.skips_in_a_row == max_skips
    assert loop.queued == stopped_at


# ------------------------------------------------------------- Throughput --

class _FakeClock:
  def __init__(self):
    self.now = 100.0

  def __call__(self) -> float:
    return self.now


def test_throughput_times_from_the_first_step_read_without_pauses():
  clock = _FakeClock()
  speed = Throughput(tokens_per_step=1000, devices=4, flops_per_token=6e6,
                     peak=1e12, clock=clock)
  assert speed.rates() == {'tokens_per_s': None,
                           'tokens_per_s_per_device': None, 'mfu': None}
  clock.now += 30.0  # Compiling: not timed.
  speed.step_done(8)  # The clock starts at the end of the first read.
  clock.now += 4.0
  with speed.paused():  # An evaluation.
    clock.now += 100.0
  clock.now += 6.0
  speed.step_done(13)
  assert speed.timed_steps == 5 and speed.step_s == pytest.approx(2.0)
  rates = speed.rates()
  assert rates['tokens_per_s'] == pytest.approx(500.0)
  assert rates['tokens_per_s_per_device'] == pytest.approx(125.0)
  assert rates['mfu'] == pytest.approx(125.0 * 6e6 / 1e12)


# ---------------------------------------------------------------- Console --

def test_console_prints_messages_on_process_0_and_warnings_everywhere(capsys):
  main, other = Console(main=True), Console(main=False)
  for console in (main, other):
    console.info('hello')
    console.warn('careful')
  out, err = capsys.readouterr()
  assert out == 'hello\n'
  assert err == 'warning: careful\nwarning: careful\n'


def test_console_writes_messages_above_a_shown_bar(capsys):
  console = Console(main=True)
  console.start_progress(total=10, initial=2, show=True)
  console.advance(3, loss='1.000')
  console.info('step 5: eval loss 1.0')
  console.close_progress()
  out, err = capsys.readouterr()
  assert 'step 5: eval loss 1.0\n' in out
  assert '5/10' in err  # tqdm draws on stderr.


# ---------------------------------------------------------------- records --

def test_read_records_skips_a_torn_line_and_a_missing_file(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  assert read_records(path) == []
  path.write_text('{"kind": "train", "step": 1, "loss": 2.5}\n'
                  '{"kind": "eval", "step": 2, "loss": 2.0}\n'
                  '{"kind": "train", "step": 3, "lo')  # Killed mid-write.
  assert read_records(path) == [
      {'kind': 'train', 'step': 1, 'loss': 2.5},
      {'kind': 'eval', 'step': 2, 'loss': 2.0}]
