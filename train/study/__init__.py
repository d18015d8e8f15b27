"""``python -m train.study``: the paper's comparison at small scale.

A study is a grid of trainer runs described by a YAML file
(``configs/study.yaml``)::

  output_dir: runs/study     # <phase>/<optimizer>/lr_<lr>/seed_<s>/ per run
  docs_dir: docs             # results.md, CSVs, plots
  base: {model: ..., data: ..., optimizer: ..., train: ..., rivals: ...}
  overrides:                 # per optimizer, merged over `base`
    scale: {optimizer: {vector_learning_rate: 2.0e-2}}
  optimizers:                # name: the learning rates of its sweep
    adamw: [1.0e-3, 3.0e-3, 1.0e-2]
    scale: [1.0e-3, 3.0e-3, 1.0e-2]
  seeds: [0]                 # seeds of the sweep and the long runs
  sweep: {steps: 500}        # train keys of the short runs (default: base's)
  long: {steps: 4000, neighbours: 1}  # optional: the long runs
  finalists:                 # re-run with more seeds at their best rate
    always: [scale, adamw]   # these ...
    top: 2                   # ... and the best 2 others (lowest eval loss)
    seeds: [1]               # with these extra seeds
  diagnostics:               # the gradient-variance diagnostic (Figure 4)
    optimizers: [sgd_column_norm]
    every: 10
    microbatches: 4
  prune_checkpoints: true    # delete a run's checkpoints once it finished

The sweep runs every optimizer at every rate of its grid (short runs); with
``long``, each optimizer's best sweep rate (lowest mean final eval loss over
the seeds) and its ``neighbours`` grid neighbours on each side then run long,
and while the best long rate is the lowest (highest) of them, the next grid
rate below (above) runs long too (``results.long_specs``);
the finalists (chosen on the last phase) get their extra seeds at their best
rate of that phase. Runs go in sequence (default) or in ``--jobs N``
processes. A run whose ``summary.json`` exists and whose ``config.yaml``
equals the run's config is finished and skipped; a diverged run
(``failed.json``) is skipped too; a half-finished run resumes from its
checkpoint; a run whose config changed starts again. A finished run's
``config.yaml``, ``summary.json`` (or ``failed.json``) and ``metrics.jsonl``
are also kept in ``<docs_dir>/ledger/`` (in git for the default study), so a
fresh clone on another machine resumes the study too, less the runs that
were part way; ``--hours H`` starts only the runs expected to end in time.
The report is written from whatever runs are finished (``--report-only``
rewrites it), and ``--estimate`` times each optimizer's steps and prints the
study's total CPU time (kept in the ledger as ``estimate.json``, beside the
data set's counts, ``study.json``). Modules: ``config`` (the
YAML and each run's trainer config), ``runner`` (run state on disk,
running), ``ledger`` (the kept copies), ``results`` (rows, best rates,
phases), ``report`` and ``plots`` (tables, figures), ``page``
(``results.md`` beside the paper's numbers), ``estimate``, ``run`` (the
whole study), ``cli``.
"""

from .cli import main
from .config import Study, StudyConfigError, load_study, parse_study
from .estimate import estimate_study
from .report import write_report
from .run import run_study

__all__ = ['Study', 'StudyConfigError', 'estimate_study', 'load_study',
           'main', 'parse_study', 'run_study', 'write_report']
