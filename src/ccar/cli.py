"""The ``ccar`` command: ``train``, ``eval``, ``retrain``, ``predict``, ``download``, ``sweep``, ``tune``.

User errors print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from .errors import CCARError, ConfigError

EPILOG = """examples:
  ccar train                                   # the default job: CCAR over LA on Fashion-MNIST-LT (IF 100)
  ccar train loss.name=ce epochs=30 out=runs/ce
  ccar train --config configs/cifar100-lt.yaml data_root=~/data loss.base=ldam loss.drw_epoch=160
  ccar train out=runs/ce --resume              # continue an interrupted run
  ccar eval runs/ce posthoc_tau=1.0            # re-evaluate on the test set, with post-hoc logit adjustment
  ccar retrain runs/ce method=crt               # two-stage decoupling: re-train the classifier (crt, lws, ft, las, ncm; router for RIDE)
  ccar eval runs/ce tau_norm=auto              # tau-normalised classifier, tau chosen on the validation split
  ccar sweep configs/sweeps/fashion-mnist-lt.yaml
  ccar tune dataset=folder data_root=~/photos budget=15m     # which method for my data? (pip install 'ccar[tune]')
  ccar train dataset=folder data_root=~/photos image_size=64   # your own class folders
  ccar predict runs/photos new/*.jpg --top-k 3 --out predictions.csv
  ccar download cifar100 --root data/cifar100
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ccar", description="Long-tailed classification with CCAR.", epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train one run (default: the built-in Fashion-MNIST-LT job)")
    t.add_argument("--config", help="YAML recipe (see configs/)")
    t.add_argument("--resume", action="store_true", help="continue the run in `out` from its checkpoint")
    t.add_argument("overrides", nargs="*", metavar="key=value")
    e = sub.add_parser("eval", help="evaluate a finished run's model on the test set")
    e.add_argument("run_dir")
    e.add_argument("--which", choices=("best", "last"), default="best", help="best-on-validation (default) or last epoch")
    e.add_argument("overrides", nargs="*", metavar="key=value")
    r = sub.add_parser("retrain", help="re-train a finished run's classifier (cRT, LWS or fine-tuning) as a new run")
    r.add_argument("run_dir")
    r.add_argument("--resume", action="store_true", help="continue an interrupted re-training run")
    r.add_argument("overrides", nargs="*", metavar="key=value", help="method=crt|lws|ft|las|ncm|router (required), epochs=10, ...")
    pr = sub.add_parser("predict", help="apply a finished run's model to images, a folder, a CSV or a feature file")
    pr.add_argument("run_dir")
    pr.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders, .csv files, or feature files; "
                    "key=value items (posthoc_tau=1, tau_norm=auto, device=cpu) override the run's settings")
    pr.add_argument("--which", choices=("best", "last"), default="best")
    pr.add_argument("--top-k", type=int, default=5, dest="top_k")
    pr.add_argument("--out", help="output file: .csv (default format) or .jsonl; default: print CSV")
    d = sub.add_parser("download", help="download and verify a dataset (checksums) into a folder")
    d.add_argument("name", choices=("cifar10", "cifar100", "mnist", "fashion-mnist"))
    d.add_argument("--root", help="target folder (default: ~/.cache/ccar/NAME)")
    s = sub.add_parser("sweep", help="run a grid of runs and write a report with mean ± std over seeds")
    s.add_argument("sweep_file")
    s.add_argument("--out", help="sweep folder (default: the file's `out`)")
    s.add_argument("--jobs", type=int, default=None, help="runs at once (default: the file's `jobs`, else 1)")
    s.add_argument("--report-only", action="store_true", help="rebuild the report from results.jsonl")
    s.add_argument("--launcher", choices=("local", "slurm"), default="local",
                   help="local: a pool of --jobs processes here (default); slurm: one Slurm job per cell (submitit)")
    g = s.add_argument_group("slurm launcher (--launcher slurm; with it, --jobs caps the cells queued at once)")
    g.add_argument("--partition", help="Slurm partition (default: the cluster's default partition)")
    g.add_argument("--time", type=int, default=None, metavar="MIN",
                   help="time limit per job in minutes (default 60, or the partition's limit if lower)")
    g.add_argument("--cpus-per-run", type=int, default=None, metavar="N",
                   help="CPUs per job (default 4, or the CPUs of the partition's largest node if fewer)")
    g.add_argument("--gpus-per-run", type=int, default=None, metavar="K",
                   help="GPUs per job; K > 1 runs torchrun with K processes in it (default: the file's gpus_per_run)")
    g.add_argument("--mem", help="memory per job, as sbatch takes it (e.g. 32G; default: the partition's); a request "
                                 "that no node of the partition can hold is refused before anything is submitted")
    g.add_argument("--max-retries", type=int, default=None, metavar="N",
                   help="re-submissions of a cell whose job ended without its result (default 3)")
    g.add_argument("--poll", type=float, default=None, metavar="SEC", help="seconds between looks at the queue (10)")
    g.add_argument("--sbatch", action="append", default=[], metavar="NAME=VALUE",
                   help="any other sbatch option, repeatable: --sbatch account=abc --sbatch qos=high")
    tu = sub.add_parser("tune", help="choose the best method and knobs for your data within a time budget "
                                     "(validation only; the winner's test split scored once)")
    tu.add_argument("--config", help="YAML recipe (see configs/): the run settings every trial starts from")
    tu.add_argument("overrides", nargs="*", metavar="key=value",
                    help="ccar train's keys, and budget=15m (s/m/h), objective=balanced|worst-class|tail|forward-F|"
                         "backward-F|[w1,w2,...], candidates=CE,LA,cRT (or a sweep file), seeds=3, top=2, trials=N, "
                         "pruner=hyperband|halving|none, out=DIR")
    return p


def _cmd_tune(args) -> int:
    from .engine.distributed import shutdown
    from .tune import run_tune

    try:
        run_tune(args.config, args.overrides)
    finally:
        shutdown()
    return 0


def _cmd_train(args) -> int:
    from .config import load_config
    from .engine.train import train

    from .engine.distributed import shutdown

    cfg = load_config(args.config, args.overrides)
    try:
        train(cfg, resume=args.resume)
    finally:
        shutdown()
    return 0


def _cmd_retrain(args) -> int:
    from .engine.distributed import shutdown
    from .engine.retrain import retrain

    try:
        retrain(Path(args.run_dir), args.overrides, resume=args.resume)
    finally:
        shutdown()
    return 0


def _cmd_predict(args) -> int:
    from .engine.predict import predict_run, write_predictions

    overrides = [i for i in args.inputs if "=" in i and not Path(i).exists()]
    inputs = [i for i in args.inputs if i not in overrides]
    if not inputs:
        raise ConfigError("ccar predict needs at least one INPUT (image, folder, .csv or feature file)")
    names, probs, classes = predict_run(Path(args.run_dir), inputs, args.which, overrides, args.top_k,
                                        log=lambda msg: print(msg, file=sys.stderr))
    path = write_predictions(names, probs, classes, args.top_k, args.out)
    if path:
        print(f"{len(names)} predictions written to {path}", file=sys.stderr)
    return 0


def _cmd_download(args) -> int:
    from .data import download_cifar, download_idx

    root = Path(args.root).expanduser() if args.root else None
    where = download_cifar(args.name, root) if args.name.startswith("cifar") else download_idx(args.name, root)
    dataset = {"cifar10": "cifar10-lt", "cifar100": "cifar100-lt", "mnist": "mnist-lt"}.get(args.name, "fashion-mnist-lt")
    print(f"{args.name}: verified files in {where}; train with: ccar train dataset={dataset} data_root={where}")
    return 0


def _cmd_eval(args) -> int:
    from .engine.evaluate_run import evaluate_run

    result = evaluate_run(Path(args.run_dir), args.which, args.overrides)
    print(result["table"])
    print(f"written: {result['path']}")
    return 0


def _cmd_sweep(args) -> int:
    from .sweep import run_sweep

    slurm_args = {"partition": args.partition, "time": args.time, "cpus_per_run": args.cpus_per_run,
                  "gpus_per_run": args.gpus_per_run, "mem": args.mem, "max_retries": args.max_retries, "poll": args.poll}
    given = {k: v for k, v in slurm_args.items() if v is not None}
    slurm = None
    if args.launcher == "slurm":
        from .sweep.slurm import SlurmOptions, parse_sbatch

        slurm = SlurmOptions(**given, sbatch=parse_sbatch(args.sbatch))
    elif given or args.sbatch:
        flag = "--" + (next(iter(given)) if given else "sbatch").replace("_", "-")
        raise ConfigError(f"{flag} is an option of the Slurm launcher: add --launcher slurm")
    run_sweep(args.sweep_file, out=args.out, jobs=args.jobs, report_only=args.report_only, launcher=args.launcher,
              slurm=slurm)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # `ccar predict RUN a.png --out f.csv b.png k=v`: inputs may come after the options
        if args.command != "predict" or any(e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.inputs += extra
    handler = {"train": _cmd_train, "eval": _cmd_eval, "retrain": _cmd_retrain, "predict": _cmd_predict,
               "download": _cmd_download, "sweep": _cmd_sweep, "tune": _cmd_tune}[args.command]
    try:
        return handler(args)
    except CCARError as exc:
        code = getattr(exc, "exit_code", None)  # Preempted (SIGTERM / SIGUSR1): 128 + the signal, checkpoint written
        print(f"ccar {args.command}: {'' if code else 'error: '}{exc}", file=sys.stderr)
        return code or 2
    except KeyboardInterrupt:
        print(f"ccar {args.command}: interrupted; the last checkpoint is kept (continue with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
