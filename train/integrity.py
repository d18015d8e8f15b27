"""Checkpoint integrity: a manifest of every file's size and SHA-256.

Orbax does not notice flipped bytes inside array data (OCDBT checksums only
its manifest and tree nodes; the array chunks are stored raw), so just before
orbax commits step ``N`` (renames ``N.orbax-checkpoint-tmp`` to ``N``), every
file of the step is listed in ``N/integrity.json``; :func:`verify_manifest`
checks a step against it before it is restored.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from typing import Optional

from . import compat

MANIFEST = 'integrity.json'
# Step-level files orbax writes or rewrites after the manifest: not covered.
_UNLISTED = frozenset({MANIFEST, '_CHECKPOINT_METADATA', 'commit_success.txt'})


def _file_digest(path: pathlib.Path) -> str:
  with path.open('rb') as f:
    return hashlib.file_digest(f, 'sha256').hexdigest()


def _listed_files(step_dir: pathlib.Path) -> list[pathlib.Path]:
  files = []
  for root, _, names in os.walk(step_dir):
    for name in names:
      path = pathlib.Path(root) / name
      if path.parent == step_dir and name in _UNLISTED:
        continue
      files.append(path)
  return sorted(files)


def write_manifest(step_dir: str | os.PathLike) -> pathlib.Path:
  """Writes ``integrity.json`` (size and SHA-256 of every file) atomically."""
  step_dir = pathlib.Path(step_dir)
  files = {path.relative_to(step_dir).as_posix():
           {'size': path.stat().st_size, 'sha256': _file_digest(path)}
           for path in _listed_files(step_dir)}
  target = step_dir / MANIFEST
  tmp = step_dir / f'.{MANIFEST}.tmp'
  with tmp.open('w') as f:
    json.dump({'version': 1, 'algorithm': 'sha256', 'files': files}, f,
              indent=1, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, target)
  return target


def verify_manifest(step_dir: str | os.PathLike) -> Optional[list[str]]:
  """The problems found against ``integrity.json`` ([] when intact).

  Returns None when the step has no manifest. An unreadable manifest is
  itself a problem.
  """
  step_dir = pathlib.Path(step_dir)
  path = step_dir / MANIFEST
  if not path.exists():
    return None
  try:
    files = json.loads(path.read_text())['files']
  except (OSError, ValueError, KeyError, TypeError) as e:
    return [f'{MANIFEST} is unreadable ({type(e).__name__})']
  if not isinstance(files, dict):
    return [f'{MANIFEST} is unreadable (its files are not a mapping)']
  problems = []
  for name, expected in sorted(files.items()):
    file = step_dir / name
    if not file.is_file():
      problems.append(f'{name}: missing')
    elif file.stat().st_size != expected['size']:
      problems.append(f'{name}: {file.stat().st_size} bytes, expected '
                      f'{expected["size"]} (truncated or rewritten)')
    elif _file_digest(file) != expected['sha256']:
      problems.append(f'{name}: SHA-256 differs (bytes altered)')
  return problems


def _manifest_for_steps(temporary: pathlib.Path, final: pathlib.Path) -> None:
  # Orbax commits every process's files of a step together on the primary
  # process, after a barrier; item folders (state, data) commit the same way
  # but only the step folder gets a manifest.
  if final.name.isdigit():
    write_manifest(temporary)


# The orbax temporary-path class that writes the manifest of each step just
# before its commit.
ManifestTemporaryPath = compat.pre_commit_temporary_path(_manifest_for_steps)
