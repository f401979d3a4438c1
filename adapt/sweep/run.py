"""Running a sweep: skip what is done (by config hash), run the rest with an executor, write the reports.

Each finished or failed cell leaves out/cells/<config hash>.json (written atomically), so a cut sweep resumes
without redoing work under either executor, and a failed cell is retried by the next call.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from adapt.sweep.cell import run_cell
from adapt.sweep.grid import Cell, SweepConfig, check_inputs, plan
from adapt.sweep.ray_executor import run_ray
from adapt.sweep.records import failed_row, read_row, write_row
from adapt.sweep.report import write_reports


def run_sweep(config: SweepConfig, *, log=print) -> list[dict]:
    """Run every unfinished cell of `config`'s grid; returns all rows (finished before or now) in plan order."""
    config = _absolute(config)
    check_inputs(config)
    cells = plan(config)
    todo = [cell for cell in cells if _status(config, cell) != "ok"]
    log(f"sweep: {len(cells)} cells, {len(cells) - len(todo)} already done, {len(todo)} to run "
        f"({config.executor} executor)")
    if todo:
        if config.executor == "ray":
            run_ray(todo, config, log=log)
        else:
            run_local(todo, config, log=log)
    rows = [row for cell in cells if (row := read_row(config, cell)) is not None]
    write_reports(rows, config.out)
    return rows


def run_local(cells: list[Cell], config: SweepConfig, *, log=print) -> None:
    """In-process, one cell after another; a failing cell is retried, then recorded, and the sweep goes on."""
    for cell in cells:
        attempt_cell(cell, config, attempts=1 + config.retries, log=log)


def attempt_cell(cell: Cell, config: SweepConfig, *, attempts: int = 1, log=print) -> dict:
    """Run a cell up to `attempts` times; its row (ok or failed) is written either way."""
    for attempt in range(1, attempts + 1):
        try:
            row = run_cell(cell, config)
        except Exception as error:  # recorded with its one-line message; the sweep goes on
            row = failed_row(cell, config, error)
            log(f"  {cell.name()}: failed (attempt {attempt} of {attempts}): {row['error']}")
        else:
            log(f"  {cell.name()}: AP {row['AP']:.1f}, retention {row['retention_pct']} % ({row['seconds']:.0f} s)")
            break
    write_row(config, cell, row)
    return row


def _status(config: SweepConfig, cell: Cell) -> str | None:
    row = read_row(config, cell)
    return row and row.get("status")


def _absolute(config: SweepConfig) -> SweepConfig:
    """Paths made absolute: Ray runs each trial in its own working directory."""
    tasks = tuple(str(Path(t).resolve()) if os.path.exists(t) else t for t in config.task)
    bases = tuple(str(Path(b).resolve()) if os.path.exists(b) else b for b in config.base)
    return dataclasses.replace(config, out=config.out.resolve(), task=tasks, base=bases,
                               data_root=config.data_root and Path(config.data_root).resolve())
