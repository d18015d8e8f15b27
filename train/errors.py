"""The trainer's error contract, for every command-line entry point.

A user's mistake ends the command with one line on stderr that names the
culprit (a config key, a file, a split, a step) and an exit code:

* 2, ``config error: ...``: a :class:`UsageError`, something the user asked
  for that cannot be (an unknown key, a wrong type, an impossible value);
* 1, ``error: ...``: a :class:`RunError`, something the run met that stops it
  (bad data, tokenizer or checkpoint, a diverged run), or an ``OSError`` on a
  file the user named (its message names the file).

Every user-facing exception derives from one of the two bases, and every
``main`` is wrapped by :func:`cli`. Anything else is a bug: it propagates
with its traceback.
"""

from __future__ import annotations

import functools
import pathlib
import sys
from typing import Callable, ParamSpec

P = ParamSpec('P')

CONFIG_EXIT, RUN_EXIT = 2, 1


class UsageError(Exception):
  """A mistake in what the user asked for (exit code 2)."""


class RunError(Exception):
  """The run cannot go on, through no bug of its own (exit code 1)."""


def one_line(message: str) -> str:
  """``message`` on one line (a multi-line message's lines joined)."""
  return ' / '.join(line.strip() for line in message.splitlines()
                    if line.strip())


def prog(module: str) -> str:
  """The command's name for usage lines: the console script it was started
  as (``scale-train``), else ``python -m <module>`` (``train.export``, or
  ``scale_optax_train.export`` when installed)."""
  started_as = pathlib.Path(sys.argv[0]).name if sys.argv else ''
  if started_as and not started_as.endswith('.py') and started_as != '-c':
    return started_as
  return f'python -m {module}'


def cli(main: Callable[P, int]) -> Callable[P, int]:
  """Wraps an entry point's ``main`` in the error contract.

  The wrapped ``main`` returns 2 after a :class:`UsageError` and 1 after a
  :class:`RunError` or ``OSError``, each reported as one line on stderr;
  any other exception propagates.
  """

  @functools.wraps(main)
  def wrapped(*args: P.args, **kwargs: P.kwargs) -> int:
    try:
      return main(*args, **kwargs)
    except UsageError as e:
      return _report(f'config error: {e}', CONFIG_EXIT)
    except (RunError, OSError) as e:
      return _report(f'error: {e}', RUN_EXIT)

  return wrapped


def _report(message: str, code: int) -> int:
  sys.stdout.flush()  # Whatever the run printed comes before the error.
  print(one_line(message), file=sys.stderr, flush=True)
  return code
