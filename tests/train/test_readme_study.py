"""The README's study tables say what the committed reports say.

The table under "Where the study stands" is written by hand at each stop of
the long study and checked against docs/results.csv; the one under "The
first run" against that run's frozen report, docs/one_file/results.csv.
Every number is checked: each rate's perplexity, the best rate in bold, the
sweep's best, the memory, and that no finished run of the report is left out.
"""

import csv
import pathlib
import re

import pytest

from train.study.page import format_ppl
from train.study.plots import label

REPO = pathlib.Path(__file__).resolve().parents[2]
_SWEEP = re.compile(r'^(?P<rate>[0-9.e-]+) \((?P<ppl>[0-9.]+)\)$')
_LONG = re.compile(r'^(?P<bold>\*\*)?(?P<rate>[0-9.e-]+): (?P<ppl>[0-9.]+'
                   r'(?: ± [0-9.]+)?|diverged)(?(bold)\*\*)'
                   r'(?P<note> \(the walk\))?$')


# Each table of the README: the words that open its paragraph, its report.
TABLES = (('**Where the study stands', 'docs/results.csv'),
          ('**The first run', 'docs/one_file/results.csv'))


def readme_rows(text: str, opening: str) -> list[list[str]]:
  """The cells of each row of the first table after ``opening``."""
  start = text.index(opening)
  lines = text[start:].splitlines()
  first = next(i for i, line in enumerate(lines) if line.startswith('|'))
  table = []
  for line in lines[first + 2:]:  # Past the header and its rule.
    if not line.startswith('|'):
      break
    table.append([cell.strip() for cell in line.strip('|').split('|')])
  return table


def report_rows(csv_path: str) -> dict[tuple[str, str, float],
                                      dict[str, str]]:
  with (REPO / csv_path).open() as f:
    return {(r['phase'], r['optimizer'], float(r['learning_rate'])): r
            for r in csv.DictReader(f)}


def lookup(report, phase: str, name: str, rate: float) -> dict[str, str]:
  key = (phase, name, rate)
  assert key in report, f'the README names {key}, which its report lacks'
  return report[key]


def long_cell(cell: str, name: str, report) -> set[float]:
  """Checks a long-runs cell against the report; the rates it names.

  The cell lists finished runs (``rate: perplexity``; ``rate: mean ± std``
  where the rate has more than one seed, a finalist's best), then, for an
  unfinished row, ``under way: rate, ...``, the two parts joined by '; ';
  it is '—' before the first long run.
  """
  if cell == '—':
    return set()
  finished, _, under_way = cell.partition('under way: ')
  rates = {float(x) for x in under_way.split(', ')} if under_way else set()
  for rate in rates:
    row = lookup(report, 'long', name, rate)
    assert row['n_runs'] == '0', f'{name} {rate} has finished: {cell}'
  finished = finished.removesuffix('; ')
  if not finished:
    return rates
  for entry in finished.split(', '):
    m = _LONG.match(entry)
    assert m, f'{name}: cannot read {entry!r}'
    rate = float(m['rate'])
    row = lookup(report, 'long', name, rate)
    if m['ppl'] == 'diverged':
      assert row['n_diverged'] != '0', f'{name} {rate}: {row}'
    else:
      std = float(row['eval_ppl_std']) if row['eval_ppl_std'] else None
      assert format_ppl(float(row['eval_ppl_mean']), std) == m['ppl'], (
          f'{name} {rate}: {m["ppl"]} (mean ± std over its seeds) in the '
          'README')
    assert (row['best_lr'] == 'True') == bool(m['bold']), (
        f'{name}: bold must mark the best long rate ({entry})')
    rates.add(rate)
  return rates


@pytest.mark.parametrize('opening, csv_path', TABLES)
def test_readme_table_matches_the_report(opening, csv_path):
  report = report_rows(csv_path)
  rows = readme_rows((REPO / 'README.md').read_text(), opening)
  assert rows, f'no table under {opening!r}'
  names = {label(opt): opt for _, opt, _ in report}
  shown = set()
  for text, sweep, long, megabytes in rows:
    name = names.get(text.removesuffix(' (unfinished)'))
    assert name, f'unknown optimizer {text!r} in the README'
    shown.add(name)
    m = _SWEEP.match(sweep)
    assert m, f'{name}: cannot read the sweep cell {sweep!r}'
    best = lookup(report, 'sweep', name, float(m['rate']))
    assert best['best_lr'] == 'True', f'{name}: {sweep} is not the best rate'
    assert format_ppl(float(best['eval_ppl_mean']), None) == m['ppl'], (
        name, sweep)
    rates = long_cell(long, name, report)
    finished = {rate for (phase, opt, rate), r in report.items()
                if phase == 'long' and opt == name and r['n_runs'] != '0'}
    assert finished <= rates, f'{name}: long runs missing from the README'
    mb = (int(best['opt_state_bytes']) + int(best['param_bytes'])) / 1e6
    assert megabytes in ('—', f'{mb:.2f}'), (name, megabytes)
    assert (megabytes == '—') == text.endswith('(unfinished)'), (
        f'{name}: memory is shown for whole rows only')
  swept = {opt for (phase, opt, _), r in report.items()
           if phase == 'sweep' and r['n_runs'] != '0' and r['best_lr'] == 'True'}
  assert swept <= shown, f'optimizers swept but not in the README: {swept - shown}'


@pytest.mark.parametrize('entry, ok', [
    ('1e-3: 106.01', True), ('**3e-3: 105.31**', True),
    ('3e-4: 134.67 (the walk)', True), ('1e-2: diverged', True),
    ('**3e-3: 71.07 ± 0.52**', True), ('3e-3: 71.07 ±', False),
    ('3e-3: 105.31**', False), ('**3e-3: 105.31', False),
    ('3e-3 105.31', False)])
def test_long_entries_are_read_strictly(entry, ok):
  assert bool(_LONG.match(entry)) == ok
