"""Where Slurm jobs submitted by earlier versions find what they run: submitit pickles ``cell_job`` by its qualified
name, ``ccar.slurm.cell_job``. The launcher itself is :mod:`ccar.sweep.slurm`."""

from .sweep.slurm import *  # noqa: F401,F403
from .sweep.slurm import SlurmError, SlurmOptions, cell_job, check_cluster, parse_sbatch  # noqa: F401
