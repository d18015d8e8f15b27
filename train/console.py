"""The run's one way to print: messages, warnings and the progress bar.

Messages and the progress bar come from process 0 only (every process runs
the same loop; one copy is enough). Warnings go to stderr from every process:
a warning can be about one process's own files. While the bar shows, a
message is written above it, so the bar is not torn.
"""

from __future__ import annotations

import sys
from typing import Any, Optional


class Console:
  """Prints for the training loop.

  Args:
    main: whether this is process 0 (the one that prints messages).
  """

  def __init__(self, main: bool):
    self.main = main
    self._bar: Optional[Any] = None

  def info(self, message: str) -> None:
    """A line on stdout (process 0 only)."""
    if not self.main:
      return
    if self._bar is not None:
      self._bar.write(message)
    else:
      print(message, flush=True)

  def warn(self, message: str) -> None:
    """``warning: <message>`` on stderr (every process)."""
    print(f'warning: {message}', file=sys.stderr, flush=True)

  def start_progress(self, total: int, initial: int, show: bool) -> None:
    """A progress bar of ``total`` steps, ``initial`` already done; ``show``
    False (``train.progress``) keeps it off."""
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    self._bar = tqdm(total=total, initial=initial, unit='step',
                     dynamic_ncols=True, disable=not (self.main and show))

  def advance(self, steps: int, **postfix: str) -> None:
    """Moves the bar by ``steps`` and shows ``postfix`` beside it."""
    if self._bar is not None:
      self._bar.update(steps)
      self._bar.set_postfix(refresh=False, **postfix)

  def close_progress(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None
