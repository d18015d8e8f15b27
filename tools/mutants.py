"""Planted bugs: each one must make the tests named with it fail.

Every mutant is one small edit of the kind a refactor introduces without
noticing (a schedule decaying to 0, clipping after the optimizer, every
process reading the same rows, ...). The script copies the repository to a
scratch folder (without .git, runs/, data_cache/), plants one mutant at a
time there, runs the mutant's tests against the copy (``PYTHONPATH`` pointing
at it), restores the file, and prints a table and the kill rate.

    python tools/mutants.py              # every mutant (49: 500 s on an idle
                                         # 2-core machine)
    python tools/mutants.py --list       # ids, files and target tests
    python tools/mutants.py --only cosine-to-zero --only clip-after-optimizer
    python tools/mutants.py --baseline   # first run all targets unmutated

Exit status 0 only if every mutant was killed. A mutant whose original
snippet is not in its file exactly once is reported STALE (and the exit
status is 1): update its snippet here when the code it targets moves, so the
list cannot rot silently. A target test id that pytest cannot find is
reported BAD-TESTS. Extend ``MUTANTS`` with every change that could plant a
bug the suite should catch.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
IGNORED = ('.git', 'runs', 'data_cache', '__pycache__', '.pytest_cache',
           '*.egg-info', '.venv')
TIMEOUT_S = 900


@dataclasses.dataclass(frozen=True)
class Mutant:
  """One planted bug.

  ``original`` and ``replacement`` are a string each, or tuples of the same
  length giving alternatives (the code before and after a pending refactor):
  the first alternative found exactly once in the file is planted.
  """
  id: str
  file: str  # Relative to the repository root.
  original: str | tuple[str, ...]
  replacement: str | tuple[str, ...]
  tests: tuple[str, ...]  # pytest node ids that must fail.

  def edits(self) -> list[tuple[str, str]]:
    if isinstance(self.original, str):
      return [(self.original, self.replacement)]
    assert len(self.original) == len(self.replacement), self.id
    return list(zip(self.original, self.replacement))


P = 'tests/train/test_pinned.py::'
SP = 'tests/scale_optax/test_scale_pinned.py::'
MODEL = 'tests/train/test_model.py::'
AA = 'tests/scale_optax/test_authors_adam.py::'
CR = 'tests/scale_optax/test_contrib_reference.py::'
MU = 'tests/train/test_muon_axes.py::'

MUTANTS: tuple[Mutant, ...] = (
    # ----------------------------------------------------- scale_optax ----
    Mutant('scale-axis-1', 'scale_optax/transform.py',
           '    return (0,)', '    return (1,)',
           (SP + 'test_column_rms_over_the_fan_in_by_hand',)),
    Mutant('rms-as-sum', 'scale_optax/transform.py',
           ('return jnp.mean(jnp.square(x), axis=axes, keepdims=True)',
            '  return total / math.prod(x.shape[a] for a in axes)'),
           ('return jnp.sum(jnp.square(x), axis=axes, keepdims=True)',
            '  return total'),
           (SP + 'test_column_rms_over_the_fan_in_by_hand',)),
    Mutant('eps-added-not-clamped', 'scale_optax/transform.py',
           ('g32 / jnp.maximum(jnp.sqrt(ms), eps)',
            'u = x / jnp.maximum(rms, eps)'),
           ('g32 / (jnp.sqrt(ms) + eps)', 'u = x / (rms + eps)'),
           (SP + 'test_eps_clamps_the_rms',)),
    Mutant('momentum-debiased', 'scale_optax/transform.py',
           'optax.ema(momentum, debias=False',
           'optax.ema(momentum, debias=True',
           (SP + 'test_output_layer_momentum_is_not_debiased',)),
    Mutant('momentum-beta-swapped', 'scale_optax/transform.py',
           'optax.ema(momentum, debias=False',
           'optax.ema(1 - momentum, debias=False',
           (SP + 'test_output_layer_momentum_is_not_debiased',
            'tests/scale_optax/test_scale_reference.py::'
            'test_scale_matches_numpy_algorithm_1[False-0.0]')),
    Mutant('momentum-on-embedding', 'scale_optax/transform.py',
           "DEFAULT_OUTPUT_LAYER = r'(^|/)lm_head(/|$)'",
           "DEFAULT_OUTPUT_LAYER = r'(^|/)embed(/|$)'",
           (P + 'test_optimizer_routing_on_the_state[scale]',)),
    Mutant('decay-before-normalize', 'scale_optax/alias.py',
           ('      _NORMALIZATIONS[normalization](eps=eps, '
            'reduction_axes=reduction_axes),\n'
            '      optax.add_decayed_weights(weight_decay),\n',
            '      _NORMALIZATIONS[normalization](eps=eps, '
            'reduction_axes=reduction_axes,\n'
            '                                     '
            'tied_embedding=tied_embedding),\n'
            '      optax.add_decayed_weights(weight_decay),\n'),
           ('      optax.add_decayed_weights(weight_decay),\n'
            '      _NORMALIZATIONS[normalization](eps=eps, '
            'reduction_axes=reduction_axes),\n',
            '      optax.add_decayed_weights(weight_decay),\n'
            '      _NORMALIZATIONS[normalization](eps=eps, '
            'reduction_axes=reduction_axes,\n'
            '                                     '
            'tied_embedding=tied_embedding),\n'),
           (SP + 'test_scale_first_update_by_hand',)),
    Mutant('vector-decay-dropped', 'scale_optax/alias.py',
           'weight_decay=weight_decay)\n  parts = optax.partition',
           'weight_decay=0.0)\n  parts = optax.partition',
           (SP + 'test_scale_first_update_by_hand',)),
    Mutant('adam-betas-swapped', 'scale_optax/alias.py',
           'b1=adam_b1, b2=adam_b2,', 'b1=adam_b2, b2=adam_b1,',
           ('tests/scale_optax/test_scale_reference.py::'
            'test_scale_matches_numpy_algorithm_1[False-0.0]',)),
    Mutant('vectors-column-normalized', 'scale_optax/alias.py',
           ("'matrix' if x.ndim >= 2 else 'vector'",
            "labels = iter(['vector' if v else 'matrix' for v in"),
           ("'matrix' if x.ndim >= 1 else 'vector'",
            "labels = iter(['matrix' for v in"),
           (P + 'test_optimizer_routing_on_the_state[scale]',)),
    Mutant('first-last-without-embedding', 'scale_optax/alias.py',
           "FIRST_AND_LAST_LAYERS = r'(^|/)(embed|embedding|tok_embeddings|"
           "wte|lm_head)(/|$)'",
           "FIRST_AND_LAST_LAYERS = r'(^|/)(lm_head)(/|$)'",
           (P + 'test_optimizer_routing_on_the_state[scale_first_last]',)),
    Mutant('adam-bias-correction-swapped', 'scale_optax/adam.py',
           'return jnp.sqrt(1 - b2 ** t) / (1 - b1 ** t)',
           'return jnp.sqrt(1 - b1 ** t) / (1 - b2 ** t)',
           (AA + 'test_authors_adamw_matches_numpy[0.0]',)),
    Mutant('adam-first-moment-at-b2', 'scale_optax/adam.py',
           'mu = (1 - b1) * g.astype(mu.dtype) + b1 * mu',
           'mu = (1 - b2) * g.astype(mu.dtype) + b2 * mu',
           (AA + 'test_authors_adamw_matches_numpy[0.0]',
            CR + 'test_low_rank_matches_reference[galore]')),
    # ------------------------------------------------- scale_optax.contrib ----
    Mutant('galore-decay-on-old-params', 'scale_optax/contrib/adam.py',
           'lambda u, p: (u - lr * weight_decay * (p + u)).astype(u.dtype),',
           'lambda u, p: (u - lr * weight_decay * p).astype(u.dtype),',
           (CR + 'test_low_rank_matches_reference[galore]',)),
    Mutant('fira-residual-unscaled', 'scale_optax/contrib/low_rank.py',
           'residual = (g - alpha * projection.project_back(r, basis, axis))'
           ' * phi',
           'residual = (g - projection.project_back(r, basis, axis)) * phi',
           (CR + 'test_low_rank_matches_reference[fira]',)),
    Mutant('apollo-scale-not-square-rooted', 'scale_optax/contrib/low_rank.py',
           'multiply = optax.scale(math.sqrt(scale))',
           'multiply = optax.scale(scale)',
           (CR + 'test_low_rank_matches_reference[apollo]',
            CR + 'test_low_rank_matches_reference[apollo_front]')),
    Mutant('projector-refresh-one-step-late',
           'scale_optax/contrib/low_rank.py',
           'refresh = state.count % update_gap == 0',
           'refresh = (state.count + 1) % update_gap == 0',
           (CR + 'test_low_rank_matches_reference[galore]',)),
    Mutant('swan-gradnorm-over-outputs', 'scale_optax/contrib/swan.py',
           '                  axis: int = -2) -> optax.GradientTransformation:',
           '                  axis: int = -1) -> optax.GradientTransformation:',
           (CR + 'test_swan_matches_reference',)),
    Mutant('stable-spam-clip-to-threshold', 'scale_optax/contrib/stable_spam.py',
           'jnp.where(jnp.abs(g) > threshold, g / top * threshold, g)',
           'jnp.where(jnp.abs(g) > threshold, jnp.sign(g) * threshold, g)',
           (CR + 'test_stable_spam_adaclip_scales_spikes_by_threshold_over_max',)),
    Mutant('stable-spam-no-reset-of-bias-correction',
           'scale_optax/contrib/stable_spam.py',
           'step = jnp.where(reset, 1, state.step + 1)',
           'step = state.step + 1',
           (CR + 'test_stable_spam_matches_authors_code_across_resets',)),
    # ------------------------------------------------------ train/optim ----
    Mutant('cosine-to-zero', 'train/optim.py',
           'end_value=peak * config.min_lr_ratio)', 'end_value=0.0)',
           (P + 'test_matrix_and_vector_schedules_by_hand[999]',)),
    Mutant('warmup-from-peak', 'train/optim.py',
           'init_value=0.0, peak_value=peak',
           'init_value=peak, peak_value=peak',
           (P + 'test_matrix_and_vector_schedules_by_hand[0]',)),
    Mutant('vector-schedule-matrix-peak', 'train/optim.py',
           'peak=config.vector_learning_rate)', 'peak=None)',
           (P + 'test_first_update_rates_per_leaf[scale]',)),
    Mutant('scale-1d-adam-at-matrix-rate', 'train/optim.py',
           'vector_learning_rate=vector_lr,', 'vector_learning_rate=lr,',
           (P + 'test_first_update_rates_per_leaf[scale]',)),
    Mutant('clip-after-optimizer', 'train/optim.py',
           'tx = optax.chain(optax.clip_by_global_norm(config.grad_clip), tx)',
           'tx = optax.chain(tx, optax.clip_by_global_norm(config.grad_clip))',
           (P + 'test_clipping_comes_before_the_optimizer',)),
    Mutant('muon-on-embedding', 'train/optim.py',
           "_MUON_ADAM_PATHS = re.compile(r'(^|/)(embed|lm_head)(/|$)')",
           "_MUON_ADAM_PATHS = re.compile(r'(^|/)(lm_head)(/|$)')",
           (P + 'test_optimizer_routing_on_the_state[muon]',)),
    Mutant('muon-axes-swapped', 'train/optim.py',
           'MuonDimensionNumbers(reduction_axis=lead,\n'
           '                                              output_axis=lead + 1)',
           'MuonDimensionNumbers(reduction_axis=lead + 1,\n'
           '                                              output_axis=lead)',
           (MU + 'test_muon_scales_up_proj_by_sqrt_fan_out_over_fan_in'
            '[unrolled]',)),
    Mutant('muon-stacked-kernels-to-adam', 'train/optim.py',
           '    lead = stacked_layers(path)\n',
           '    lead = 0\n',
           (MU + 'test_muon_scales_up_proj_by_sqrt_fan_out_over_fan_in'
            '[scanned]',)),
    Mutant('muon-adam-at-matrix-rate', 'train/optim.py',
           'adam_learning_rate=vlr,', 'adam_learning_rate=lr,',
           (P + 'test_first_update_rates_per_leaf[muon]',)),
    # ------------------------------------------------ train/step, loop ----
    Mutant('eval-batch-mean-as-sum', 'train/step.py',
           "'loss_sum': value * aux['tokens']", "'loss_sum': value",
           (P + 'test_eval_loss_and_perplexity_are_token_weighted',)),
    Mutant('eval-mean-of-batch-means', 'train/step.py',
           "{'loss_sum': value * aux['tokens'], 'tokens': aux['tokens']}",
           "{'loss_sum': value, 'tokens': jnp.ones(())}",
           (P + 'test_eval_loss_and_perplexity_are_token_weighted',)),
    Mutant('skip-ignores-new-params', 'train/step.py',
           'finite = jnp.isfinite(value) & jnp.isfinite(grad_norm) & '
           'params_finite',
           'finite = jnp.isfinite(value) & jnp.isfinite(grad_norm)',
           ('tests/train/test_reliability_units.py::'
            'test_optimizer_making_nan_from_finite_gradients_is_skipped',)),
    Mutant('process-index-not-passed', 'train/loop.py',
           'pindex, pcount = jax.process_index(), jax.process_count()',
           'pindex, pcount = 0, jax.process_count()',
           ('tests/train/test_multihost.py::'
            'test_each_process_reads_its_own_part_of_every_batch',)),
    Mutant('skip-limit-reached-unread', 'train/loop.py',
           'return self.skips_in_a_row + steps < self.max_skips',
           'return self.skips_in_a_row + steps <= self.max_skips',
           ('tests/train/test_loop_units.py::'
            'test_the_skip_limit_stops_on_its_last_skip_with_nothing_queued_'
            'after',)),
    Mutant('logged-rate-of-next-step', 'train/loop.py',
           'jnp.arange(config.train.steps)))',
           'jnp.arange(1, config.train.steps + 1)))',
           ('tests/train/test_train_e2e.py::'
            'test_run_outputs_and_memory_report',)),
    # ----------------------------------------------------- train/data ----
    Mutant('shards-overlap', 'train/data/pipeline.py',
           '[process_index::process_count]', '[0::process_count]',
           ('tests/train/test_data_pipeline.py::'
            'test_process_shards_are_disjoint',)),
    Mutant('packing-skips-a-token', 'train/data/packing.py',
           '    self._offset += self._length\n',
           '    self._offset += self._length + 1\n',
           ('tests/train/test_data_pipeline.py::'
            'test_packing_is_the_document_stream_in_order',)),
    # ---------------------------------------------------- train/model ----
    Mutant('loss-weights-ignored', 'train/model.py',
           "weights = batch.get('weights')", 'weights = None',
           (MODEL + 'test_loss_at_init_and_weights',
            P + 'test_eval_loss_and_perplexity_are_token_weighted')),
    Mutant('loss-mean-over-all-tokens', 'train/model.py',
           'return loss_sum / denom, aux', 'return loss_sum / targets.size, aux',
           (MODEL + 'test_loss_at_init_and_weights',)),
    Mutant('targets-are-inputs', 'train/model.py',
           "targets = batch['targets']", "targets = batch['inputs']",
           (P + 'test_eval_loss_and_perplexity_are_token_weighted',)),
    Mutant('rope-rotates-backwards', 'train/model.py',
           'out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin],',
           'out = jnp.concatenate([x1 * cos + x2 * sin, x2 * cos - x1 * sin],',
           (MODEL + 'test_rope_half_split_layout',
            P + 'test_forward_matches_numpy_llama')),
    Mutant('rope-frequencies', 'train/model.py',
           'inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 '
           '/ head)',
           'inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) * 1.0 '
           '/ head)',
           (MODEL + 'test_rope_half_split_layout',
            P + 'test_forward_matches_numpy_llama')),
    Mutant('attention-not-causal', 'train/model.py',
           'is_causal=True', 'is_causal=False',
           (MODEL + 'test_causal', P + 'test_forward_matches_numpy_llama')),
    Mutant('segments-see-earlier-segments', 'train/model.py',
           'mask = (segment_ids[:, None, :, None] == '
           'segment_ids[:, None, None, :])',
           'mask = (segment_ids[:, None, :, None] >= '
           'segment_ids[:, None, None, :])',
           (MODEL + 'test_packed_segments_are_independent',)),
    Mutant('rmsnorm-scale-dropped', 'train/model.py',
           'y = xf * jax.lax.rsqrt(var + self.eps) * '
           'self.scale[...].astype(jnp.float32)',
           'y = xf * jax.lax.rsqrt(var + self.eps)',
           (P + 'test_forward_matches_numpy_llama',)),
    Mutant('swiglu-gate-and-up-swapped', 'train/model.py',
           'jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)',
           'jax.nn.silu(self.up_proj(x)) * self.gate_proj(x)',
           (P + 'test_forward_matches_numpy_llama',)),
    Mutant('attention-residual-dropped', 'train/model.py',
           'x = x + self.attn(self.attn_norm(x), positions, mask)',
           'x = self.attn(self.attn_norm(x), positions, mask)',
           (P + 'test_forward_matches_numpy_llama',)),
    Mutant('final-norm-skipped', 'train/model.py',
           'return self.lm_head(self.final_norm(x))',
           'return self.lm_head(x)',
           (P + 'test_forward_matches_numpy_llama',)),
    # A checkpoint that passed its integrity check is not damaged: an error
    # restoring it is a bug and must not move it aside.
    Mutant('verified-checkpoint-set-aside', 'train/checkpoint.py',
           'if verified or damage is None:',
           'if damage is None:',
           ('tests/train/test_reliability_units.py::'
            'test_other_restore_errors_propagate_and_move_nothing',)),
)


@dataclasses.dataclass
class Result:
  mutant: Mutant
  status: str  # killed | SURVIVED | STALE | BAD-TESTS | ERROR
  seconds: float = 0.0
  detail: str = ''


def find_edit(root: pathlib.Path, m: Mutant) -> tuple[str, str] | str:
  """The (original, replacement) to plant, or why there is none."""
  path = root / m.file
  if not path.is_file():
    return f'{m.file} does not exist'
  text = path.read_text()
  for original, replacement in m.edits():
    if text.count(original) == 1:
      return original, replacement
  counts = ', '.join(f'{text.count(o)} x {o!r}' for o, _ in m.edits())
  return (f'no original snippet occurs exactly once in {m.file} ({counts}); '
          f'update the mutant to the current code')


def copy_repository(destination: pathlib.Path) -> pathlib.Path:
  target = destination / 'repo'
  shutil.copytree(REPO, target, ignore=shutil.ignore_patterns(*IGNORED))
  return target


def run_tests(root: pathlib.Path, tests: tuple[str, ...],
              timeout: int) -> tuple[int, str]:
  """pytest on ``tests`` in ``root``; (exit code, output tail)."""
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join(
      [str(root)] + [p for p in env.get('PYTHONPATH', '').split(os.pathsep)
                     if p and pathlib.Path(p).resolve() != REPO])
  env['PYTHONDONTWRITEBYTECODE'] = '1'
  cmd = [sys.executable, '-m', 'pytest', '-x', '-q', '-p', 'no:cacheprovider',
         '-m', '', '-n', '0', *tests]
  try:
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True,
                          text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return -1, f'timed out after {timeout} s'
  return proc.returncode, (proc.stdout + proc.stderr)[-3000:]


def _first_failure(output: str, code: int) -> str:
  if code == -1:
    return output
  for line in output.splitlines():
    if line.startswith(('FAILED ', 'ERROR ')):
      return line.split(' - ')[0]
  return f'pytest exit {code}'


def run_mutant(root: pathlib.Path, m: Mutant, timeout: int) -> Result:
  edit = find_edit(root, m)
  if isinstance(edit, str):
    return Result(m, 'STALE', detail=edit)
  path = root / m.file
  original = path.read_text()
  path.write_text(original.replace(*edit))
  start = time.monotonic()
  try:
    code, output = run_tests(root, m.tests, timeout)
  finally:
    path.write_text(original)
  seconds = time.monotonic() - start
  if code in (1, 2) or code == -1:  # Failed, errored, or hung: caught.
    return Result(m, 'killed', seconds, _first_failure(output, code))
  if code == 0:
    return Result(m, 'SURVIVED', seconds)
  if code in (4, 5):  # Usage error / nothing collected: bad node ids.
    return Result(m, 'BAD-TESTS', seconds, output.strip().splitlines()[-1])
  return Result(m, 'ERROR', seconds, f'pytest exit {code}: {output[-500:]}')


def print_table(results: list[Result], wall: float) -> None:
  width = max(len(r.mutant.id) for r in results)
  print(f'\n{"mutant":<{width}}  {"result":<9}  {"time":>6}  file')
  for r in results:
    print(f'{r.mutant.id:<{width}}  {r.status:<9}  {r.seconds:5.0f}s  '
          f'{r.mutant.file}' + (f'  ({r.detail})' if r.detail else ''))
  killed = sum(r.status == 'killed' for r in results)
  print(f'\nkilled {killed} of {len(results)} '
        f'({100 * killed / len(results):.0f}%), {wall:.0f} s in all')


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--only', action='append', default=[], metavar='ID',
                      help='run only this mutant (repeatable)')
  parser.add_argument('--list', action='store_true',
                      help='list the mutants and exit')
  parser.add_argument('--baseline', action='store_true',
                      help='first check that the targets pass unmutated')
  parser.add_argument('--timeout', type=int, default=TIMEOUT_S,
                      help='seconds per mutant (a hang counts as killed)')
  args = parser.parse_args(argv)

  ids = [m.id for m in MUTANTS]
  if len(set(ids)) != len(ids):
    raise SystemExit('tools/mutants.py: duplicate mutant ids')
  unknown = sorted(set(args.only) - set(ids))
  if unknown:
    print(f'unknown mutant id(s) {unknown}; known: {ids}', file=sys.stderr)
    return 2
  chosen = [m for m in MUTANTS if not args.only or m.id in args.only]
  if args.list:
    for m in chosen:
      edit = find_edit(REPO, m)
      stale = edit if isinstance(edit, str) else ''
      print(f'{m.id}  {m.file}{"  STALE: " + stale if stale else ""}')
      for t in m.tests:
        print(f'    {t}')
    return 0

  start = time.monotonic()
  with tempfile.TemporaryDirectory(prefix='mutants-') as scratch:
    root = copy_repository(pathlib.Path(scratch))
    if args.baseline:
      targets = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
      code, output = run_tests(root, targets, args.timeout * 2)
      if code != 0:
        print(f'baseline: the target tests fail without any mutant:\n'
              f'{output}', file=sys.stderr)
        return 1
      print(f'baseline: {len(targets)} target tests pass unmutated '
            f'({time.monotonic() - start:.0f} s)')
    results = []
    for m in chosen:
      result = run_mutant(root, m, args.timeout)
      print(f'{m.id}: {result.status} ({result.seconds:.0f} s)'
            + (f' {result.detail}' if result.detail else ''), flush=True)
      results.append(result)
  print_table(results, time.monotonic() - start)
  return 0 if all(r.status == 'killed' for r in results) else 1


if __name__ == '__main__':
  sys.exit(main())
