"""Plots (matplotlib, Agg backend, PNG)."""

from __future__ import annotations

import math
import pathlib
import statistics
from typing import Optional

from .config import SWEEP, Study
from .results import memory_mb


_COLORS = {
    'scale': '#d62728', 'adamw': '#1f77b4', 'muon': '#2ca02c',
    'sgd_column_norm': '#ff7f0e', 'sgd': '#7f7f7f', 'sgd_momentum': '#bcbd22',
    'sgd_row_norm': '#9467bd', 'scale_row_norm': '#8c564b',
    'scale_first_last': '#e377c2', 'scale_sign': '#17becf',
    'adafactor': '#393b79', 'lion': '#637939', 'stable_spam': '#9edae5',
    'galore': '#8c6d31', 'fira': '#e7969c', 'swan': '#5254a3',
    'apollo': '#31a354', 'apollo_mini': '#756bb1',
}
_LABELS = {
    'scale': 'SCALE', 'adamw': 'AdamW', 'muon': 'Muon', 'sgd': 'SGD',
    'sgd_column_norm': 'SGD + column-norm', 'sgd_row_norm': 'SGD + row-norm',
    'scale_row_norm': 'SCALE, row-norm', 'sgd_momentum': 'SGD + momentum',
    'scale_first_last': 'SCALE + embedding momentum',
    'scale_sign': 'SCALE, sign', 'adafactor': 'Adafactor', 'lion': 'Lion',
    'stable_spam': 'Stable-SPAM', 'galore': 'GaLore', 'fira': 'Fira',
    'swan': 'SWAN', 'apollo': 'APOLLO', 'apollo_mini': 'APOLLO-Mini',
}


def _color(name: str) -> str:
  return _COLORS.get(name, 'black')


def label(name: str) -> str:
  """The optimizer's name as the paper writes it."""
  return _LABELS.get(name, name)


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


_NICE = [m * 10 ** e for e in range(-6, 6)
         for m in (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 7, 8)]


def _plain_log_ticks(ax, axes='xy', xticks=None) -> None:
  """Log-axis ticks at round values labeled as plain numbers (150, 0.003)
  instead of 1.5 x 10^2; ``xticks`` puts the x ticks at given values."""
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top
  for name in axes:
    axis = ax.xaxis if name == 'x' else ax.yaxis
    lo, hi = ax.get_xlim() if name == 'x' else ax.get_ylim()
    values = sorted(set(xticks)) if name == 'x' and xticks else [
        v for v in _NICE if lo <= v <= hi]
    step = max(1, len(values) // 8)
    axis.set_major_locator(ticker.FixedLocator(values[::step]))
    axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f'{v:g}'))
    axis.set_minor_locator(ticker.NullLocator())


def _save(fig, path: pathlib.Path) -> pathlib.Path:
  fig.tight_layout()
  tmp = path.with_suffix('.tmp.png')
  fig.savefig(tmp, dpi=130)
  tmp.replace(path)
  return path


def best_runs(rows, results):
  """{optimizer: [rows of its finished runs at its best LR]}, table order,
  in the last phase that has a best rate for it."""
  best = {r['optimizer']: (r.get('phase'), r['learning_rate'])
          for r in results if r['best_lr']}
  out = {}
  for name, (phase, lr) in best.items():
    runs = [r for r in rows if r['optimizer'] == name
            and r.get('phase') == phase
            and r['learning_rate'] == lr and r['status'] == 'done']
    if runs:
      out[name] = sorted(runs, key=lambda r: r['seed'])
  return out


def _eval_curve(row):
  return [(r['tokens'], r['loss']) for r in row['records']
          if r.get('kind') == 'eval' and math.isfinite(r.get('loss', math.nan))]


def plot_loss_curves(rows, results, info, path: pathlib.Path) -> pathlib.Path:
  """Eval loss against tokens, each optimizer at its best learning rate:
  mean over the seeds whose curves are kept, the band spans their min and
  max."""
  plt = _pyplot()
  best = best_runs(rows, results)
  finalists = {r['optimizer'] for r in results if r['finalist']}
  fig, axes = plt.subplots(1, 2, figsize=(13, 5))
  lows, finals = [], []  # Of the curves drawn: their lowest and last points.
  for name, runs in best.items():
    # Runs restored from an earlier report's tables have no curves
    # (page.restored_lines).
    runs = [r for r in runs if _eval_curve(r)]
    curves = [dict(_eval_curve(r)) for r in runs]
    tokens = sorted(set.intersection(*(set(c) for c in curves))) if curves \
        else []
    if not tokens:
      continue
    mean = [statistics.fmean(c[t] for c in curves) for t in tokens]
    lo = [min(c[t] for c in curves) for t in tokens]
    hi = [max(c[t] for c in curves) for t in tokens]
    lows.append(min(lo))
    finals.append(mean[-1])
    is_final = name in finalists
    text = (f'{label(name)} (lr {runs[0]["learning_rate"]:g}, '
            f'{len(runs)} seed{"s" if len(runs) > 1 else ""})')
    for ax in axes:
      ax.plot(tokens, mean, '-o' if is_final else '--o', color=_color(name),
              lw=2 if is_final else 1.2, ms=3, label=text)
      if len(runs) > 1:
        ax.fill_between(tokens, lo, hi, color=_color(name), alpha=0.2, lw=0)
  unigram = info.get('unigram_perplexity')
  for ax in axes:
    if unigram:
      ax.axhline(math.log(unigram), color='gray', ls=':', lw=1,
                 label='unigram baseline')
    ax.set_xlabel('training tokens')
    ax.set_ylabel('eval loss (nats / token)')
    ax.grid(alpha=0.3)
  axes[0].set_title('Eval loss, each optimizer at its best learning rate '
                    '(solid: finalists; band: min-max over seeds)', fontsize=9)
  half = info['tokens'] * 0.4
  axes[1].set_xlim(half, info['tokens'] * 1.02)
  if lows:
    top = sorted(finals)[min(len(finals) - 1, max(len(finals) // 2, 3))]
    axes[1].set_ylim(min(lows) - 0.05, top + 0.6)
  axes[1].set_title('Zoom: the last 60% of the tokens', fontsize=9)
  axes[0].legend(fontsize=7, loc='upper right')  # Empty there: curves fall.
  return _save(fig, path)


def plot_memory(results, info, path: pathlib.Path) -> pathlib.Path:
  """Final eval perplexity against weights + optimizer state (the paper's
  Figure 1): each optimizer at its best learning rate."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(8, 5.5))
  placed = []  # Labels of points at about the same memory alternate sides.
  for r in sorted(results, key=lambda r: r['eval_ppl_mean'] or 0):
    if not r['best_lr'] or r['eval_ppl_mean'] is None:
      continue
    x = memory_mb(r)
    left = sum(abs(math.log(x / px)) < 0.05 for px in placed) % 2 == 1
    placed.append(x)
    ax.errorbar([x], [r['eval_ppl_mean']], yerr=[[r['eval_ppl_std'] or 0],
                                                 [r['eval_ppl_std'] or 0]],
                fmt='o', color=_color(r['optimizer']), ms=8, capsize=3)
    ax.annotate(f'{label(r["optimizer"])}\nstate '
                f'{r["opt_state_bytes"] / 1e6:.2f} MB',
                (x, r['eval_ppl_mean']), textcoords='offset points',
                xytext=(-7, 4) if left else (7, 4),
                ha='right' if left else 'left', fontsize=8)
  ax.set_xscale('log')
  ax.set_xlabel(f'weights + optimizer state (MB, {info["dtype"]}; log scale)')
  ax.set_ylabel('final eval perplexity (best learning rate)')
  ax.set_title(f'Perplexity vs memory: {info["params"] / 1e6:.1f}M-param '
               f'LLaMA, {info["tokens"] / 1e3:,.0f}K tokens per run\n'
               f'(error bars: std over seeds where several)', fontsize=10)
  ax.grid(alpha=0.3, which='both')
  ax.margins(x=0.25, y=0.15)
  ppls = [r['eval_ppl_mean'] for r in results
          if r['best_lr'] and r['eval_ppl_mean'] is not None]
  if ppls and max(ppls) > 3 * min(ppls):  # E.g. plain SGD far behind.
    ax.set_yscale('log')
    ax.set_ylabel('final eval perplexity (best learning rate; log scale)')
  _plain_log_ticks(ax, 'xy' if ax.get_yscale() == 'log' else 'x')
  return _save(fig, path)


_FIGURE_5 = ('scale', 'adamw', 'stable_spam')


def plot_lr_sensitivity(rows, final_results, sweep_results,
                        path: pathlib.Path) -> pathlib.Path:
  """Final eval perplexity against the learning rate (the paper's Figure 5):
  SCALE, AdamW and Stable-SPAM on the left (``final_results``: the final
  phase), every optimizer's sweep on the right. Crosses at the top mark
  diverged runs."""
  plt = _pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(13, 5))
  names = list(dict.fromkeys(r['optimizer'] for r in sweep_results))
  finite = [r['eval_ppl_mean'] for r in final_results + sweep_results
            if r['eval_ppl_mean']]
  ceiling = max(finite) * 1.5 if finite else 1.0
  for ax, subset in ((axes[0], [n for n in names if n in _FIGURE_5]),
                     (axes[1], names)):
    results = sweep_results if ax is axes[1] else final_results
    for name in subset:
      pts = [(r['learning_rate'], r['eval_ppl_mean']) for r in results
             if r['optimizer'] == name and r['eval_ppl_mean'] is not None]
      bad = [r['learning_rate'] for r in results
             if r['optimizer'] == name and r['n_diverged'] and not r['n_runs']]
      if pts:
        ax.plot(*zip(*pts), '-o', color=_color(name), label=label(name),
                lw=2 if ax is axes[0] else 1.2, ms=5)
      if bad:
        ax.plot(bad, [ceiling] * len(bad), 'x', color=_color(name), ms=9,
                mew=2)
      if ax is axes[0]:
        seeds = [(r['learning_rate'], r['eval_perplexity']) for r in rows
                 if r['optimizer'] == name and r['status'] == 'done']
        if seeds:
          ax.plot(*zip(*seeds), '.', color=_color(name), alpha=0.5)
    ax.set_xscale('log')
    ax.set_yscale('log')
    rates = [r['learning_rate'] for r in results if r['optimizer'] in subset]
    if ax is axes[1]:  # Many optimizers' rates: decades only.
      rates = [10.0 ** e for e in range(-8, 4)
               if min(rates) / 1.01 <= 10.0 ** e <= max(rates) * 1.01]
    _plain_log_ticks(ax, xticks=rates)
    ax.set_xlabel('peak learning rate (log scale)')
    ax.set_ylabel('final eval perplexity (log scale)')
    ax.grid(alpha=0.3, which='both')
    if ax.get_legend_handles_labels()[0]:  # Nothing finished: no legend.
      ax.legend(fontsize=8)
  axes[0].set_title('Learning-rate sensitivity: SCALE, AdamW, Stable-SPAM\n'
                    '(line: mean over seeds; dots: single runs; x: '
                    'diverged)', fontsize=9)
  axes[1].set_title('Every optimizer\'s sweep (short runs; learning rates '
                    'are not comparable across optimizers)', fontsize=9)
  return _save(fig, path)


def plot_gradient_variance(study, rows, results, path: pathlib.Path
                           ) -> Optional[pathlib.Path]:
  """Per-layer stochastic-gradient variance along training (the paper's
  Figure 4), from the 'diagnostics' records of each diagnosed optimizer's
  best-LR run (first seed)."""
  from ..diagnostics import group_order  # pylint: disable=g-import-not-at-top
  plt = _pyplot()
  best = best_runs(rows, results)
  panels = []
  for name in study.diagnostics_optimizers:
    run = best.get(name, [None])[0]
    recs = [r for r in run['records'] if r.get('kind') == 'diagnostics'] \
        if run else []
    if recs:
      panels.append((name, run, recs))
  if not panels:
    return None
  fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5),
                           sharey=True, squeeze=False)
  cmap = plt.get_cmap('viridis')
  for ax, (name, run, recs) in zip(axes[0], panels):
    groups = group_order(k.split('/', 1)[1] for k in recs[0]
                         if k.startswith('grad_var/'))
    groups = [g for g in groups if g != 'final_norm']
    layers = [g for g in groups if g.startswith('layer_')]
    for g in groups:
      if g == 'lm_head':
        style = dict(color='#d62728', lw=2.5, label='LM head')
      elif g == 'embed':
        style = dict(color='#ff7f0e', lw=2.5, label='embedding')
      else:
        i = layers.index(g)
        style = dict(color=cmap(0.15 + 0.7 * i / max(len(layers) - 1, 1)),
                     lw=1.3, label=f'layer {g[6:]}')
      ax.plot([r['step'] for r in recs], [r[f'grad_var/{g}'] for r in recs],
              **style)
    ax.set_yscale('log')
    ax.set_xlabel('step')
    ax.set_title(f'{label(name)} (lr {run["learning_rate"]:g}, seed '
                 f'{run["seed"]})', fontsize=10)
    ax.grid(alpha=0.3, which='both')
  axes[0][0].set_ylabel('per-sequence gradient variance\n(mean over the '
                        'group\'s elements)')
  axes[0][-1].legend(fontsize=8)
  return _save(fig, path)


def plot_all(study: Study, rows, results, info, docs: pathlib.Path
             ) -> dict[str, pathlib.Path]:
  """Writes every plot that has data; returns ``{name: path}``. The plots
  show the final phase's runs (the sweep's too for the learning rates)."""
  final = [r for r in results if r['phase'] == study.final_phase]
  rows = [r for r in rows if r['phase'] == study.final_phase]
  sweep = [r for r in results if r['phase'] == SWEEP]
  paths = {
      'loss_vs_tokens': plot_loss_curves(rows, final, info,
                                         docs / 'loss_vs_tokens.png'),
      'ppl_vs_memory': plot_memory(final, info, docs / 'ppl_vs_memory.png'),
      'lr_sensitivity': plot_lr_sensitivity(rows, final, sweep,
                                            docs / 'lr_sensitivity.png'),
  }
  results = final
  variance = plot_gradient_variance(study, rows, results,
                                    docs / 'grad_variance.png')
  if variance:
    paths['grad_variance'] = variance
  _pyplot().close('all')
  return paths
