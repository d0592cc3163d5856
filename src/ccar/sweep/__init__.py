"""``ccar sweep``: a grid of runs (methods x grid values x seeds), resumable, with an honest report.

A sweep file (YAML)::

    out: runs/sweep-fmnist          # sweep folder: results.jsonl, report.md, figures
    runs: runs/sweep-fmnist/runs    # one folder per run (default: <out>/runs); keep it out of git
    jobs: 1                         # runs at once (CPU threads are split between them; each its own GPU)
    gpus_per_run: 1                 # GPUs each of those runs sees (worker i: the i-th group of visible GPUs)
    pack: auto                      # cells trained as one program (ccar.sweep.packing): auto (up to 16 on a GPU,
                                    # off on the CPU), off, or a number of cells
    base: {dataset: fashion-mnist-lt, epochs: 8}     # overrides shared by every run
    seeds: [0, 1, 2]
    grid: {imbalance: [100, 50, 10]}                 # cartesian product over these keys (a mapping value sets
                                                     # several keys together: synthetic: [{num_classes: 100, dim: 8}];
                                                     # `setting: [{name: A, dataset: csv, ...}]`: named settings)
    methods:                                          # name -> overrides
      CE: {loss.name: ce}
      CCAR-LA: {loss.name: ccar, loss.base: la}
      CE+cRT: {loss.name: ce, stage2: {method: crt, epochs: 10}}   # two stages as one cell (`ccar retrain`)
      LA: {loss.name: la, tune: {loss.tau: [0.5, 1.0, 1.5]}}       # a knob chosen on validation (below)
    studies:                                          # extra grids for some methods (e.g. an omega sweep)
      - {methods: [CCAR-LA], grid: {loss.omega: [0.5, 0.9], imbalance: [100]}}
    report: {per_class: [CE, CCAR-LA], knobs: {loss.omega: 0.75}, baselines: {CCAR-LA: LA}, last_epoch: true}

Tuning: a method's ``tune`` (a mapping of key -> candidate values, crossed, or a list of override mappings) is
tried on the first seed only; the candidate with the best balanced accuracy on that seed's validation split is then
run on the other seeds (:func:`chosen_candidate`, the test split plays no part). Give every method a grid of the
same size for an equal tuning budget. Rows record the candidate in ``tuned``.

Each finished run appends one line to ``results.jsonl`` (written by this process only, so concurrent runs never
mix); an interrupted sweep skips finished cells and resumes a half-finished run from its checkpoint.
"""

from .cell import run_cell
from .driver import run_sweep
from .local import visible_gpus, worker_gpus, _init_worker  # noqa: F401
from .results import read_results
from .spec import Cell, expand, grid_overrides, load_sweep, training_identity

_run_cell = run_cell  # (its former name)

__all__ = ["Cell", "expand", "grid_overrides", "load_sweep", "read_results", "run_cell", "run_sweep",
           "training_identity", "visible_gpus", "worker_gpus"]
