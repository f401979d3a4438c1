"""One definition per option: the run configs' fields are the CLI's options, `--config FILE` fills what the command line
leaves out, and a run's written config reproduces its adapter bit for bit."""
import dataclasses
import json
from pathlib import Path

import pytest
import torch
import typer
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from adapt.cli import app
from adapt.cli_config import NOT_OPTIONS, field_default, option_fields, option_name
from adapt.pretrain import PretrainConfig
from adapt.serve.app import HTTPLimits
from adapt.serve.engine import EngineConfig
from adapt.train.config import TrainConfig
from adapt.tune import TuneConfig

TASK = "icons-aquarium"
# command -> (its run config, the TrainConfig options nested into the run config's `trainer`)
COMMANDS = {"prompt-tune": (TuneConfig, True), "linear-probe": (TuneConfig, True), "lora": (TuneConfig, True),
            "finetune": (TuneConfig, True), "pretrain": (PretrainConfig, True), "serve": (EngineConfig, False)}


def click_options(name: str) -> dict:
    """{'--option': click parameter} of one command, read from the click command typer builds."""
    group = typer.main.get_command(app)
    command = group.get_command(typer.Context(group), name)
    params = command.get_params(typer.Context(command))
    return {opt: p for p in params for opt in p.opts}


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_config_field_is_an_option_with_its_default_and_help(name):
    config, with_trainer = COMMANDS[name]
    options = click_options(name)
    expected = [f for f in option_fields(config) if f.name not in ("strategy", "trainer")]
    if name != "lora":
        expected = [f for f in expected if not f.name.startswith("lora_")]
    own = {f.name for f in expected}
    if with_trainer:
        expected += [f for f in option_fields(TrainConfig) if f.name not in own]
    if name == "serve":  # the HTTP limits, nested under `http:` in a config file
        expected += option_fields(HTTPLimits)
    assert len(expected) > 10
    for f in expected:
        param = options[option_name(f.name)]
        assert f.metadata.get("help") and param.help == f.metadata["help"], f.name
        assert param.default == field_default(f) or (field_default(f) is dataclasses.MISSING and param.default is None)
    for hidden in (*NOT_OPTIONS[config.__name__], "trainer"):
        assert option_name(hidden) not in options


class Captured(Exception):
    pass


@pytest.fixture
def parse(monkeypatch):
    import adapt.tune

    def capture(config):
        raise Captured(config)

    monkeypatch.setattr(adapt.tune, "tune", capture)
    monkeypatch.setenv("ADAPT_DEBUG", "1")  # let the captured config through the CLI's error path

    def parse(*args):
        result = CliRunner().invoke(app, [str(a) for a in args], env={"ADAPT_DATA": None})
        assert isinstance(result.exception, Captured), result.output
        return result.exception.args[0]

    return parse


def test_defaults_and_flags_reach_the_config_unchanged(parse):
    default_out = Path("adapters") / f"{TASK}-lora.safetensors"  # the command line's default adapter path
    parsed = parse("lora", "--task", TASK)
    assert dataclasses.replace(parsed, data_root=None) == TuneConfig(strategy="lora", task=TASK, out=default_out)
    config = parse("lora", "--task", TASK, "--lora-r", 4, "--lora-alpha", 2.5, "--lora-dropout", 0.1,
                   "--lora-targets", r".*v_proj", "--scales", "0.5,1", "--no-cache-features", "--grad-clip", "none",
                   "--grad-accumulation", 2, "--milestones", "3,5")
    assert (config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_targets) == (4, 2.5, 0.1, r".*v_proj")
    assert config.scales == (0.5, 1.0) and config.cache_features is False
    assert config.trainer == {"grad_clip": None, "grad_accumulation": 2, "milestones": (3, 5)}
    from adapt.tune import train_config_for

    engine = train_config_for(config, Path("run"), num_samples=8, has_valid=False)  # what the Trainer gets
    assert (engine.grad_clip, engine.grad_accumulation, engine.milestones) == (None, 2, (3, 5))
    assert engine.warmup_steps == train_config_for(parse("lora", "--task", TASK), Path("run"), 8, False).warmup_steps


def test_lora_options_build_the_lora_they_name(parse):
    from adapt.strategies import LoRA
    from backbone.config import tiny_for_tests
    from backbone.model import GLIP
    from backbone.processor import GLIPProcessor

    config = parse("lora", "--task", TASK, "--lora-r", 3, "--lora-alpha", 6, "--lora-dropout", 0.25,
                   "--lora-targets", r".*fusion\.attn\.v_proj")
    glip = GLIP.from_config(tiny_for_tests())
    prompt = GLIPProcessor.from_config(glip.config).tokenize(["fish"])[0]
    lora = LoRA.from_tune_config(glip, prompt, config)
    assert lora.lora_config["r"] == 3 and lora.lora_config["alpha"] == 6.0 and lora.lora_config["dropout"] == 0.25
    assert lora.lora_config["target_modules"] and all(n.endswith("fusion.attn.v_proj")
                                                      for n in lora.lora_config["target_modules"])


def test_lora_help_shows_rank_and_alpha():
    shown = CliRunner().invoke(app, ["lora", "--help"], env={"COLUMNS": "200"})
    assert shown.exit_code == 0
    assert "--lora-r" in shown.output and "LoRA rank" in shown.output
    assert "--lora-alpha" in shown.output and "alpha / r" in shown.output
    other = CliRunner().invoke(app, ["prompt-tune", "--help"], env={"COLUMNS": "200"})
    assert "--lora-r" not in other.output and "--config" in other.output


def test_config_file_values_sit_under_command_line_flags(parse, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"strategy": "lora", "task": TASK, "steps": 7, "seed": 3, "lora_r": 2,
                                    "scales": [0.5, 1], "trainer": {"grad_accumulation": 2}}))
    config = parse("lora", "--config", path, "--seed", 5)
    assert (config.steps, config.seed, config.lora_r, config.scales) == (7, 5, 2, (0.5, 1.0))
    assert config.trainer == {"grad_accumulation": 2}
    assert parse("lora", "--config", path, "--grad-accumulation", 4).trainer == {"grad_accumulation": 4}


def test_bad_config_files_are_one_line_errors(tmp_path):
    runner = CliRunner()
    path = tmp_path / "bad.yaml"
    path.write_text("task: x\nlora_rank: 4\n")
    result = runner.invoke(app, ["lora", "--config", str(path)])
    assert result.exit_code == 2 and "unknown option 'lora_rank'" in result.output and "lora_r" in result.output
    path.write_text("strategy: lora\ntask: x\n")
    result = runner.invoke(app, ["prompt-tune", "--config", str(path)])
    assert result.exit_code == 2 and "sets strategy: lora" in result.output
    path.write_text("task: x\nsteps: many\n")
    result = runner.invoke(app, ["lora", "--config", str(path)])
    assert result.exit_code == 2 and "steps='many': expected int" in result.output
    result = runner.invoke(app, ["lora", "--config", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 2 and "does not exist" in result.output


def test_serve_and_pretrain_read_their_config_files(monkeypatch, tmp_path):
    import adapt.pretrain
    import adapt.serve.server

    seen = {}
    monkeypatch.setattr(adapt.serve.server, "run_http", lambda **options: seen.update(options))
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump({"max_batch": 2, "deadline_s": 5.0, "port": 9000, "device": "cpu",
                                    "http": {"body_timeout_s": 3, "max_body_bytes": 5000}}))
    result = CliRunner().invoke(app, ["serve", "--config", str(path), "--adapters", str(tmp_path), "--max-batch", "3",
                                      "--max-body-bytes", "7000", "--max-upload-bytes", "9000"])
    assert result.exit_code == 0, result.output
    assert seen["port"] == 9000 and seen["engine_config"] == EngineConfig(max_batch=3, deadline_s=5.0, device="cpu",
                                                                          max_upload_bytes=9000)
    assert seen["http"] == HTTPLimits(max_body_bytes=7000, body_timeout_s=3.0)
    # The upload cap has one home, the engine's option: under http: it is an unknown key, refused in one line.
    path.write_text(yaml.safe_dump({"http": {"max_upload_bytes": 5000}}))
    result = CliRunner().invoke(app, ["serve", "--config", str(path), "--adapters", str(tmp_path)])
    assert result.exit_code == 2 and "unknown option 'max_upload_bytes'" in result.output, result.output

    monkeypatch.setattr(adapt.pretrain, "pretrain", lambda config: seen.update(pretrain=config) or
                        adapt.pretrain.PretrainResult(preset="x", steps=0, seed=0, wall_time_s=0, device="cpu",
                                                      dtype="float32", batch_size=1, lr=0.1, last_metrics={},
                                                      skipped_nonfinite=0))
    path.write_text(yaml.safe_dump({"steps": 5, "out_dir": str(tmp_path / "run"), "trainer": {"log_every": 2}}))
    result = CliRunner().invoke(app, ["pretrain", "--config", str(path), "--lr", "0.001"], env={"ADAPT_DATA": None})
    assert result.exit_code == 0 and json.loads(result.output)["preset"] == "x", result.output
    assert dataclasses.replace(seen["pretrain"], data_root=None) == PretrainConfig(
        steps=5, lr=0.001, out_dir=tmp_path / "run", trainer={"log_every": 2})


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from backbone.checkpoints import save_model
    from backbone.config import tiny_for_tests
    from backbone.model import GLIP
    from tasks.icons.suite import generate_icon_task, task_dir

    root = tmp_path_factory.mktemp("cli-config")
    torch.manual_seed(0)
    save_model(GLIP.from_config(tiny_for_tests()), root / "tiny.safetensors")
    generate_icon_task(TASK, task_dir(root / "data", TASK), sizes={"train": 10, "valid": 2, "test": 2})
    return root


@pytest.mark.slow
def test_the_written_config_reproduces_the_adapter_bit_for_bit(workspace, tmp_path):
    runner, env = CliRunner(), {"ADAPT_DATA": str(workspace / "data")}
    first = runner.invoke(app, ["lora", "--task", TASK, "--base", str(workspace / "tiny.safetensors"), "--shots", "1",
                                "--steps", "3", "--eval-every", "3", "--eval-limit", "1", "--lora-r", "2",
                                "--lora-alpha", "4", "--lora-dropout", "0.1", "--no-zero-shot",
                                "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "a.safetensors")], env=env)
    assert first.exit_code == 0, first.output
    assert "tuned      AP" in first.output and "a.safetensors" in first.output
    written = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert written["lora_r"] == 2 and written["steps"] == 3 and "data_root" not in written
    again = runner.invoke(app, ["lora", "--config", str(tmp_path / "run" / "config.yaml"),
                                "--run-dir", str(tmp_path / "run2"), "--out", str(tmp_path / "b.safetensors")], env=env)
    assert again.exit_code == 0, again.output
    from_adapter = runner.invoke(app, ["lora", "--config", str(tmp_path / "a.safetensors"), "--run-dir", "none",
                                       "--out", str(tmp_path / "c.safetensors")], env=env)
    assert from_adapter.exit_code == 0, from_adapter.output
    a = load_file(str(tmp_path / "a.safetensors"))
    assert any(k.startswith("lora.") for k in a)
    for other in ("b", "c"):
        b = load_file(str(tmp_path / f"{other}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), other
    from adapt.adapter import read_adapter_header

    configs = [json.loads(read_adapter_header(tmp_path / f"{n}.safetensors")["config"]) for n in "abc"]
    for config in configs:
        del config["out"], config["run_dir"]
    del written["out"], written["run_dir"]
    assert configs[0] == configs[1] == configs[2] == written


def test_the_imported_app_has_tasks_and_one_error_path(tmp_path, monkeypatch):
    monkeypatch.delenv("ADAPT_DEBUG", raising=False)
    runner = CliRunner()
    listed = runner.invoke(app, ["tasks", "list", "--root", str(tmp_path)])
    assert listed.exit_code == 0 and "icons-aquarium" in listed.output
    refused = runner.invoke(app, ["tasks", "show", "aquarim", "--root", str(tmp_path)])
    assert refused.exit_code == 1 and refused.output.count("error:") == 1 and "aquarium" in refused.output
    refused = runner.invoke(app, ["lora", "--task", TASK, "--prompt-dtype", "int8"])  # refused before any work
    assert refused.exit_code == 2 and refused.output.startswith("error: prompt_dtype 'int8'"), refused.output
    assert refused.output.count("\n") == 1
