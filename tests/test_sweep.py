"""`adapt sweep`: the grid, resume by config hash, failures recorded, and the same cells giving the same AP
in-process and as Ray Tune trials on a local 2-CPU cluster."""
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from adapt.sweep import SweepConfig, plan, run_sweep
from adapt.sweep.grid import parse_shots

TASK = "icons-aquarium"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """glip-nano's real vocabulary on a few images: a small icon task and a small held-in retention set."""
    from tasks.icons.suite import HELDIN, generate_icon_task, task_dir

    root = tmp_path_factory.mktemp("sweep-data")
    generate_icon_task(TASK, task_dir(root, TASK), sizes={"train": 12, "valid": 2, "test": 4})
    generate_icon_task(HELDIN, task_dir(root, HELDIN), sizes={"valid": 2, "test": 3})
    return root


def small(data_root, out, **changes):
    options = dict(task=(TASK,), base=("glip-nano",), strategies=("prompt-tune", "linear-probe"), shots=("0", "1"),
                   seeds=(0,), steps="2", eval_limit=4, retention_limit=3, out=out, data_root=data_root)
    options.update(changes)
    return SweepConfig(**options)


def cell_times(out: Path) -> dict[str, float]:
    return {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")}


def test_grid_and_bad_input_are_refused_before_any_run(data_root, tmp_path):
    config = small(data_root, tmp_path, strategies=("prompt-tune", "lora"), shots=("0", "1", "full"), seeds=(0, 1))
    cells = plan(config)
    assert len(cells) == 1 + 2 * 2 * 2  # one zero-shot reference + strategies x tuned shots x seeds
    assert len({c.config_hash(config) for c in cells}) == len(cells)
    assert parse_shots("full") is None and parse_shots("0") == 0
    with pytest.raises(ValueError, match="neither an integer nor 'full'"):
        small(data_root, tmp_path, shots=("ten",))
    with pytest.raises(ValueError, match="did you mean 'prompt-tune'"):
        small(data_root, tmp_path, strategies=("prompt-tuning",))
    with pytest.raises(ValueError, match="unknown base"):
        run_sweep(small(data_root, tmp_path, base=("glip-nanoo",)), log=lambda *_: None)
    with pytest.raises(KeyError):
        run_sweep(small(data_root, tmp_path, task=("icons-aquarim",)), log=lambda *_: None)
    assert not (tmp_path / "cells").exists()  # nothing ran


def test_local_sweep_writes_reports_measures_retention_and_resumes(data_root, tmp_path):
    out = tmp_path / "sweep"
    rows = run_sweep(small(data_root, out), log=lambda *_: None)
    assert [r["strategy"] for r in rows] == ["zero-shot", "prompt-tune", "linear-probe"]
    assert all(r["status"] == "ok" for r in rows)
    zero, prompt, probe = rows
    assert zero["AP"] > 0 and zero["retention_AP"] > 0 and zero["retention_pct"] == 100.0
    # A prompt adapter changes no weight of the base: its retention is the base's, measured, not assumed.
    assert prompt["retention_AP"] == zero["retention_AP"]
    assert probe["trainable_parameters"] > prompt["trainable_parameters"] > 0
    with (out / "results.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert [r["strategy"] for r in table] == ["zero-shot", "prompt-tune", "linear-probe"]
    assert "retention %" in (out / "table.md").read_text()
    assert (out / "curves.png").stat().st_size > 0 and (out / "retention.png").stat().st_size > 0
    assert len(list((out / "adapters").glob("*.safetensors"))) == 2

    before = cell_times(out)
    ran = []
    run_sweep(small(data_root, out), log=ran.append)
    assert "0 to run" in ran[0] and cell_times(out) == before  # a second identical call runs nothing


def test_failing_cell_is_recorded_and_retried_by_the_next_call(data_root, tmp_path, monkeypatch):
    from adapt.sweep import run as sweep_run

    real = sweep_run.run_cell

    def flaky(cell, config):
        if cell.strategy == "linear-probe":
            raise RuntimeError("disk on fire")
        return real(cell, config)

    monkeypatch.setattr(sweep_run, "run_cell", flaky)
    rows = run_sweep(small(data_root, tmp_path, retries=0), log=lambda *_: None)
    failed = [r for r in rows if r["status"] == "failed"]
    assert [r["strategy"] for r in failed] == ["linear-probe"] and failed[0]["error"] == "RuntimeError: disk on fire"
    assert sum(r["status"] == "ok" for r in rows) == 2  # the sweep went on past the failure
    monkeypatch.setattr(sweep_run, "run_cell", real)
    before = cell_times(tmp_path)
    rows = run_sweep(small(data_root, tmp_path, retries=0), log=lambda *_: None)
    assert all(r["status"] == "ok" for r in rows)
    changed = {name for name, t in cell_times(tmp_path).items() if before.get(name) != t}
    assert len(changed) == 1  # only the failed cell ran again


@pytest.mark.slow
def test_killed_sweep_resumes_without_redoing_finished_cells(data_root, tmp_path):
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "adapt.cli", "sweep", "--task", TASK, "--strategies", "prompt-tune,linear-probe",
               "--shots", "0,1", "--steps", "2", "--eval-limit", "4", "--retention-limit", "3", "--out", str(out)]
    env = {**os.environ, "ADAPT_DATA": str(data_root), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(cell_times(out) if (out / "cells").exists() else {}) < 1:
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    first = cell_times(out)
    assert 1 <= len(first) < 3, "the sweep was not cut midway"
    subprocess.run(command, env=env, check=True, capture_output=True, timeout=600)
    after = cell_times(out)
    assert len(after) == 3 and all(after[name] == t for name, t in first.items())


@pytest.mark.slow
def test_ray_executor_matches_local_runs_and_skips_finished_cells(data_root, tmp_path):
    import ray

    local = run_sweep(small(data_root, tmp_path / "local"), log=lambda *_: None)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        config = small(data_root, tmp_path / "ray", executor="ray", trial_resources="cpu=1")
        remote = run_sweep(config, log=lambda *_: None)
        key = lambda r: (r["strategy"], r["shots"], r["seed"])  # noqa: E731
        assert {key(r): (r["AP"], r["AP50"], r["retention_AP"]) for r in remote} == \
               {key(r): (r["AP"], r["AP50"], r["retention_AP"]) for r in local}
        assert {r["config_hash"] for r in remote} == {r["config_hash"] for r in local}
        before = cell_times(tmp_path / "ray")
        lines = []
        run_sweep(config, log=lines.append)
        assert "0 to run" in lines[0] and cell_times(tmp_path / "ray") == before
        with pytest.raises(ValueError, match="asks 3 CPU per trial, but the Ray cluster has 2"):
            run_sweep(small(data_root, tmp_path / "big", executor="ray", trial_resources="cpu=3"),
                      log=lambda *_: None)
    finally:
        ray.shutdown()


def test_a_dataset_folder_is_a_task_and_scores_as_the_registered_task(data_root, tmp_path):
    """A user's export folder sweeps like a registered task: the same images give the same AP either way."""
    import shutil

    from tasks.icons.suite import task_dir

    folder = tmp_path / "my-export"
    shutil.copytree(task_dir(data_root, TASK), folder)  # the generated task is a Roboflow COCO export
    options = dict(strategies=("prompt-tune",), shots=("0", "1"))
    by_name = run_sweep(small(data_root, tmp_path / "by-name", **options), log=lambda *_: None)
    by_folder = run_sweep(small(data_root, tmp_path / "by-folder", task=(str(folder),), **options),
                          log=lambda *_: None)
    assert [r["status"] for r in by_folder] == ["ok", "ok"] and {r["task"] for r in by_folder} == {str(folder)}
    assert [(r["strategy"], r["AP"], r["retention_AP"]) for r in by_folder] == \
        [(r["strategy"], r["AP"], r["retention_AP"]) for r in by_name]
