"""The Ray executor: one Ray Tune trial per cell, with the resources of --trial-resources, on a local Ray
instance or the cluster at --address."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from adapt.sweep.cell import run_cell
from adapt.sweep.grid import Cell, SweepConfig
from adapt.sweep.records import failed_row, write_row

RAY_EXTRA = 'pip install "glip-adapt[sweep]"'


def run_ray(cells: list[Cell], config: SweepConfig, *, log=print) -> None:
    try:
        import ray
        from ray import tune
    except ImportError:
        raise ValueError(f"--executor ray needs Ray Tune, which is not installed; {RAY_EXTRA}") from None
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=config.address, include_dashboard=False, log_to_driver=False)
    try:
        check_resources(config.resources(), ray.cluster_resources(), config.trial_resources)
        trainable = tune.with_resources(_trial, {k.lower(): v for k, v in config.resources().items()})
        tuner = tune.Tuner(
            trainable,
            param_space={"cell": tune.grid_search([dataclasses.asdict(c) for c in cells]),
                         "sweep": config.to_dict()},
            # Every trial asks the same resources, so one worker process serves trial after trial and pays the
            # import of torch and the model code once, not per cell.
            tune_config=tune.TuneConfig(reuse_actors=True),
            run_config=tune.RunConfig(name="trials", storage_path=str(config.out / "ray"), verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=config.retries)),
        )
        grid = tuner.fit()
        failed = sum(result.error is not None for result in grid)
        log(f"ray: {len(cells)} trials, {failed} failed")
    finally:
        if started_here:
            ray.shutdown()


def check_resources(wanted: dict[str, float], cluster: dict[str, float], spelled: str) -> None:
    """Refuse, in one line, a trial the cluster could never place."""
    for key, amount in wanted.items():
        if amount > cluster.get(key, 0.0):
            raise ValueError(f"--trial-resources {spelled!r} asks {amount:g} {key} per trial, but the Ray cluster has "
                             f"{cluster.get(key, 0.0):g}; ask for less")


def _trial(params: dict) -> dict:
    """A Ray Tune trial: run the cell, record its row; raise on failure so FailureConfig retries it."""
    fields = {f.name for f in dataclasses.fields(SweepConfig)}
    values = {k: v for k, v in params["sweep"].items() if k in fields}
    for key in ("out", "data_root"):
        values[key] = Path(values[key]) if values.get(key) else values.get(key)
    config = SweepConfig(**values)
    cell = Cell(**params["cell"])
    try:
        row = run_cell(cell, config)
    except Exception as error:
        write_row(config, cell, failed_row(cell, config, error))
        raise
    write_row(config, cell, row)
    return {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
