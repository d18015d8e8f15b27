"""Exports loaded by Hugging Face ``transformers`` give this model's logits.

Needs torch and transformers (``pip install -e '.[hf]'``); skipped without
them. Imports nothing of the data pipeline (no tfds, no grain): the model is a
tiny random one. Run: ``pytest -m hf tests/train/test_export_hf.py``.
"""

import pathlib

import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

import export_test_util as eu  # pylint: disable=g-import-not-at-top,wrong-import-position
from train import export  # pylint: disable=g-import-not-at-top,wrong-import-position

pytestmark = pytest.mark.hf

# float32 rounding: the two frameworks order some sums differently.
RTOL = 1e-5


def _export(out, config, params, tokenizer=None, max_shard_bytes=10**9):
  return export.write_atomically(pathlib.Path(out), lambda tmp: (
      export.write_hf_model(tmp, params.__getitem__,
                            {p: a.dtype for p, a in params.items()}, config,
                            tokenizer, None, max_shard_bytes)))


@pytest.mark.parametrize('param_dtype,max_shard_bytes', [
    ('float32', 10**9), ('float32', 30_000), ('bfloat16', 10**9)])
def test_transformers_gives_the_same_logits(tmp_path, param_dtype,
                                            max_shard_bytes):
  # Compute in float32 on both sides; bfloat16 weights are upcast exactly.
  config = eu.tiny_config(param_dtype=param_dtype)
  params = eu.random_params(config, seed=5)
  out = _export(tmp_path / 'hf', config, params,
                max_shard_bytes=max_shard_bytes)
  tokens = eu.tokens(config, batch=3, length=40)
  ours = eu.logits(eu.model_with(config, params), tokens)

  model = transformers.LlamaForCausalLM.from_pretrained(
      out, dtype=torch.float32).eval()
  with torch.no_grad():
    theirs = model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
  assert theirs.shape == ours.shape == (3, 40, config.vocab_size)
  error = np.max(np.abs(theirs - ours)) / np.max(np.abs(ours))
  assert error <= RTOL, error
  # Nonzero but tiny: the comparison is between two real implementations.
  assert np.std(ours) > 0.1


def test_transformers_loads_the_tokenizer(tmp_path):
  spm = pytest.importorskip('sentencepiece')
  config = eu.tiny_config()
  proto = eu.tiny_tokenizer()
  out = _export(tmp_path / 'hf', config, eu.random_params(config), proto)
  tokenizer = transformers.AutoTokenizer.from_pretrained(out)
  assert type(tokenizer).__name__.startswith('LlamaTokenizer')
  sp = spm.SentencePieceProcessor(model_proto=proto)
  # Text that SentencePiece's normalizer leaves unchanged (single spaces,
  # known characters; TEXT[3] has a double space): see the README.
  for text in eu.TEXT[:3]:
    assert tokenizer(text)['input_ids'] == sp.encode(text), text
  assert (tokenizer.eos_token_id, tokenizer.pad_token_id,
          tokenizer.unk_token_id, tokenizer.bos_token_id) == (1, 0, 2, None)
  assert len(tokenizer) == sp.vocab_size()  # No token added.
  assert tokenizer.decode(sp.encode(eu.TEXT[0])) == eu.TEXT[0]
