"""`adapt sweep`: a grid of tasks x bases x strategies x shots x seeds, each cell one adaptation run scored on its
task and on the base's own vocabulary (retention), run in-process or as Ray Tune trials, resumable by config hash.

    from adapt.sweep import SweepConfig, run_sweep
    rows = run_sweep(SweepConfig(task=("icons-aquarium",), shots=("0", "10"), out="runs/sweep"))
"""
from adapt.sweep.grid import Cell, SweepConfig, plan
from adapt.sweep.run import run_sweep

__all__ = ["Cell", "SweepConfig", "plan", "run_sweep"]
