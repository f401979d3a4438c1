"""One place per strategy: a toy strategy declared only in this file trains through `adapt.tune`, round-trips its
adapter file, serves through the multi-tenant engine exactly as `AdapterDetector` detects, and is refused where its
declaration says, with no edit anywhere else. Registration is scoped, so other tests never see it."""
import contextlib
import dataclasses
import io

import pytest
import torch
from PIL import Image

from adapt import STRATEGIES, STRATEGY_NAMES, StrategySpec, get_strategy, register_strategy, registered
from adapt.adapter import Adapter, AdapterError, load_adapter, save_adapter
from adapt.strategies import AdaptedGLIP
from adapt.tune import TuneConfig, train_config_for, tune
from backbone.model import GLIP

TASK = "icons-aquarium"

# The whole toy strategy: a declaration and the class that marks what it trains.
BIAS_TUNE = StrategySpec(
    name="bias-tune", summary="Train the head's constant alignment bias only.", model=f"{__name__}:BiasTune",
    lr=0.5, weight_decay=0.0, weights=("head.bias0",), serving="weights", export=None)


class BiasTune(AdaptedGLIP):
    spec = BIAS_TUNE

    def __init__(self, glip, prompt):
        super().__init__(glip, prompt)
        glip.head.bias0.requires_grad_(True)


# The same tensors declared as a model of its own: the shared server must refuse it, export must take it.
BIAS_OWN = dataclasses.replace(BIAS_TUNE, name="bias-own", model=f"{__name__}:BiasOwn", serving="own-model",
                               export="folded")


class BiasOwn(BiasTune):
    spec = BIAS_OWN


@contextlib.contextmanager
def toys():
    with registered(BIAS_TUNE), registered(BIAS_OWN):
        yield


@pytest.fixture(scope="module")
def toy(tiny_icon_workspace, tmp_path_factory):
    """A bias-tune run on the tiny base and icon task: (workspace, the run's folder, report)."""
    workspace, root = tiny_icon_workspace, tmp_path_factory.mktemp("toy")
    with toys():
        report = tune(TuneConfig(strategy="bias-tune", task=TASK, base=str(workspace / "base.safetensors"),
                                 steps=6, validate=False, zero_shot=False, data_root=workspace / "data",
                                 progress=False, out=root / "bias-tune.safetensors"))
    return workspace, root, report


def own_model_copy(root) -> Adapter:
    """The bias-tune adapter relabelled as the bias-own strategy (same tensors), saved beside it."""
    adapter = load_adapter(root / "bias-tune.safetensors")
    adapter.strategy = "bias-own"
    save_adapter(adapter, root / "bias-own.safetensors")
    return adapter


@pytest.mark.slow  # shares the module's toy tune run
def test_toy_strategy_trains_saves_and_loads_only_its_declared_tensor(toy):
    workspace, root, report = toy
    assert report.trainable_tensors == 1 and report.trainable_parameters == 1
    base = GLIP.from_pretrained(str(workspace / "base.safetensors"))
    with toys():
        assert train_config_for(TuneConfig(strategy="bias-tune", task=TASK), root, 4, False).lr == BIAS_TUNE.lr
        adapter = load_adapter(root / "bias-tune.safetensors", base=base)
        assert adapter.strategy == "bias-tune" and set(adapter.weights) == {"head.bias0"}
        assert not torch.equal(adapter.weights["head.bias0"], base.head.bias0.detach())  # it trained
        # The tuned AP of the run is reproduced by the adapter file through the CLI's detector.
        from adapt.evaluation import evaluate
        from adapt.predict import AdapterDetector
        from tasks import get_task

        split = get_task(TASK, data_root=workspace / "data").split("test")
        detector = AdapterDetector.load(root / "bias-tune.safetensors")
        assert evaluate(None, split, detect_fn=detector.detect_fn()).AP == pytest.approx(report.tuned.AP)
        # A file of this strategy replacing any tensor it does not declare is refused.
        adapter.weights["head.log_scale"] = base.head.log_scale.detach().clone()
        save_adapter(adapter, root / "extra.safetensors")
        with pytest.raises(AdapterError, match="may replace only the base tensors head.bias0"):
            load_adapter(root / "extra.safetensors")
    # Outside the scope the strategy is gone again: its files and runs are refused like any unknown one.
    assert "bias-tune" not in STRATEGIES and tuple(STRATEGIES) == STRATEGY_NAMES
    with pytest.raises(AdapterError, match="unknown strategy 'bias-tune'"):
        load_adapter(root / "bias-tune.safetensors")
    with pytest.raises(ValueError, match="unknown strategy 'bias-tune'"):
        TuneConfig(strategy="bias-tune", task=TASK)


@pytest.mark.slow  # shares the module's toy tune run
def test_toy_strategy_serves_like_the_adapter_detector_and_own_model_is_refused(toy, tmp_path):
    from adapt.predict import AdapterDetector
    from adapt.serve.engine import DetectParams, EngineConfig, MultiTenantEngine
    from adapt.serve.testing import image_bytes

    workspace, root, _ = toy
    (tmp_path / "toy.safetensors").write_bytes((root / "bias-tune.safetensors").read_bytes())
    data = image_bytes(96, 64, seed=1)
    with toys():
        own_model_copy(root)
        (tmp_path / "own.safetensors").write_bytes((root / "bias-own.safetensors").read_bytes())
        engine = MultiTenantEngine(GLIP.from_pretrained(str(workspace / "base.safetensors")), tmp_path,
                                   EngineConfig(max_pixels=4_000_000))
        [served] = engine.run([("toy", engine.prepare(data), DetectParams(threshold=0.0, top_k=20))])
        loaded = engine.pool.get("toy")
        assert set(loaded.overrides) == {"head.bias0"} and not loaded.shares_base  # served as override weights
        with pytest.raises(AdapterError, match="load it as its own model"):
            engine.pool.get("own")
        [expected] = AdapterDetector.load(root / "bias-tune.safetensors").detect(Image.open(io.BytesIO(data)))
    assert served.strategy == "bias-tune" and len(served.detections) == 20
    for got, box, score, label in zip(served.detections, expected.boxes.tolist(), expected.scores.tolist(),
                                      expected.labels.tolist()):
        assert got["score"] == pytest.approx(score, abs=1e-5)
        assert got["category"] == expected.categories[label]
        x, y, w, h = got["bbox"]
        assert [x, y, x + w, y + h] == pytest.approx(box, abs=1e-3)


@pytest.mark.slow  # shares the module's toy tune run
def test_export_follows_the_declaration(toy):
    from adapt.export import ExportError, load_task

    _, root, _ = toy
    with toys():
        adapter = own_model_copy(root)
        with pytest.raises(ExportError, match="is a 'bias-tune' adapter; export supports prompt-tune, linear-probe, "
                                              "lora, finetune, bias-own adapters"):
            load_task(root / "bias-tune.safetensors")
        model, exported = load_task(root / "bias-own.safetensors")  # declared "folded": its tensor is in the model
    assert exported.strategy == "bias-own"
    assert torch.equal(model.head.bias0.detach(), adapter.weights["head.bias0"])


def test_the_command_line_offers_a_strategy_while_it_is_registered():
    from typer.testing import CliRunner

    from adapt.cli import app

    with toys():
        listing = CliRunner().invoke(app, ["--help"]).output
        help_text = CliRunner().invoke(app, ["bias-tune", "--help"]).output
    assert "bias-tune" in listing and "Train the head's constant alignment bias only." in " ".join(help_text.split())
    assert "--lora-r" not in help_text and "--steps" in help_text  # it declares no LoRA; the tune options apply
    gone = CliRunner().invoke(app, ["bias-tune", "--help"])
    assert gone.exit_code != 0 and "bias-tune" not in CliRunner().invoke(app, ["--help"]).output


def test_each_builtin_declaration_is_what_its_class_and_command_carry():
    from typer.main import get_command

    from adapt.cli import app

    commands = get_command(app).commands
    for name in STRATEGY_NAMES:
        spec = get_strategy(name)
        assert spec.model_class().spec is spec
        assert commands[name].help == spec.summary


def test_inconsistent_or_clashing_declarations_are_refused():
    with pytest.raises(ValueError, match="serving 'prompt' is for adapters that carry no weights"):
        dataclasses.replace(BIAS_TUNE, serving="prompt")
    with pytest.raises(ValueError, match="name 'Bias Tune' must be lower-case words"):
        dataclasses.replace(BIAS_TUNE, name="Bias Tune")
    with pytest.raises(ValueError, match="'lora' is registered already"):
        register_strategy(dataclasses.replace(get_strategy("lora"), lr=1.0))
    with pytest.raises(ValueError, match="did you mean 'lora'"):
        get_strategy("lore")
    with registered(dataclasses.replace(BIAS_TUNE, name="bias-wrong")) as wrong:
        with pytest.raises(TypeError, match="does not declare strategy 'bias-wrong'"):
            wrong.model_class()  # the class's own spec is bias-tune
    assert "bias-wrong" not in STRATEGIES
