"""``python -m train --dry-run``: the per-device memory table.

The subprocess test runs the real command for the tiny config on 8 simulated
CPU devices with fsdp=8 and checks the printed table against the model's
shapes: every matrix is split 8 ways, so a device holds 1/8 of the
parameters plus the (replicated) norm scales.
"""

import re

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractMesh, AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import harness
import scale_optax
from train.__main__ import resolve_config_path
from train.config import load_config
from train.dry_run import format_report, per_device_bytes, shard_shape
from train.model import param_count

ROWS = ('params', 'optimizer state', 'batch', 'step temporaries',
        'step peak (args + outputs - donated + temps)')


def parse_table(output: str) -> dict[str, dict[str, float]]:
  """Row name -> {'bytes', 'gib', 'total_gib' (absent if blank)}."""
  lines = output.splitlines()
  start = next(i for i, line in enumerate(lines)
               if line.startswith('per device'))
  assert lines[start].split()[-4:] == ['bytes', 'GiB', 'total', 'GiB'], (
      lines[start])
  table = {}
  for line in lines[start + 1:start + 1 + len(ROWS)]:
    m = re.match(r'^(.*?)\s{2,}([\d,]+)\s+([\d.]+)(?:\s+([\d.]+))?$', line)
    assert m, f'unparsed row: {line!r}'
    row = {'bytes': int(m.group(2).replace(',', '')),
           'gib': float(m.group(3))}
    if m.group(4):
      row['total_gib'] = float(m.group(4))
    table[m.group(1).strip()] = row
  return table


@pytest.fixture(scope='module')
def tiny_fsdp8(tmp_path_factory):
  cache = harness.compile_cache_dir(tmp_path_factory)
  res = harness.run_train(['--dry-run', 'mesh.fsdp=8'], devices=8,
                          jax_cache=cache)
  assert res.rc == 0, res.output[-4000:]
  return res.output


def test_dry_run_table_for_tiny_on_8_devices(tiny_fsdp8):
  config = load_config(resolve_config_path('tiny'), ['mesh.fsdp=8'])
  m = config.model
  assert "on mesh {'data': 1, 'fsdp': 8, 'tensor': 1} (8 devices)" in tiny_fsdp8
  table = parse_table(tiny_fsdp8)
  assert tuple(table) == ROWS
  for name, row in table.items():
    assert row['gib'] == pytest.approx(row['bytes'] / 2**30, abs=1e-3), name

  # Params: fsdp splits every matrix 8 ways; the norm scales are replicated.
  total = param_count(m) * 4
  norms = (2 * m.n_layers + 1) * m.d_model * 4
  params = table['params']['bytes']
  assert params == (total - norms) // 8 + norms
  assert params == pytest.approx(total / 8, rel=0.05)
  assert table['params']['total_gib'] == pytest.approx(total / 2**30, abs=1e-3)

  # SCALE's state: the head's momentum (split 8 ways) and AdamW moments of the
  # norm scales (replicated), plus scalar counters.
  head = m.d_model * m.vocab_size * 4
  state = table['optimizer state']['bytes']
  assert head // 8 + 2 * norms <= state <= head // 8 + 2 * norms + 256

  batch = config.data.batch_size * config.data.seq_len * 4 * 2
  assert table['batch']['bytes'] == batch // 8
  assert table['step temporaries']['bytes'] > 0
  peak = table['step peak (args + outputs - donated + temps)']['bytes']
  assert peak >= params + state + table['step temporaries']['bytes']


def test_per_device_bytes_of_even_and_uneven_shards():
  mesh = AbstractMesh((2, 4, 1), ('data', 'fsdp', 'tensor'),
                      axis_types=(AxisType.Auto,) * 3)
  leaf = lambda shape, spec: jax.ShapeDtypeStruct(
      shape, jnp.float32, sharding=NamedSharding(mesh, spec))
  even = leaf((16, 6), P('fsdp', ('data', 'tensor')))
  uneven = leaf((10, 6), P('fsdp', None))  # 10 rows over 4: blocks of 3.
  replicated = leaf((5,), P())
  assert shard_shape(even) == (4, 3)
  assert shard_shape(uneven) == (3, 6)
  tree = {'a': even, 'b': uneven, 'c': replicated}
  assert per_device_bytes(tree) == (12 + 18 + 5) * 4
  assert scale_optax.state_bytes(tree) == (96 + 60 + 5) * 4  # The totals.


def test_format_report_without_memory_analysis():
  config = load_config(None, [])
  report = {'devices': 1, 'mesh': {'data': 1, 'fsdp': 1, 'tensor': 1},
            'param_bytes': 2**30, 'opt_state_bytes': 2**29, 'batch_bytes': 8,
            'param_bytes_total': 2**30, 'opt_state_bytes_total': 2**29,
            'batch_bytes_total': 8, 'temp_bytes': None, 'argument_bytes': None,
            'output_bytes': None, 'alias_bytes': None}
  text = format_report(config, report)
  assert 'params' in text and '1,073,741,824' in text and '1.000' in text
  assert text.splitlines()[-1].split()[-2:] == ['n/a', 'n/a']
