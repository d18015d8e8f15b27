"""``results.md``: the study's results in the paper's layout, beside the
paper's numbers, with the figures and a list of the paper's claims that this
scale agrees or disagrees with (each decided from the runs' numbers)."""

from __future__ import annotations

import math
import statistics
from typing import Any, Optional, Sequence

from . import paper
from .config import LONG, SWEEP, Study, run_config
from .plots import label
from .results import memory_mb

_Row = dict[str, Any]


def best_rows(results: list[_Row], study: Study) -> dict[str, _Row]:
  """Each optimizer's best-rate row of the final phase (with finished runs)."""
  return {r['optimizer']: r for r in results
          if r['best_lr'] and r['phase'] == study.final_phase
          and r['eval_ppl_mean'] is not None}


def format_ppl(mean: Optional[float], std: Optional[float]) -> str:
  """``mean ± std`` (``mean`` alone for one seed; '—' for none)."""
  if mean is None:
    return '—'
  return f'{mean:.2f} ± {std:.2f}' if std is not None else f'{mean:.2f}'


def _ppl(row: Optional[_Row], whole: bool, diverged: bool = False) -> str:
  if row is None:
    return 'diverged at every rate' if diverged else 'not run'
  return (format_ppl(row['eval_ppl_mean'], row['eval_ppl_std'])
          + ('' if whole else ' (unfinished)'))


def _rate(row: _Row) -> str:
  """The best rate; marked where it is the end of the optimizer's grid (a
  rate beyond it, never tried, might be better)."""
  return f'{row["learning_rate"]:g}' + (' (grid end)' if row['grid_end']
                                         else '')


def paper_table(best: dict[str, _Row], whole: Sequence[str],
                diverged: Sequence[str], dtype: str) -> list[str]:
  """The paper's table: this study's perplexity and memory next to the
  paper's 60M column; memory also as a fraction of AdamW's. Rows of
  optimizers not in ``whole`` are marked unfinished."""
  size = '60M'  # The paper's smallest model: the column to sit beside.
  adam = best.get('adamw')
  p_adam = paper.TABLE['adamw'][size][1]
  lines = [
      f'| optimizer | perplexity here (best rate; mean ± std over seeds) | '
      f'best rate | weights + state here (MB, {dtype}) | vs AdamW | paper '
      f'{size} perplexity | paper {size} memory (GB, bf16) | vs Adam |',
      '|---|---|---|---|---|---|---|---|',
  ]
  for name, sizes in paper.TABLE.items():
    row = best.get(name)
    p_ppl, p_mem = sizes[size]
    mem = f'{memory_mb(row):.2f}' if row else '—'
    ratio = (f'{memory_mb(row) / memory_mb(adam):.2f}' if row and adam
             else '—')
    rate = _rate(row) if row else '—'
    lines.append(f'| {label(name)} | {_ppl(row, name in whole, name in diverged)}'
                 f' | {rate} | '
                 f'{mem} | {ratio} '
                 f'| {p_ppl:.2f} | {p_mem:.2f} | {p_mem / p_adam:.2f} |')
  return lines


def ablation_table(best: dict[str, _Row], whole: Sequence[str],
                   diverged: Sequence[str]) -> list[str]:
  """The bottom-up study's rows (with SCALE and AdamW for reference)."""
  lines = ['| optimizer | perplexity (best rate) | best rate | weights + '
           'state (MB) |', '|---|---|---|---|']
  for name in ('adamw', 'sgd', 'sgd_column_norm', 'sgd_row_norm', 'scale',
               'scale_first_last'):
    row = best.get(name)
    lines.append(f'| {label(name)} | {_ppl(row, name in whole)} | '
                 f'{_rate(row)} | {memory_mb(row):.2f} |'
                 if row else f'| {label(name)} | '
                 f'{_ppl(None, False, name in diverged)} | — | — |')
  return lines


def lr_sensitivity(results: list[_Row], study: Study, name: str,
                   phase: Optional[str] = None) -> Optional[float]:
  """Mean perplexity of the best rate's grid neighbours (one step on each
  side, those whose runs of ``phase``, default the final one, ended) over
  the best rate's (1 = insensitive; ``inf`` when a neighbour diverged at
  every seed); None without a best rate and an ended neighbour. Rates
  further away (a walk's) are left out, so every optimizer is measured over
  the same span of its grid."""
  phase = phase or study.final_phase
  ppl = {}
  for r in results:
    if r['optimizer'] != name or r['phase'] != phase:
      continue
    if r['eval_ppl_mean']:
      ppl[r['learning_rate']] = r['eval_ppl_mean']
    elif r['n_diverged'] and not r['n_missing']:
      ppl[r['learning_rate']] = math.inf
  best = [r['learning_rate'] for r in results if r['optimizer'] == name
          and r['phase'] == phase and r['best_lr']]
  if not best:
    return None
  grid = sorted(study.optimizers[name])
  i = grid.index(best[0])
  others = [ppl[lr] for lr in grid[max(0, i - 1):i + 2]
            if lr != best[0] and lr in ppl]
  if not others:
    return None
  return statistics.fmean(others) / ppl[best[0]]


def _ratio(x: float) -> str:
  return 'inf (a neighbour diverged)' if math.isinf(x) else f'{x:.3f}'


def _verdict(here: Optional[bool], paper_says: bool) -> str:
  if here is None:
    return 'not run'
  return 'agrees' if here == paper_says else '**disagrees**'


def claims(best: dict[str, _Row], results: list[_Row], study: Study,
           variance: dict[str, float], diverged: Sequence[str] = ()
           ) -> list[tuple[str, str, str, str]]:
  """``(claim, the paper, here, verdict)`` for each claim the runs decide,
  from the rows in ``best`` (the whole ones) only; an optimizer in
  ``diverged`` (at every rate) loses to any that trained."""
  ppl = {n: r['eval_ppl_mean'] for n, r in best.items()}
  ppl.update({n: math.inf for n in diverged})
  out = []

  def better(a, b):
    return None if a not in ppl or b not in ppl else ppl[a] < ppl[b]

  def show(a, b):
    return ('—' if a not in ppl or b not in ppl else ', '.join(
        f'{label(n)} {"diverged" if math.isinf(ppl[n]) else f"{ppl[n]:.2f}"}'
        for n in (a, b)))

  for rival in paper.TABLE:
    if rival == 'scale':
      continue
    p_scale, p_rival = paper.TABLE['scale']['60M'][0], paper.TABLE[rival]['60M'][0]
    says = p_scale < p_rival
    out.append((f'SCALE {"beats" if says else "trails"} {label(rival)} '
                f'(60M)', f'{p_scale:.2f} vs {p_rival:.2f}',
                show('scale', rival), _verdict(better('scale', rival), says)))
  mems = {n: memory_mb(r) for n, r in best.items() if n in paper.TABLE}
  table = [n for n in paper.TABLE if n in study.optimizers]
  if 'scale' in mems and len(mems) > 1:
    least = min(mems, key=mems.get)
    whole_table = len(mems) == len(table)
    out.append(('SCALE needs the least weights + state memory of the table',
                'yes, at every size',
                f'least{"" if whole_table else " so far"}: {label(least)}'
                + ('' if whole_table else f' ({len(mems)} of {len(table)} rows)'),
                _verdict(least == 'scale' if whole_table else None, True)))
  if 'scale' in mems and 'adamw' in mems:
    out.append(('SCALE / Adam weights + state memory', '0.43 (60M), 0.35 (1B)',
                f'{mems["scale"] / mems["adamw"]:.2f}', 'a ratio, not a claim'))
  for a, b, text in (
      ('adamw', 'sgd', 'plain SGD trails Adam far behind (Figure 2)'),
      ('sgd_column_norm', 'sgd', 'column-normalized SGD beats plain SGD'),
      ('sgd_column_norm', 'sgd_row_norm',
       'column-wise beats row-wise normalization (Figure 3)'),
      ('scale', 'sgd_column_norm',
       'LM-head momentum (SCALE) beats momentum-free column-norm SGD')):
    out.append((text, 'yes', show(a, b), _verdict(better(a, b), True)))
  if variance:
    order = sorted(variance, key=lambda g: -variance[g])
    out.append(('the LM head has the largest gradient variance, then the '
                'embedding (Figure 4)', 'yes', ', '.join(order[:3]),
                _verdict(order[:2] == ['lm_head', 'embed'], True)))
  # Whole rows only (``best``), as every other verdict.
  # The final phase's runs; the sweep's where the final phase has no
  # neighbours to compare (``long.neighbours: 0``).
  for phase, where in ((study.final_phase, ''), (SWEEP, ' (sweep runs)')):
    s_scale, s_spam = (lr_sensitivity(results, study, n, phase)
                       if n in best else None
                       for n in ('scale', 'stable_spam'))
    if s_scale is not None and s_spam is not None:
      break
  out.append(('SCALE is less sensitive to the learning rate than '
              'Stable-SPAM (Figure 5)', 'yes (130M)',
              '—' if s_scale is None or s_spam is None else
              f'neighbour/best perplexity {_ratio(s_scale)} vs '
              f'{_ratio(s_spam)}{where}',
              _verdict(None if s_scale is None or s_spam is None
                       else s_scale < s_spam, True)))
  return out


def ranked_group(group: str) -> bool:
  """Whether Figure 4 ranks ``group``: the embedding, a layer, the LM head
  (not the final RMSNorm's scale)."""
  return group in ('embed', 'lm_head') or group.startswith('layer_')


def variance_means(vrows: list[_Row], optimizer: str,
                   ranked_only: bool = True) -> dict[str, float]:
  """Mean gradient variance per group of one diagnosed optimizer's run (the
  groups Figure 4 ranks, or every group)."""
  groups: dict[str, list[float]] = {}
  for r in vrows:
    if r['optimizer'] == optimizer and (
        not ranked_only or ranked_group(r['group'])):
      groups.setdefault(r['group'], []).append(r['grad_var'])
  return {g: statistics.fmean(v) for g, v in groups.items()}


def whole_rows(results: list[_Row], study: Study) -> dict[str, _Row]:
  """:func:`best_rows` of the optimizers whose sweep and long runs have all
  ended (a finalist's extra seeds may still be missing), in study order."""
  best = best_rows(results, study)
  unfinished = {r['optimizer'] for r in results
                if r['n_missing'] and not r['finalist']}
  return {n: best[n] for n in study.order
          if n in best and n not in unfinished}


def diverged_everywhere(results: list[_Row], study: Study) -> list[str]:
  """The optimizers whose sweep runs all ended and all diverged: no rate to
  run long, nothing more to train for them."""
  out = []
  for name in study.order:
    sweep = [r for r in results
             if r['optimizer'] == name and r['phase'] == SWEEP]
    if sweep and not any(r['n_missing'] or r['n_runs'] for r in sweep):
      out.append(name)
  return out


def progress_lines(results: list[_Row], study: Study, whole: Sequence[str],
                   diverged: Sequence[str] = ()) -> list[str]:
  """A banner while the study is unfinished: which optimizers' rows are
  ``whole`` (their sweep and every long run finished) or ``diverged`` at
  every rate, and whether the finalists' extra seeds are still to come;
  empty once all are done."""
  ended = [*whole, *diverged]
  if len(ended) < len(study.optimizers):
    names = ', '.join([label(n) for n in whole] + [
        f'{label(n)}: diverged at every rate' for n in diverged])
    return [f'**In progress: {len(ended)} of {len(study.optimizers)} '
            f'optimizers finished** ({names or "none"}).'
            ' The others read "not run" until `python -m train.study` (it '
            'resumes where it stopped) has trained them, optimizer by '
            'optimizer, and so do the verdicts about them; a row marked '
            '"unfinished" is the best of the long runs ended so far. The '
            'finalists\' extra seeds come after every optimizer\'s long runs: '
            'until then each perplexity here is one seed.', '']
  if any(r['n_missing'] for r in results if r['finalist']):
    return ['**In progress: every optimizer finished; the finalists\' extra '
            'seeds are still to train** (`python -m train.study` resumes).', '']
  return []


def restored_lines(restored: Sequence[_Row]) -> list[str]:
  """A note on the finished runs the ledger holds as restored from an
  earlier report's tables (their summaries name the source in
  ``restored_from``): how many, from where, and what they lack."""
  if not restored:
    return []
  sources = sorted({r['restored_from'] for r in restored})
  n_long = sum(r['phase'] == LONG for r in restored)
  return [f'{len(restored)} finished runs ({n_long} of them long) are '
          f'restored from {"; ".join(sources)}: their run folders were lost '
          'with a machine before the study kept its ledger. Their figures are '
          'those tables\' (6 significant digits) and their eval curves are '
          'gone: the eval-loss figure draws the runs trained since (for a '
          'finalist, its second seed alone).', '']


def eval_order(info: dict[str, Any]) -> str:
  """The order the eval reads its split in (``data.eval_shuffle``)."""
  return ('one fixed shuffled order of its documents'
          if info.get('eval_shuffle') else 'its stored order')


def eval_source(info: dict[str, Any]) -> str:
  """Which documents of the eval split the eval tokens come from, as a
  phrase ('' when the study has not recorded it)."""
  docs = info.get('eval_documents')
  if not docs:
    return ''
  n, of = docs['documents'], docs['of']
  if info.get('eval_shuffle'):
    return f'{n:,} of the split\'s {of:,} documents' + (
        ' alone' if n == 1 else '')
  return (f'the first of the split\'s {of:,} documents alone' if n == 1 else
          f'the first {n:,} of the split\'s {of:,} documents')


def _eval_note(info: dict[str, Any], source: str) -> str:
  """The Setting line's parenthesis on the eval tokens ('' for none)."""
  parts = [] if info.get('eval_shuffle') else ['not a sample across the split']
  if source:
    parts.append(f'they come from {source}')
  return f' ({": ".join(parts)})' if parts else ''


def _eval_is_part(info: dict[str, Any]) -> bool:
  """Whether the eval tokens come from only some of the eval split's
  documents."""
  docs = info.get('eval_documents')
  return bool(docs) and docs['documents'] < docs['of']


def seed_spread_lines(best: dict[str, _Row]) -> list[str]:
  """How far apart the seeds of each best-rate row run with more than one
  seed (the finalists') ended: a gap between two rows smaller than that is
  within what another seed may change. Empty before any has two."""
  spread = sorted(((r['eval_ppl_max'] / r['eval_ppl_min'] - 1, name)
                   for name, r in best.items()
                   if r['n_runs'] > 1 and r['eval_ppl_min']))
  if not spread:
    return []
  each = ', '.join(f'{label(name)} {gap:.1%}' for gap, name in spread)
  return [f'Seeds: at their best rate the seeds of a row run more than once '
          f'end this far apart in perplexity (highest over lowest): {each}. '
          'A gap between two rows smaller than that could turn with other '
          'seeds; the rows with one seed have no such measure.', '']


def cost_lines(estimate: Optional[dict[str, Any]],
               left: Optional[tuple[int, float]] = None,
               spent: Optional[dict[str, tuple[int, float]]] = None
               ) -> list[str]:
  """The measured cost (``--estimate``), if it was run; the runs finished
  and their cost at its rates (``spent``, :func:`estimate.spent`); and what
  is ``left`` (:func:`estimate.remaining`) while runs are."""
  if not estimate:
    return ['Not measured yet: `python -m train.study --estimate`.']
  lines = [
      f'From `python -m train.study --estimate` ({estimate["measured_steps"]} '
      f'timed steps of each optimizer, {estimate["cpu_count"]} cores, load '
      f'average up to {estimate["load_average"]:.1f}): '
      f'**{estimate["cpu_s"] / 3600:.1f} CPU hours** '
      f'({estimate["wall_s"] / 3600:.1f} hours of wall clock in sequence at '
      f'that load).', '',
      '| optimizer | ms CPU / step | ms wall / step | compile (s) | runs | '
      'CPU hours |', '|---|---|---|---|---|---|']
  for name, e in estimate['optimizers'].items():
    runs = ', '.join(f'{n} {p}' for p, n in e['runs'].items())
    lines.append(f'| {label(name)} | {e["step_cpu_s"] * 1e3:.1f} | '
                 f'{e["step_s"] * 1e3:.1f} | {e["compile_s"]:.0f} | {runs} | '
                 f'{e["cpu_s"] / 3600:.2f} |')
  n = estimate['finalist_runs']
  lines.append(f'| finalists | | | | {n} long | '
               f'{n * estimate["finalist_run_cpu_s"] / 3600:.2f} |')
  if spent:
    names = {'sweep': 'sweep', 'long': "long (the walks' steps included)",
             'finalist': "finalists' seeds"}
    kinds = ' + '.join(f'{spent[k][0]} {names[k]}' for k in names
                       if k in spent)
    runs = sum(n for n, _ in spent.values())
    cpu = sum(c for _, c in spent.values())
    whole = not (left and left[0])
    lines += ['', (
        'The runs the study took, at those rates (a diverged run counted '
        f'whole): {kinds} = {runs} runs, **{cpu / 3600:.1f} CPU hours**'
        + (': the cost of `python -m train.study` from scratch (with '
           '`docs/ledger` and the run folders removed it trains every run '
           'again and rewrites this page).' if whole else ' so far.'))]
  if left and left[0]:
    lines += ['', f'Left at this report: {left[0]} runs, about '
              f'{left[1] / 3600:.1f} CPU hours at those rates (a run stopped '
              'part way counts whole; walk steps not yet queued are not '
              'counted).']
  return lines


def rate_note(study: Study) -> str:
  """How the tables' best rate was chosen (a walk only with neighbours)."""
  if study.long_train is None:
    how = 'the lowest sweep loss'
  elif study.long_neighbours == 0:
    how = 'the best sweep rate, run long alone (no neighbours, no walk)'
  else:
    how = ('the lowest long-run loss; long runs walk past a best rate at '
           'their edge, one grid step at a time, until it is neither the '
           'lowest nor the highest rate run long, or the end of the swept '
           'grid')
  return (f'The best rate is {how}; "grid end" marks a best rate at the end '
          'of the swept grid (a rate beyond it was never tried).')


def stable_spam_note(study: Study) -> str:
  """Stable-SPAM's fixed reset period against this study's run length ('' if
  the study has no Stable-SPAM)."""
  rates = study.optimizers.get('stable_spam')
  if not rates:
    return ''
  config = run_config(study, study.final_phase, 'stable_spam', rates[0],
                      study.seeds[0])
  steps, period = config.train.steps, config.rivals.stable_spam.reset_interval
  theirs = paper.STABLE_SPAM_STEPS
  said = (f' Stable-SPAM keeps its released momentum-reset period '
          f'({period:,} steps; the authors\' 130M script: {theirs:,} steps, '
          f'{theirs // period} resets)')
  if steps < period:
    return said + f', so a {steps:,}-step run here never resets.'
  return (
      f'{said}, so a run here resets {steps // period} times; in the '
      'authors\' code the clip threshold\'s bias correction restarts at each '
      'reset, which leaves the clip practically off after the first one: it '
      f'acts over the first {period / steps:.0%} of a run here, '
      f'{period / theirs:.0%} of theirs.')


def results_page(study: Study, results: list[_Row], info: dict[str, Any],
                 vrows: list[_Row], estimate: Optional[dict[str, Any]],
                 left: Optional[tuple[int, float]] = None,
                 restored: Sequence[_Row] = (),
                 spent: Optional[dict[str, tuple[int, float]]] = None) -> str:
  """The whole page (``restored``: the run rows restored from an earlier
  report, :func:`restored_lines`; ``left`` and ``spent``:
  :func:`cost_lines`)."""
  best = best_rows(results, study)
  whole = whole_rows(results, study)
  diverged = diverged_everywhere(results, study)
  source = eval_source(info)
  tokens_per_param = info['tokens'] / info['params']
  diagnosed = next((n for n in study.diagnostics_optimizers  # Whole rows only.
                    if n in whole and variance_means(vrows, n)), None)
  variance = variance_means(vrows, diagnosed) if diagnosed else {}
  lines = [f'# {study.title}', '']
  if tokens_per_param < 20:
    lines += [f'**Not a pretraining result: the runs here see '
              f'{tokens_per_param:.2f} tokens per parameter**, far below the '
              'about 20 of a compute-optimal run, so the ranking says how fast '
              'each optimizer starts; `python -m train.study` runs 20.', '']
  lines += progress_lines(results, study, list(whole), diverged)
  lines += [
      'Generated by `python -m train.study` from the runs under '
      f'`{study.output_dir}` and their copies in `{study.ledger_dir}` '
      '(tables: results.csv, runs.csv, results_table.md;'
      ' nothing on this page is typed in by hand except the paper\'s numbers, '
      'train/study/paper.py).', '',
      *restored_lines(restored),
      '## Setting', '',
      f'LLaMA with **{info["params"]:,} parameters** ({info["non_embedding_params"]:,}'
      f' besides the embedding and the untied LM head, {info["embedding_params"]:,}'
      f' in those two; counted in full, as the paper does), vocab '
      f'{info["vocab_size"]}, d_model {info["d_model"]}, {info["n_layers"]} '
      f'layers, {info["n_heads"]} heads, d_ff {info["d_ff"]}; data '
      f'`{info["data"]}`'
      + (f' ({info["train_tokens"]:,} training tokens)'
         if info.get('train_tokens') else '') +
      f'; batch {info["batch_size"]} x {info["seq_len"]}. '
      + (f'Sweep runs of {info["sweep_steps"]} steps, then long runs of '
         if study.long_train is not None else 'Runs of ') +
      f'{info["steps"]} steps = {info["tokens"]:,} tokens = **{tokens_per_param:.1f} tokens per '
      f'parameter**; warmup {info["warmup_steps"]} steps, cosine to '
      f'{info["min_lr_ratio"]:g} of the peak, clipping '
      f'{info["grad_clip"] or "none"}, '
      f'weight decay {info["weight_decay"]:g}, {info["dtype"]}. Eval: the '
      f'first {info["eval_tokens"]:,} tokens of the `{info["eval_split"]}` '
      f'split in {eval_order(info)}, the same for every run'
      f'{_eval_note(info, source)}. Seeds '
      f'{info["seeds"]}, finalists add {info["finalist_seeds"]}.', '',
      '## The paper\'s table at this scale', '',
      *paper_table(best, list(whole), diverged, info['dtype']), '',
      f'Memory here is {info["dtype"]} weights + optimizer state; the paper '
      'counts 2 bytes a value, so compare the ratios to AdamW/Adam, not the '
      'sizes. '
      + rate_note(study), '',
      '## The bottom-up study', '',
      *ablation_table(best, list(whole), diverged), '',
      '## Figures', '',
      '![Figure 1: perplexity against memory](ppl_vs_memory.png)', '',
      '*Figure 1 at this scale: final perplexity against weights + optimizer '
      'state, each optimizer at its best rate.*', '',
      '![eval loss against tokens](loss_vs_tokens.png)', '',
  ]
  if variance:
    lines += ['![Figure 4: gradient variance per layer](grad_variance.png)',
              '', f'*Figure 4 at this scale: per-layer stochastic-gradient '
              f'variance along training ({label(diagnosed)}).*', '']
  lines += [
      '![Figure 5: learning-rate sensitivity](lr_sensitivity.png)', '',
      '*Figure 5 at this scale: final perplexity against the peak learning '
      'rate.*', '',
      '## Where this scale agrees or disagrees with the paper', '',
      'Each verdict is computed from the runs (paper: its 60M column unless '
      'said otherwise).', '',
      '| claim | the paper | here | verdict |', '|---|---|---|---|',
      *[f'| {c} | {p} | {h} | {v} |'
        for c, p, h, v in claims(whole, results, study, variance, diverged)],
      '', *seed_spread_lines(best),
      'Why a small-scale ranking may differ from the paper\'s: this model '
      f'has {info["params"] / 58.07e6:.1%} of the parameters of the paper\'s '
      f'smallest (58.07M); the data are `{info["data"]}`, not C4 English '
      '(its tokenizer, like the paper\'s T5 vocabulary, turns every run of '
      'whitespace, newlines and indentation included, into one space); '
      f'the runs see {tokens_per_param:.1f} tokens per parameter (60M: 24); '
      + ('' if info['dtype'] == 'bfloat16' else
         f'weights are {info["dtype"]}, not bf16; ') +
      'the batch holds '
      f'{info["batch_size"] * info["seq_len"]:,} tokens, not 131K; rates '
      'are chosen on a half-decade grid from short runs; the rivals\' ranks '
      'and gaps are scaled from their 60M scripts; and optimizers that are '
      'not finalists have one seed (the finalists\' seeds show the spread).'
      + (f' The eval tokens come from {source}: a perplexity '
         'here measures that text, and it moves with how recently a run '
         'trained on related text.' if _eval_is_part(info) else '')
      + stable_spam_note(study),
      '', '## Cost', '', *cost_lines(estimate, left, spent), '',
  ]
  return '\n'.join(lines)
