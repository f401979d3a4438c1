"""Adaptation strategies, adapter files and the adapt CLI, on a tiny random GLIP and a tiny icon task."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from adapt.adapter import AdapterError, load_adapter, read_adapter_header
from adapt.cli import app
from adapt.predict import AdapterDetector
from adapt.grounding import GroundingBatch
from adapt.strategies import FINETUNE_FROZEN_PREFIXES, LINEAR_PROBE_PARAMETERS, LinearProbe, LoRA, PromptTuning
from adapt.tune import TuneConfig, tune
from backbone.checkpoints import save_model
from backbone.config import tiny_for_tests
from backbone.model import GLIP
from backbone.processor import GLIPProcessor

TASK = "icons-aquarium"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny base model file and a tiny generated icon task under a private data root."""
    from tasks.icons.suite import generate_icon_task, task_dir

    root = tmp_path_factory.mktemp("adapt")
    torch.manual_seed(0)
    base = GLIP.from_config(tiny_for_tests())
    with torch.no_grad():
        base.head.bias0.fill_(-1.0)
    save_model(base, root / "tiny.safetensors")
    other = GLIP.from_config(tiny_for_tests())
    save_model(other, root / "other.safetensors")
    data = root / "data"
    generate_icon_task(TASK, task_dir(data, TASK), sizes={"train": 10, "valid": 4, "test": 4})
    return root


def run(workspace, strategy, **kwargs):
    options = dict(strategy=strategy, task=TASK, base=str(workspace / "tiny.safetensors"), shots=1, seed=0, steps=4,
                   eval_every=4, data_root=workspace / "data", progress=False,
                   out=workspace / f"{strategy}.safetensors")
    options.update(kwargs)
    return tune(TuneConfig(**options))


def tiny_prompt(glip):
    processor = GLIPProcessor.from_config(glip.config)
    return processor, processor.tokenize(["fish", "shark"])[0]


def test_each_strategy_trains_exactly_its_parameters():
    torch.manual_seed(0)
    glip = GLIP.from_config(tiny_for_tests())
    _, prompt = tiny_prompt(glip)
    assert PromptTuning(glip, prompt).trainable_names() == ["delta_p0"]
    glip = GLIP.from_config(tiny_for_tests())
    assert sorted(LinearProbe(glip, prompt).trainable_names()) == sorted(f"glip.{n}" for n in LINEAR_PROBE_PARAMETERS)
    from adapt.strategies import FullFinetune

    glip = GLIP.from_config(tiny_for_tests())
    names = FullFinetune(glip, prompt).trainable_names()
    assert not any(n.removeprefix("glip.").startswith(FINETUNE_FROZEN_PREFIXES) for n in names)
    assert "glip.text.bert.embeddings.word_embeddings.weight" in names and "glip.swin.body.layers.2.blocks.0.attn.qkv.weight" in names
    glip = GLIP.from_config(tiny_for_tests())
    lora_names = LoRA(glip, prompt, r=2, alpha=4).trainable_names()
    assert lora_names and all(".lora_A." in n or ".lora_B." in n for n in lora_names)
    assert any("fusion.attn.v_proj" in n for n in lora_names) and any("dot_product_projection_text" in n for n in lora_names)


def test_zero_initialised_prompt_offset_and_lora_leave_outputs_unchanged():
    torch.manual_seed(0)
    glip = GLIP.from_config(tiny_for_tests()).eval()
    _, prompt = tiny_prompt(glip)
    batch = GroundingBatch(torch.randn(1, 3, 64, 64), [(64, 64)], [])
    with torch.no_grad():
        base = glip(glip.encode_prompt(prompt.input_ids, prompt.attention_mask), batch.pixel_values)
        tuned = PromptTuning(glip, prompt).eval()(batch)
        torch.testing.assert_close(tuned.alignment_logits, base.alignment_logits, rtol=1e-6, atol=1e-6)
        lora = LoRA(glip, prompt, r=2, alpha=4).eval()(batch)
        torch.testing.assert_close(lora.alignment_logits, base.alignment_logits, rtol=1e-6, atol=1e-6)


def test_frozen_parts_stay_in_eval_mode_while_training():
    glip = GLIP.from_config(tiny_for_tests())
    _, prompt = tiny_prompt(glip)
    model = PromptTuning(glip, prompt).train()
    assert not any(m.training for m in glip.modules())
    probe = LinearProbe(GLIP.from_config(tiny_for_tests()), prompt).train()
    assert probe.glip.dyhead.training and not probe.glip.swin.training and not probe.glip.text.training
    assert model.delta_p0.requires_grad


@pytest.mark.parametrize("strategy", ["prompt-tune", "linear-probe", "lora", "finetune"])
def test_tune_writes_an_adapter_that_reproduces_the_tuned_model(workspace, strategy):
    report = run(workspace, strategy)
    path = report.adapter_path
    assert report.adapter_bytes == path.stat().st_size
    assert report.tuned.per_category and report.zero_shot is not None
    meta = read_adapter_header(path)
    assert meta["strategy"] == strategy and meta["task"] == TASK
    assert json.loads(meta["evaluation"])["tuned"]["AP"] == pytest.approx(report.tuned.AP)
    detector = AdapterDetector.load(path)
    from adapt.evaluation import evaluate
    from tasks import get_task

    test = get_task(TASK, data_root=workspace / "data").split("test")
    again = evaluate(None, test, detect_fn=detector.detect_fn())
    assert again.AP == pytest.approx(report.tuned.AP, abs=1e-6)
    if strategy == "prompt-tune":
        assert path.stat().st_size < 20_000  # P0 + mask + map of a 7-category prompt on a 16-wide text encoder
        assert report.trainable_tensors == 1


def test_feature_cache_gives_the_same_training_result(workspace):
    with_cache = run(workspace, "prompt-tune", out=workspace / "cached.safetensors", zero_shot=False)
    without = run(workspace, "prompt-tune", out=workspace / "uncached.safetensors", zero_shot=False,
                  cache_features=False)
    assert with_cache.timings.feature_cache["hits"] > 0 and without.timings.feature_cache is None
    a = load_adapter(workspace / "cached.safetensors").prompt.hidden
    b = load_adapter(workspace / "uncached.safetensors").prompt.hidden
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert with_cache.tuned.AP == pytest.approx(without.tuned.AP, abs=1e-4)


def test_scale_and_flip_views_are_cached_once_each_with_matching_boxes(workspace):
    from adapt.cache import FeatureCache
    from adapt.grounding import GroundingCollator
    from adapt.tune import AdaptDataset, task_tokens, training_views
    from tasks import get_task

    views = training_views((0.5, 1.0), flip=True)
    assert views == ((0.5, False), (0.5, True), (1.0, False), (1.0, True))
    glip = GLIP.from_pretrained(str(workspace / "tiny.safetensors")).eval()
    processor = GLIPProcessor.from_config(glip.config)
    task = get_task(TASK, data_root=workspace / "data")
    split = task.split("train")
    dataset = AdaptDataset(split, split.image_ids[:2], views, min_size=glip.config.image.min_size)
    prompt = task_tokens(processor, task.categories)
    model = PromptTuning(glip, prompt).train()
    cache = FeatureCache()
    model.use_feature_cache(cache)
    collate = GroundingCollator(processor, task_prompt=prompt)
    samples = [dataset[i] for i in range(len(dataset))]
    for _ in range(2):  # a second epoch is all cache hits
        batches = [collate(samples[i:i + 2]) for i in range(0, len(samples), 2)]
        for batch in batches:
            with torch.no_grad():
                model(batch)
    assert cache.stats()["misses"] == 8 and cache.stats()["hits"] == 8
    # sample i is image i % 2 in view i // 2: image 0 at (0.5, no flip) vs (1.0, no flip)
    half, full = collate([samples[0]]), collate([samples[4]])
    assert half.image_sizes[0][0] * 2 == pytest.approx(full.image_sizes[0][0], abs=1)
    torch.testing.assert_close(half.targets[0].boxes * 2, full.targets[0].boxes, atol=2.0, rtol=0)
    flipped = collate([samples[6]])  # image 0 at (1.0, flip): x mirrored
    width = full.image_sizes[0][1]
    torch.testing.assert_close(flipped.targets[0].boxes[:, [2, 0]], width - full.targets[0].boxes[:, [0, 2]],
                               atol=1e-3, rtol=0)
    assert len(batches) == 4
    with pytest.raises(ValueError, match="scales"):
        training_views((0.1,))


def test_half_width_prompt_halves_the_file_and_keeps_the_detections(workspace, tmp_path):
    from adapt.adapter import save_adapter

    path = workspace / "prompt-tune.safetensors"
    full = load_adapter(path if path.exists() else run(workspace, "prompt-tune", zero_shot=False).adapter_path)
    # widen the prompt so P0 dominates the file, as it does on GLIP-T (768 wide)
    wide = torch.randn(1, full.prompt.length, 2048)
    full.prompt = type(full.prompt)(wide, wide.clone(), full.prompt.mask)
    sizes = {dtype: save_adapter(full, tmp_path / f"{dtype}.safetensors", prompt_dtype=dtype).stat().st_size
             for dtype in ("float32", "float16")}
    assert sizes["float16"] < 0.6 * sizes["float32"]
    half = load_adapter(tmp_path / "float16.safetensors")
    assert half.prompt.hidden.dtype == torch.float32
    torch.testing.assert_close(half.prompt.hidden, wide, rtol=1e-3, atol=1e-3)
    assert not torch.equal(half.prompt.hidden, wide)  # it really was rounded
    with pytest.raises(AdapterError, match="prompt_dtype"):
        save_adapter(full, tmp_path / "bad.safetensors", prompt_dtype="int8")
    assert not (tmp_path / "bad.safetensors").exists()
    with pytest.raises(AdapterError, match="prompt_dtype 'int8'"):  # refused before any training
        run(workspace, "prompt-tune", prompt_dtype="int8", out=tmp_path / "bad.safetensors")
    assert not (tmp_path / "bad.safetensors").exists()


def test_half_width_prompt_adapter_detects_like_the_full_one(workspace, tmp_path):
    report = run(workspace, "prompt-tune", zero_shot=False, out=tmp_path / "half.safetensors", prompt_dtype="float16")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "half.safetensors"), framework="pt") as handle:
        assert handle.get_tensor("prompt.hidden").dtype == torch.float16
    detector = AdapterDetector.load(tmp_path / "half.safetensors")
    from adapt.evaluation import evaluate
    from tasks import get_task

    again = evaluate(None, get_task(TASK, data_root=workspace / "data").split("test"), detect_fn=detector.detect_fn())
    assert again.AP == pytest.approx(report.tuned.AP, abs=1.0)  # fp16 rounding of P0 only


def test_adapter_for_another_base_or_strategy_is_refused(workspace):
    path = workspace / "prompt-tune.safetensors"
    if not path.exists():
        run(workspace, "prompt-tune")
    other = GLIP.from_pretrained(str(workspace / "other.safetensors"))
    with pytest.raises(AdapterError, match="trained on base .*tiny.safetensors"):
        load_adapter(path, base=other)
    with pytest.raises(AdapterError, match="is a prompt-tune adapter, not lora"):
        load_adapter(path, expect_strategy="lora")


def test_truncated_and_foreign_files_are_refused(workspace, tmp_path):
    path = workspace / "prompt-tune.safetensors"
    if not path.exists():
        run(workspace, "prompt-tune")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(AdapterError, match="truncated|corrupt|readable"):
        load_adapter(truncated)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(3)}, str(foreign))
    with pytest.raises(AdapterError, match="not a glip-adapt adapter"):
        load_adapter(foreign)
    text = tmp_path / "notes.safetensors"
    text.write_text("hello")
    with pytest.raises(AdapterError):
        load_adapter(text)


def test_bad_requests_fail_clearly_and_leave_nothing_behind(workspace, tmp_path):
    out = tmp_path / "never.safetensors"
    with pytest.raises(ValueError, match="fewer than|at least|shots"):
        run(workspace, "prompt-tune", shots=50, out=out)
    assert not out.exists()
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(PermissionError, match="choose another --out"):
        run(workspace, "prompt-tune", out=blocker / "adapter.safetensors")

def test_prompt_longer_than_the_token_limit_is_refused():
    from adapt.tune import task_tokens
    from tasks.task import Category

    glip = GLIP.from_config(tiny_for_tests())
    processor = GLIPProcessor.from_config(glip.config)
    categories = [Category(f"category number {i}") for i in range(80)]
    with pytest.raises(ValueError, match="token limit"):
        task_tokens(processor, categories)


def test_cli_inspect_predict_eval_and_merge(workspace, tmp_path):
    path = workspace / "linear-probe.safetensors"
    if not path.exists():
        run(workspace, "linear-probe")
    runner = CliRunner()
    shown = runner.invoke(app, ["adapters", "inspect", str(path)])
    assert shown.exit_code == 0, shown.output
    assert "linear-probe" in shown.output and "weights.head.bias0" in shown.output and "base_fingerprint" in shown.output
    image = next((workspace / "data").rglob("*.png"))
    out_json = tmp_path / "pred.json"
    predicted = runner.invoke(app, ["predict", str(image), "--adapter", str(path), "--threshold", "0.0",
                                    "--json", str(out_json), "--save-vis", str(tmp_path / "vis")])
    assert predicted.exit_code == 0, predicted.output
    records = json.loads(out_json.read_text())
    assert records and all(len(r["bbox"]) == 4 for r in records)
    assert (tmp_path / "vis" / f"{image.stem}.png").exists()
    merged = tmp_path / "merged.safetensors"
    result = runner.invoke(app, ["adapters", "merge", str(path), "--out", str(merged)])
    assert result.exit_code == 0, result.output
    [a] = AdapterDetector.load(path).detect(str(image))
    [b] = AdapterDetector.load(merged).detect(str(image))
    torch.testing.assert_close(a.scores, b.scores)
    bad = runner.invoke(app, ["adapters", "inspect", str(tmp_path / "missing.safetensors")])
    assert bad.exit_code == 2 and "does not exist" in bad.output


def test_a_cut_tune_run_resumes_from_its_run_dir_to_the_uncut_adapter(workspace, tmp_path, monkeypatch):
    from adapt.train.trainer import Trainer

    options = dict(zero_shot=False, steps=8, eval_every=4, batch_size=2)
    run(workspace, "prompt-tune", out=tmp_path / "uncut.safetensors", run_dir=tmp_path / "uncut", **options)
    save = Trainer._save_checkpoint

    def save_then_die(self):
        save(self)
        if self.step == 4:
            raise KeyboardInterrupt  # the run is cut right after its first checkpoint

    monkeypatch.setattr(Trainer, "_save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(workspace, "prompt-tune", out=tmp_path / "cut.safetensors", run_dir=tmp_path / "cut", **options)
    monkeypatch.setattr(Trainer, "_save_checkpoint", save)
    assert (tmp_path / "cut" / "checkpoint.pt").exists() and not (tmp_path / "cut.safetensors").exists()
    with pytest.raises(FileExistsError, match="resume"):
        run(workspace, "prompt-tune", out=tmp_path / "cut.safetensors", run_dir=tmp_path / "cut", **options)
    report = run(workspace, "prompt-tune", out=tmp_path / "cut.safetensors", run_dir=tmp_path / "cut", resume=True,
                 **options)
    assert report.resumed_from_step == 4 and report.timings.steps == 8
    resumed, uncut = load_adapter(tmp_path / "cut.safetensors"), load_adapter(tmp_path / "uncut.safetensors")
    torch.testing.assert_close(resumed.prompt.hidden, uncut.prompt.hidden, rtol=0, atol=0)
    with pytest.raises(ValueError, match="resume needs the run folder"):
        TuneConfig(strategy="prompt-tune", task=TASK, resume=True)


def test_cli_resume_and_device_options(workspace, tmp_path):
    runner = CliRunner()
    common = ["--task", TASK, "--base", str(workspace / "tiny.safetensors"), "--shots", "1", "--steps", "2",
              "--out", str(tmp_path / "a.safetensors")]
    env = {"ADAPT_DATA": str(workspace / "data")}
    bad = runner.invoke(app, ["prompt-tune", *common, "--dtype", "float16", "--device", "cpu"], env=env)
    assert bad.exit_code == 2 and "float16 runs on CUDA only" in bad.output
    done = runner.invoke(app, ["linear-probe", *common, "--dtype", "bfloat16", "--run-dir", str(tmp_path / "run")],
                         env=env)
    assert done.exit_code == 0, done.output
    assert (tmp_path / "run" / "checkpoint.pt").exists() and (tmp_path / "a.safetensors").exists()
    again = runner.invoke(app, ["linear-probe", *common, "--dtype", "bfloat16", "--run-dir", str(tmp_path / "run"),
                                "--resume"], env=env)
    assert again.exit_code == 0, again.output


def test_lora_scale_that_adapter_files_refuse_is_refused_before_training():
    with pytest.raises(ValueError, match="adapter files refuse"):
        TuneConfig(strategy="lora", task=TASK, lora_r=4, lora_alpha=1e308)
    TuneConfig(strategy="lora", task=TASK, lora_r=4, lora_alpha=4096)  # the largest accepted scale, 1024
