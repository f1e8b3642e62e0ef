"""`xdsl sweep`: a grid of `--set` configurations x seeds, each an `xdsl run` in its own run directory.

    grid.py       --grid KEY=v1,v2 / --grid-file -> configurations, checked like `--set` before anything runs
    launch.py     where the runs execute: local processes (--jobs N) or submitit (SLURM, or its local executor)
    aggregate.py  results.json of every run -> sweep.csv, sweep.json and the printed table (mean +/- std)
    driver.py     the sweep directory: which runs are finished (skipped on --resume), launching, aggregating
"""

from xdsl.sweep.driver import SweepOptions, sweep

__all__ = ["SweepOptions", "sweep"]
