"""``train.compat``: each private third-party detail the trainer rests on,
checked against the installed packages. A failure names the package and its
version: an upgrade changed what ``train/compat.py`` relies on."""

import importlib.metadata
import inspect

import grain
import jax.numpy as jnp
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds

from train import compat


def _changed(package: str, what: str) -> str:
  return (f'{package} {importlib.metadata.version(package)}: {what}; '
          f'train/compat.py must be updated for this version.')


def _save(directory, temporary_path_class=None):
  """Saves step 1 (an array and a grain iterator) with a CheckpointManager."""
  options = ocp.CheckpointManagerOptions(
      enable_async_checkpointing=False,
      temporary_path_class=temporary_path_class)
  with ocp.CheckpointManager(
      directory, options=options,
      item_handlers={'state': ocp.StandardCheckpointHandler(),
                     'data': grain.checkpoint.CheckpointHandler()}) as manager:
    manager.save(1, args=ocp.args.Composite(
        state=ocp.args.StandardSave({'w': jnp.arange(8.0)}),
        data=grain.checkpoint.CheckpointSave(
            iter(grain.MapDataset.range(4).to_iter_dataset()))))
    manager.wait_until_finished()


def test_pre_commit_hook_runs_before_the_rename(tmp_path):
  seen = []

  def hook(temporary, final):
    seen.append((temporary.name, final.name, temporary.is_dir(),
                 final.exists()))
    (temporary / 'hook.txt').write_text(final.name)

  directory = tmp_path / 'checkpoints'
  _save(directory, compat.pre_commit_temporary_path(hook))
  steps = [s for s in seen if s[1] == '1']
  assert len(steps) == 1, _changed(
      'orbax-checkpoint', f'the temporary-path class finalized the step '
      f'folder {len(steps)} times, not once (calls: {seen})')
  temporary, _, existed, final_existed = steps[0]
  assert '.orbax-checkpoint-tmp' in temporary and existed, _changed(
      'orbax-checkpoint', f'finalize no longer sees the temporary folder '
      f'({temporary!r})')
  assert not final_existed, _changed(
      'orbax-checkpoint', 'the step was committed before finalize ran')
  assert (directory / '1' / 'hook.txt').read_text() == '1', _changed(
      'orbax-checkpoint', 'a file written before finalize is not committed')
  assert {s[1] for s in seen} >= {'1', 'state', 'data'}, _changed(
      'orbax-checkpoint', f'item folders are finalized otherwise ({seen})')


def test_tfds_progress_bar_state_is_readable():
  previous = compat.tfds_progress_bar_shown()
  try:
    for shown in (False, True):
      tfds.display_progress_bar(shown)
      assert compat.tfds_progress_bar_shown() is shown, _changed(
          'tensorflow-datasets', 'tqdm_utils._active no longer follows '
          'tfds.display_progress_bar')
  finally:
    tfds.display_progress_bar(previous)


def test_orbax_array_writer_writes_every_save(tmp_path, monkeypatch):
  try:
    module, name = compat.orbax_array_writer()
  except (ImportError, AttributeError) as e:
    pytest.fail(_changed('orbax-checkpoint', f'no array writer: {e}'))
  original = getattr(module, name)
  assert inspect.iscoroutinefunction(original)
  calls = []

  async def counting(*args, **kwargs):
    calls.append(1)
    return await original(*args, **kwargs)

  monkeypatch.setattr(module, name, counting)
  _save(tmp_path / 'checkpoints')
  assert calls, _changed('orbax-checkpoint',
                         f'a save no longer writes arrays through {name}')
