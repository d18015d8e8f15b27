"""Fault tolerance of ``python -m train``, end to end (issue 7).

Runs of a tiny LLaMA (d64, 2 layers, vocab 512, seq 64, batch 8) as
subprocesses, killed, signalled, corrupted and restarted through
``faults_util``; an interrupted run must end bitwise equal to an uninterrupted
one (CPU), and a checkpoint that cannot be restored must end the run with one
clear line (every other bad input: ``test_errors.py``).

The kill points are drawn at random; the seed is printed (``-s`` or on
failure) and can be fixed with ``FAULTS_SEED=...``.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal

import numpy as np
import pytest

import faults_util as fu
import harness
from train.__main__ import main as cli_main

STEPS = 40  # checkpoint_every 5, keep 2


@pytest.fixture(scope='module')
def dirs(tmp_path_factory):
  """(data_dir, jax_cache): the embedded data set prepared once (also proves
  a missing data_dir is created and filled on first use), one compilation
  cache for every subprocess of the session."""
  base = tmp_path_factory.getbasetemp()
  data_dir, jax_cache = base / 'faults_data', base / 'faults_jax_cache'
  harness.prepare_data(data_dir)
  return data_dir, jax_cache


@pytest.fixture(scope='module')
def reference(tmp_path_factory, dirs):
  """An uninterrupted run of STEPS steps."""
  data_dir, jax_cache = dirs
  cfg = fu.TinyRun(tmp_path_factory.mktemp('reference'), data_dir)
  res = harness.run_train(cfg.args(steps=STEPS), jax_cache=jax_cache)
  assert res.rc == 0, res.stderr[-3000:]
  return cfg


@pytest.fixture
def rng():
  seed = int(os.environ.get('FAULTS_SEED', random.SystemRandom().randrange(
      1 << 30)))
  print(f'FAULTS_SEED={seed}')
  return random.Random(seed)


def _summary(cfg):
  return json.loads((cfg.run_dir / 'summary.json').read_text())


def _assert_same_run(run, reference):
  """Same train loss at every step and the same final state, bitwise."""
  got, want = harness.losses(run.run_dir), harness.losses(reference.run_dir)
  assert sorted(got) == list(range(1, STEPS + 1))
  differ = [s for s in want if got[s] != want[s]]
  assert not differ, f'loss differs at steps {differ}'
  final = lambda c: c.checkpoints / str(STEPS)
  fu.assert_same_arrays(fu.checkpoint_arrays(final(run)),
                        fu.checkpoint_arrays(final(reference)), 'final state')
  data = lambda c: (final(c) / 'data' / 'process_0-of-1.json').read_text()
  assert json.loads(data(run)) == json.loads(data(reference))


@pytest.mark.slow
def test_killed_signalled_and_corrupted_run_ends_bitwise_equal(
    tmp_path, dirs, reference, rng):
  """SIGKILL at a random step, SIGKILL during an async save (the save made
  slow, the loop donating params meanwhile), SIGTERM, Ctrl-C, then a flipped
  byte in the newest checkpoint: the run still ends exactly as the
  uninterrupted one."""
  data_dir, jax_cache = dirs
  cfg = fu.TinyRun(tmp_path / 'run', data_dir)
  args = cfg.args(steps=STEPS)
  start = lambda **kw: fu.TrainProcess(args, jax_cache=jax_cache, **kw)

  # 1. SIGKILL at a random step.
  with start() as proc:
    at = proc.wait_for_step(rng.randint(6, 16))
    proc.kill()
    assert proc.wait().rc == -signal.SIGKILL
  committed = fu.committed_steps(cfg.checkpoints)
  print(f'1. SIGKILL at step >= {at}: checkpoints {committed}, in flight '
        f'{fu.in_flight_steps(cfg.checkpoints)}')

  # 2. SIGKILL while a checkpoint is being written (its arrays are on the host,
  # the write sleeps 3 s; the loop trains on, donating the params).
  with start(slow_save=3.0) as proc:
    saving = proc.wait_for_save_in_flight()
    proc.kill()
    res = proc.wait()
  assert res.rc == -signal.SIGKILL
  assert res.resumed_from() == (committed[-1] if committed else None), res
  assert fu.committed_steps(cfg.checkpoints) == committed  # Not committed,
  assert saving in fu.in_flight_steps(cfg.checkpoints)  # left half-written.
  print(f'2. resumed from {res.resumed_from()}, SIGKILL while saving step '
        f'{saving}: checkpoints {fu.committed_steps(cfg.checkpoints)}')
  last_complete = committed[-1] if committed else 0

  # 3. SIGTERM (preemption): saves where it is, exits 0, writes the summary.
  with start() as proc:
    proc.wait_for_step(last_complete + rng.randint(1, 4))
    proc.kill(signal.SIGTERM)
    res = proc.wait()
  assert res.rc == 0, res.stderr[-3000:]
  # The half-written checkpoint was neither picked nor kept.
  assert res.resumed_from() == (committed[-1] if committed else None)
  assert fu.in_flight_steps(cfg.checkpoints) == []
  summary = _summary(cfg)
  assert summary['stopped_by'] == 'SIGTERM'
  assert fu.committed_steps(cfg.checkpoints)[-1] == summary['steps']
  assert f'SIGTERM: checkpoint saved at step {summary["steps"]}' in res.stdout
  print(f'3. resumed from {res.resumed_from()}, SIGTERM: saved step '
        f'{summary["steps"]}, exit 0')

  # 4. Ctrl-C: the same.
  with start() as proc:
    proc.wait_for_step(summary['steps'] + rng.randint(1, 4))
    proc.kill(signal.SIGINT)
    res = proc.wait()
  assert res.rc == 0, res.stderr[-3000:]
  assert res.resumed_from() == summary['steps']
  summary = _summary(cfg)
  assert summary['stopped_by'] == 'SIGINT'
  steps = fu.committed_steps(cfg.checkpoints)
  assert steps[-1] == summary['steps'] and len(steps) == 2
  print(f'4. resumed from {res.resumed_from()}, SIGINT: saved step '
        f'{summary["steps"]}, exit 0; checkpoints {steps}')

  # 5. Bytes flipped in the newest checkpoint's array data: resume warns,
  # sets it aside and falls back to the one before.
  bad, good = steps[-1], steps[-2]
  fu.flip_bytes(fu.data_files(cfg.checkpoints / str(bad))[0])
  res = harness.run_train(args, jax_cache=jax_cache)
  assert res.rc == 0, res.stderr[-3000:]
  assert res.resumed_from() == good
  assert f'warning: checkpoint at step {bad} ' in res.stderr
  assert 'SHA-256 differs' in res.stderr
  assert (cfg.run_dir / 'checkpoints.corrupt' / str(bad)).is_dir()
  print(f'5. bytes flipped in step {bad}: resumed from {good}, ran to the end')

  _assert_same_run(cfg, reference)


@pytest.mark.slow
def test_many_random_sigkills_end_bitwise_equal(tmp_path, dirs, reference,
                                                rng):
  """Six SIGKILLs at random moments, half of them during a (slowed) save."""
  data_dir, jax_cache = dirs
  cfg = fu.TinyRun(tmp_path / 'run', data_dir)
  args = cfg.args(steps=STEPS)
  for i in range(6):
    committed = fu.committed_steps(cfg.checkpoints)
    last = harness.losses(cfg.run_dir) if cfg.run_dir.exists() else {}
    if last and max(last) >= STEPS - 5:
      break
    with fu.TrainProcess(args, jax_cache=jax_cache,
                         slow_save=rng.choice([0.0, 1.5])) as proc:
      if i % 2:
        proc.wait_for_save_in_flight()
      else:
        proc.wait_for_step(min((committed[-1] if committed else 0) +
                               rng.randint(1, 9), STEPS - 3))
      proc.kill()
      res = proc.wait()
    assert res.resumed_from() == (committed[-1] if committed else None)
  res = harness.run_train(args, jax_cache=jax_cache)
  assert res.rc == 0, res.stderr[-3000:]
  _assert_same_run(cfg, reference)


def test_non_finite_steps_are_skipped_then_stop_with_last_good_state(
    tmp_path, dirs):
  """A learning rate of 1e30: step 1 is finite, then every step overflows.
  Those steps are logged as skipped and change nothing; the third in a row
  stops the run (exit 1, one line) with the last good state saved."""
  data_dir, jax_cache = dirs
  cfg = fu.TinyRun(tmp_path / 'run', data_dir)
  res = harness.run_train(cfg.args(
      steps=20, checkpoint_every=1, keep_checkpoints=100,
      max_consecutive_skips=3, optimizer__learning_rate='1e30',
      optimizer__warmup_ratio=0), jax_cache=jax_cache)
  assert res.rc == 1
  line = res.last_stderr_line()
  assert line.startswith('error: 3 consecutive steps had a non-finite loss'), (
      res.stderr[-3000:])
  records = {r['step']: r for r in harness.records(cfg.run_dir, 'train')}
  skipped = [s for s, r in records.items() if r['skipped']]
  first = skipped[0]
  assert skipped == [first, first + 1, first + 2] == sorted(records)[-3:]
  assert not any(math.isfinite(records[s]['loss']) for s in skipped)
  assert f'saved as the checkpoint of step {first + 2}' in line
  last_good = fu.checkpoint_arrays(cfg.checkpoints / str(first - 1))
  stopped = fu.checkpoint_arrays(cfg.checkpoints / str(first + 2))
  assert int(stopped.pop('step')) == first + 2
  assert int(last_good.pop('step')) == first - 1
  fu.assert_same_arrays(stopped, last_good, 'stopped vs last good state')
  assert all(np.isfinite(a).all() for a in stopped.values())


@pytest.mark.slow
def test_no_resume_sets_the_old_checkpoints_aside(tmp_path, dirs, reference):
  """--no-resume starts over without mixing the old run's checkpoints into
  the new one's (a later resume must not pick the old step 40), and without
  deleting them."""
  data_dir, jax_cache = dirs
  run_dir = tmp_path / 'run'
  shutil.copytree(reference.run_dir, run_dir)
  cfg = fu.TinyRun(run_dir, data_dir)
  res = harness.run_train(cfg.args('--no-resume', steps=7),
                          jax_cache=jax_cache)
  assert res.rc == 0, res.stderr[-3000:]
  assert res.resumed_from() is None
  assert '--no-resume: moved the existing checkpoints' in res.stdout
  assert fu.committed_steps(cfg.checkpoints) == [5, 7]
  assert sorted(harness.losses(run_dir)) == list(range(1, 8))
  (old,) = run_dir.glob('checkpoints.replaced-*')
  assert fu.committed_steps(old) == [35, 40]
  assert max(harness.losses(old)) == STEPS  # The old metrics, kept.


def _cli(capsys, args):
  """``python -m train ARGS`` in this process: (exit code, stderr lines)."""
  rc = cli_main([str(a) for a in args])
  err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
  return rc, err


def test_resume_refused_for_another_model_shape(tmp_path, dirs, reference,
                                                capsys):
  data_dir, _ = dirs
  run_dir = tmp_path / 'run'
  shutil.copytree(reference.run_dir, run_dir)
  cfg = fu.TinyRun(run_dir, data_dir)
  rc, err = _cli(capsys, cfg.args(model__d_model=32, model__n_heads=2))
  assert rc == 1
  assert err[-1].startswith(f'error: checkpoint at step {STEPS} ')
  assert 'resume refused' in err[-1]
  assert 'params/embed/embedding: saved (512, 64), expected (512, 32)' in (
      err[-1])
  assert not any(l.startswith('warning:') for l in err)  # No fallback,
  assert fu.committed_steps(run_dir / 'checkpoints') == [35, 40]  # no move.


def test_no_restorable_checkpoint_fails_listing_the_steps(
    tmp_path, dirs, reference, capsys):
  data_dir, _ = dirs
  run_dir = tmp_path / 'run'
  shutil.copytree(reference.run_dir, run_dir)
  for step in (35, 40):
    fu.truncate(fu.data_files(run_dir / 'checkpoints' / str(step))[0])
  rc, err = _cli(capsys, fu.TinyRun(run_dir, data_dir).args(steps=STEPS))
  assert rc == 1
  assert err[-1].startswith('error: no checkpoint in ')
  assert 'tried steps 40, 35' in err[-1] and '--no-resume' in err[-1]
  assert sum(l.startswith('warning: checkpoint at step') for l in err) == 2
  # Nothing was moved or started from scratch.
  assert fu.committed_steps(run_dir / 'checkpoints') == [35, 40]
  assert max(harness.losses(run_dir)) == STEPS
