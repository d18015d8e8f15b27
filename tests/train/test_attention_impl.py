"""``model.attention``: auto, xla, cudnn resolved per device and dtype, and a
config error (exit 2) where cuDNN cannot run."""

import dataclasses

import pytest

from train.__main__ import main
from train.config import ConfigError, ModelConfig, load_config
from train.model import attention_implementation


@dataclasses.dataclass
class FakeDevice:
  platform: str
  device_kind: str = 'fake'
  compute_capability: str = '9.0'


H100 = FakeDevice('gpu', 'NVIDIA H100 80GB HBM3', '9.0')
V100 = FakeDevice('gpu', 'Tesla V100-SXM2-16GB', '7.0')
CPU = FakeDevice('cpu', 'cpu', None)


@pytest.mark.parametrize('choice, dtype, device, expected', [
    ('auto', 'bfloat16', H100, 'cudnn'),
    ('auto', 'float16', H100, 'cudnn'),
    ('auto', 'float32', H100, 'xla'),
    ('auto', 'bfloat16', V100, 'xla'),
    ('auto', 'bfloat16', CPU, 'xla'),
    ('xla', 'bfloat16', H100, 'xla'),
    ('cudnn', 'bfloat16', H100, 'cudnn'),
])
def test_resolution(choice, dtype, device, expected):
  config = ModelConfig(attention=choice, dtype=dtype)
  assert attention_implementation(config, device) == expected


@pytest.mark.parametrize('dtype, device, reason', [
    ('bfloat16', CPU, 'needs a GPU'),
    ('float32', H100, 'bfloat16 or float16'),
    ('bfloat16', V100, 'compute capability'),
])
def test_cudnn_where_unavailable_is_a_config_error(dtype, device, reason):
  with pytest.raises(ConfigError, match=f'model.attention.*{reason}'):
    attention_implementation(ModelConfig(attention='cudnn', dtype=dtype),
                             device)


def test_unknown_choice_is_a_config_error():
  with pytest.raises(ConfigError, match='model.attention'):
    load_config(None, ['model.attention=flash'])


def test_cli_exits_2_naming_the_key(tmp_path, capsys):
  code = main(['model.attention=cudnn', 'model.dtype=bfloat16',
               f'train.run_dir={tmp_path}', 'data.data_dir=/nonexistent'])
  assert code == 2
  assert 'model.attention' in capsys.readouterr().err
