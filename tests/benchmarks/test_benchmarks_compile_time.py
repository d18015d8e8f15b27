"""benchmarks.compile_time: the table, and a smoke run at tiny shapes."""

import pytest

from benchmarks import compile_time


def test_report_gives_the_depth_ratio_per_layout():
  medians = {(True, 24): 2.2, (True, 8): 2.0, (False, 24): 9.0,
             (False, 8): 3.0}
  text = compile_time.report('llama_350m', medians, (24, 8), markdown=True)
  assert '| scanned | 2.0 | 2.2 | 1.10 |' in text
  assert '| unrolled | 3.0 | 9.0 | 3.00 |' in text


@pytest.mark.slow
def test_smoke_run(capsys):
  assert compile_time.main(['--smoke', '--depths', '3,1']) == 0
  out = capsys.readouterr().out
  assert 'ratio 3/1' in out and 'scanned' in out and 'unrolled' in out
