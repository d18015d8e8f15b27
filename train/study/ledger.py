"""The ledger: each finished run's small files, kept in git.

A run's folder under the study's ``output_dir`` (ignored by git) holds its
checkpoints, TensorBoard events and log beside the three files that decide
the plan and make the report: ``config.yaml``, ``summary.json`` (or
``failed.json``) and ``metrics.jsonl``. Once a run has finished (done or
diverged) the runner copies those into ``<docs_dir>/ledger/<phase>/<optimizer>/
lr_<lr>/seed_<seed>/``, so a fresh clone on a new machine resumes the study
where it stopped: its finished runs read from the ledger, and only the runs
that were part way start again. The data set's counts (``study.json``) and the
measured cost (``estimate.json``) are kept there too. (In git, that is, for
``configs/study.yaml``; the quick and GPU studies keep theirs under the
ignored ``runs/``.)
"""

from __future__ import annotations

import pathlib
import shutil

KEPT = ('config.yaml', 'summary.json', 'failed.json', 'metrics.jsonl')


def keep(run_dir: pathlib.Path, kept_dir: pathlib.Path) -> None:
  """Copies the :data:`KEPT` files of ``run_dir`` into ``kept_dir``, in place
  of what was there: whole or not at all (written beside, then renamed), so
  a kill part way leaves at ``kept_dir`` the old copy or none, never a mix;
  the ``.tmp`` or ``.old`` folder it may leave beside it is never read as a
  run, and the next keep of that run removes it."""
  tmp = kept_dir.with_name(kept_dir.name + '.tmp')
  old = kept_dir.with_name(kept_dir.name + '.old')
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir(parents=True)
  for name in KEPT:
    if (run_dir / name).exists():
      shutil.copyfile(run_dir / name, tmp / name)
  shutil.rmtree(old, ignore_errors=True)
  if kept_dir.exists():
    kept_dir.rename(old)
  tmp.rename(kept_dir)
  shutil.rmtree(old, ignore_errors=True)
