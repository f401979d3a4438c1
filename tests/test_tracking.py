"""Runs in the user's tracker: what TensorBoard, MLflow and W&B hold, read back with each tool's own reader and
compared with the run's JSONL log, its report and the adapter file on disk."""
import glob
import json
import struct
import sys
from pathlib import Path

import pytest
import torch

from adapt.pretrain import PretrainConfig
from adapt.train import TrainConfig, Trainer
from adapt.train.tracking import open_trackers
from adapt.tune import TuneConfig
from tests._train_helpers import ToyData, loss_fn, make_config, make_model

TASK = "icons-aquarium"


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory):
    """A private MLflow store, made once (SQLite: MLflow 3 refuses its file store unless told to allow it)."""
    mlflow = pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    return uri, mlflow.MlflowClient(uri)


@pytest.fixture
def mlflow_client(mlflow_store, request, monkeypatch):
    """The store's client, with this test's runs going to an experiment named after the test."""
    uri, client = mlflow_store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", request.node.name)
    client.experiment_name = request.node.name
    return client


def jsonl(run_dir: Path, event: str) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["event"] == event]


def tensorboard_run(log_dir: Path):
    """(scalars {tag: {step: value}}, hparams {name: value}) through TensorBoard's event reader."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    events = EventAccumulator(str(log_dir))
    events.Reload()
    scalars = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
    hparams = {}
    for content in events.PluginTagToContent("hparams").values():
        info = HParamsPluginData.FromString(content)
        if info.HasField("session_start_info"):
            for name, value in info.session_start_info.hparams.items():
                hparams[name] = getattr(value, value.WhichOneof("kind"))
    return scalars, hparams


def only_run(client):
    experiment = client.get_experiment_by_name(client.experiment_name)
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    assert len(runs) == 1, runs
    return runs[0]


def history(client, run, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}


def column(records: list[dict], key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in records}


def toy_trainer(out_dir: Path, report_to: str, loss=loss_fn) -> Trainer:
    config = make_config(out_dir, report_to=report_to, eval_every=5)
    return Trainer(make_model(), config, loss, ToyData(),
                   eval_fn=lambda model: {"AP": float(model.head.bias), "AP50": float(model.norm.bias.sum())})


def test_trainer_sends_its_log_records_to_tensorboard_and_mlflow(tmp_path, mlflow_client):
    run_dir = tmp_path / "run"
    toy_trainer(run_dir, report_to=" TensorBoard, MLflow ").fit()
    train, evals = jsonl(run_dir, "train"), jsonl(run_dir, "eval")
    assert [r["step"] for r in train] == list(range(1, 21)) and [r["step"] for r in evals] == [5, 10, 15, 20]
    trainable = sum(p.numel() for p in make_model().parameters() if p.requires_grad)

    scalars, hparams = tensorboard_run(run_dir / "tensorboard")
    for key in ("loss", "mse", "lr", "grad_norm"):
        assert scalars[f"train/{key}"] == pytest.approx(column(train, key), rel=1e-6)
    assert scalars["train/lr"] == pytest.approx({step: 0.05 for step in range(1, 21)})  # constant schedule
    for key in ("AP", "AP50"):
        assert scalars[f"eval/{key}"] == pytest.approx(column(evals, key), rel=1e-6)
    assert scalars["model/trainable_params"] == {0: trainable}
    assert hparams["train.lr"] == pytest.approx(0.05) and hparams["train.schedule"] == "constant"
    assert hparams["train.max_steps"] == 20 and hparams["train.report_to"] == "tensorboard,mlflow"

    run = only_run(mlflow_client)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["train.lr"] == "0.05" and run.data.params["train.max_steps"] == "20"
    for key in ("loss", "lr", "grad_norm"):
        assert history(mlflow_client, run, f"train/{key}") == pytest.approx(column(train, key))
    for key in ("AP", "AP50"):
        assert history(mlflow_client, run, f"eval/{key}") == pytest.approx(column(evals, key))
    assert run.data.metrics["model/trainable_params"] == trainable


@pytest.mark.slow
def test_a_training_command_reports_curves_final_metrics_adapter_size_and_config(tiny_icon_workspace, tmp_path,
                                                                                 mlflow_client):
    from typer.testing import CliRunner

    from adapt.cli import app

    run_dir, adapter, root = tmp_path / "run", tmp_path / "adapter.safetensors", tiny_icon_workspace
    done = CliRunner().invoke(app, [
        "prompt-tune", "--task", TASK, "--base", str(root / "base.safetensors"), "--shots", "1", "--steps", "4",
        "--eval-every", "2", "--run-dir", str(run_dir), "--out", str(adapter), "--report", str(tmp_path / "r.json"),
        "--report-to", "tensorboard,mlflow"], env={"ADAPT_DATA": str(root / "data")})
    assert done.exit_code == 0, done.output
    report = json.loads((tmp_path / "r.json").read_text())
    evals, train = jsonl(run_dir, "eval"), jsonl(run_dir, "train")
    assert [r["step"] for r in evals] == [2, 4] and {"AP", "AP50"} <= set(evals[0])
    final = {"final/AP": report["tuned"]["AP"], "final/AP50": report["tuned"]["AP50"],
             "adapter/bytes": adapter.stat().st_size}

    run = only_run(mlflow_client)
    assert run.info.status == "FINISHED" and run.info.run_name.startswith("prompt-tune-icons-aquarium-1shot-seed0-")
    assert {k: run.data.metrics[k] for k in final} == pytest.approx(final)
    assert history(mlflow_client, run, "model/trainable_params") == {0: report["trainable_parameters"]}
    for key in ("AP", "AP50"):
        assert history(mlflow_client, run, f"eval/{key}") == pytest.approx(column(evals, key))
        assert history(mlflow_client, run, f"zero_shot/{key}") == pytest.approx({0: report["zero_shot"][key]})
    assert history(mlflow_client, run, "train/loss") == pytest.approx(column(train, "loss"))
    params = run.data.params
    assert params["strategy"] == "prompt-tune" and params["shots"] == "1" and params["lr"] == "None"
    assert params["train.lr"] == "0.05" and params["train.max_steps"] == "4"  # the engine's resolved values

    scalars, hparams = tensorboard_run(run_dir / "tensorboard")
    for key, value in final.items():
        assert scalars[key] == pytest.approx({4: value}, rel=1e-6)
    assert scalars["eval/AP"] == pytest.approx(column(evals, "AP"), rel=1e-6)
    assert hparams["strategy"] == "prompt-tune" and hparams["train.lr"] == pytest.approx(0.05)


@pytest.mark.slow
def test_pretraining_reports_its_curves_naming_metrics_and_config(tmp_path):
    from adapt.pretrain import pretrain

    run_dir = tmp_path / "run"
    summary = pretrain(PretrainConfig(preset="tiny", steps=2, batch_size=2, warmup_steps=0, eval_every=2,
                                      eval_images=2, checkpoint_every=2, out_dir=run_dir, data_root=tmp_path / "data",
                                      resume=False, report_to="tensorboard"))
    scalars, hparams = tensorboard_run(run_dir / "tensorboard")
    assert scalars["train/loss"] == pytest.approx(column(jsonl(run_dir, "train"), "loss"), rel=1e-6)
    for key, value in summary.last_metrics.items():
        assert scalars[f"eval/{key}"] == pytest.approx({2: value}, rel=1e-6)
        assert scalars[f"final/{key}"] == pytest.approx({2: value}, rel=1e-6)
    assert hparams["preset"] == "tiny" and hparams["steps"] == 2 and hparams["train.best_metric"] == "AP50"


def wandb_records(run_dir: Path) -> list:
    """The records of an offline run's transaction log. wandb ships no reader for it, so this follows its
    LevelDB-style framing: a 7-byte file header, 32 KiB blocks, 7-byte chunk headers (crc, length, type)."""
    from wandb.proto import wandb_internal_pb2

    (path,) = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    data, position, chunks, records = Path(path).read_bytes(), 7, b"", []
    while position + 7 <= len(data):
        if 32768 - position % 32768 < 7:  # a block's tail too short for a header is padding
            position += 32768 - position % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if kind == 0:
            break
        chunks += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            records.append(wandb_internal_pb2.Record.FromString(chunks))
            chunks = b""
    return records


def test_wandb_offline_run_holds_the_log_records_and_config(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    for name, value in {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}.items():
        monkeypatch.setenv(name, value)
    run_dir = tmp_path / "run"
    toy_trainer(run_dir, report_to="wandb").fit()
    wandb.teardown()  # the log is written by wandb's service process: stop it so the file is complete
    rows, config, exits = {}, {}, []
    for record in wandb_records(tmp_path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            rows[row["_step"]] = row
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "exit":
            exits.append(record.exit.exit_code)
    assert exits == [0] and config["train.lr"] == 0.05 and config["train.max_steps"] == 20
    for record in jsonl(run_dir, "train"):
        assert rows[record["step"]]["train/loss"] == pytest.approx(record["loss"])
    for record in jsonl(run_dir, "eval"):
        assert rows[record["step"]]["eval/AP"] == pytest.approx(record["AP"])


def test_none_reports_nowhere_and_a_failed_run_is_marked_failed(tmp_path, mlflow_client):
    toy_trainer(tmp_path / "quiet", report_to="none").fit()
    assert (tmp_path / "quiet" / "metrics.jsonl").exists() and not (tmp_path / "quiet" / "tensorboard").exists()
    assert mlflow_client.get_experiment_by_name(mlflow_client.experiment_name) is None

    calls = []

    def breaks_at_call_7(model, batch):
        calls.append(1)
        if len(calls) == 7:
            raise RuntimeError("data loader died")
        return loss_fn(model, batch)

    with pytest.raises(RuntimeError, match="data loader died"):
        toy_trainer(tmp_path / "broken", report_to="mlflow", loss=breaks_at_call_7).fit()
    run = only_run(mlflow_client)
    assert run.info.status == "FAILED"
    assert history(mlflow_client, run, "train/loss") == pytest.approx(column(jsonl(tmp_path / "broken", "train"),
                                                                             "loss"))


def test_report_to_is_checked_in_one_line_before_training(tmp_path, monkeypatch):
    cases = [(lambda: TrainConfig(out_dir=tmp_path, max_steps=1, report_to="tensorbord"), "'tensorbord'"),
             (lambda: TuneConfig(strategy="prompt-tune", task=TASK, report_to="mlflow,mlflow"), "named twice"),
             (lambda: PretrainConfig(report_to="neptune"), "'neptune'")]
    for build, reason in cases:
        with pytest.raises(ValueError, match=reason) as error:
            build()
        assert "\n" not in str(error.value) and "none' or a comma-separated list of tensorboard, mlflow, wandb" in \
            str(error.value)
    assert TuneConfig(strategy="prompt-tune", task=TASK, report_to="WandB , tensorboard").report_to == \
        "wandb,tensorboard"

    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed
    with pytest.raises(ImportError, match=r'pip install "glip-adapt\[track\]"') as error:
        Trainer(make_model(), make_config(tmp_path / "run", report_to="mlflow"), loss_fn, ToyData())
    assert "\n" not in str(error.value) and not (tmp_path / "run" / "metrics.jsonl").exists()

    monkeypatch.setenv("RANK", "1")  # a torchrun worker other than the first reports nothing
    trackers = open_trackers("tensorboard", tmp_path / "tb", "worker")
    assert not trackers and not (tmp_path / "tb").exists()


def test_a_bad_report_to_on_the_command_line_is_one_error_line(monkeypatch, capsys):
    from adapt.cli import main

    monkeypatch.delenv("ADAPT_DEBUG", raising=False)
    for command in (["prompt-tune", "--task", TASK], ["lora", "--task", TASK], ["pretrain"]):
        monkeypatch.setattr(sys, "argv", ["adapt", *command, "--report-to", "tensorbord"])
        with pytest.raises(SystemExit) as exit_info:
            main()
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and "Traceback" not in err, err
        (line,) = [line for line in err.splitlines() if line.startswith("error:")]
        assert "'tensorbord'" in line and "tensorboard, mlflow, wandb" in line
