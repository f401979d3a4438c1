"""A sweep's per-cell records: out/cells/<config hash>.json, one per finished or failed cell, written atomically."""
from __future__ import annotations

import json
from pathlib import Path

from adapt.sweep.cell import ROW_FIELDS
from adapt.sweep.grid import Cell, SweepConfig
from glip_io import atomic_write


def failed_row(cell: Cell, config: SweepConfig, error: BaseException) -> dict:
    message = " ".join(str(error).split()) or type(error).__name__
    return {**cell.identity(config), "status": "failed", "error": f"{type(error).__name__}: {message}"}


def cell_path(config: SweepConfig, cell: Cell) -> Path:
    return config.out / "cells" / f"{cell.config_hash(config)}.json"


def write_row(config: SweepConfig, cell: Cell, row: dict) -> None:
    atomic_write(cell_path(config, cell), json.dumps({k: row.get(k) for k in ROW_FIELDS}, indent=1).encode())


def read_row(config: SweepConfig, cell: Cell) -> dict | None:
    path = cell_path(config, cell)
    return json.loads(path.read_text()) if path.exists() else None
