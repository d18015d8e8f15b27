"""Metrics: JSON lines, TensorBoard event files, and the loss plot.

Only process 0 writes. ``metrics.jsonl`` holds one JSON object per record
(``{"kind": "train"|"eval", "step": ..., "tokens": ..., ...}``) and is the
source of the plot, so the plot of a resumed run shows the whole run.
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any

import jax


class MetricsWriter:
  """Appends records to ``metrics.jsonl`` and TensorBoard under ``run_dir``."""

  def __init__(self, run_dir: pathlib.Path):
    self.run_dir = run_dir
    self.enabled = jax.process_index() == 0
    self.path = run_dir / 'metrics.jsonl'
    self._tb = None
    if self.enabled:
      from tensorboardX import SummaryWriter  # Heavy import; writers only.
      run_dir.mkdir(parents=True, exist_ok=True)
      self._tb = SummaryWriter(str(run_dir / 'tensorboard'))

  def write(self, kind: str, step: int, **values: Any) -> None:
    if not self.enabled:
      return
    record = {'kind': kind, 'step': step, **values}
    with self.path.open('a') as f:
      f.write(json.dumps(record) + '\n')
    for name, value in values.items():
      if isinstance(value, (int, float)) and name not in ('step',):
        self._tb.add_scalar(f'{kind}/{name}', value, step)

  def truncate_after(self, step: int) -> None:
    """Drops records past ``step`` (a resumed run rewrites them)."""
    if not self.enabled or not self.path.exists():
      return
    keep = [json.dumps(r) for r in read_records(self.path)
            if r['step'] <= step]
    tmp = self.path.with_suffix('.jsonl.tmp')  # Killed here: nothing lost.
    tmp.write_text(''.join(line + '\n' for line in keep))
    tmp.replace(self.path)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_records(path: pathlib.Path) -> list[dict[str, Any]]:
  """The records of a ``metrics.jsonl``, in order; none if it is missing.

  A last line that does not parse is one being written (or torn by a killed
  process): left out. Any other line that does not parse is an error.
  """
  try:
    text = path.read_text()
  except FileNotFoundError:
    return []
  lines = [line for line in text.splitlines() if line]
  records = []
  for i, line in enumerate(lines):
    try:
      records.append(json.loads(line))
    except ValueError:
      if i < len(lines) - 1:
        raise
  return records


def plot_losses(metrics_path: pathlib.Path, out_path: pathlib.Path,
                title: str) -> None:
  """Train and eval loss against tokens seen, as a PNG."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  records = read_records(metrics_path)
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for kind, style in (('train', '-'), ('eval', 'o-')):
    points = [(r['tokens'], r['loss']) for r in records
              if r['kind'] == kind and math.isfinite(r.get('loss', math.nan))]
    if points:
      ax.plot(*zip(*points), style, label=f'{kind} loss', markersize=4)
  ax.set_xlabel('tokens')
  ax.set_ylabel('cross-entropy loss (nats)')
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  tmp = out_path.with_suffix('.tmp.png')
  fig.savefig(tmp, dpi=120)
  plt.close(fig)
  tmp.replace(out_path)
