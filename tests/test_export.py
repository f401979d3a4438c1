"""ONNX export of a task (`adapt export`) and its onnxruntime detector (`adapt predict --onnx`).

Equivalence: the ONNX model's detections must match PyTorch's by the reference matching rule (backbone.verify:
same label, IoU >= 0.99, |score difference| <= 1e-4, one-to-one), on glip-nano with real icon scenes, on a tiny
deformable GLIP for every strategy, and on GLIP-T(C) reference weights with a prompt adapter (against PyTorch and
against the official code's detections), at sizes that are not multiples of 32 (301x237 among them).
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from adapt.adapter import Adapter, save_adapter
from adapt.cli import app
from adapt.export import ExportError, check_options, export_task, zero_shot_adapter
from adapt.onnx_runtime import OnnxDetector, OnnxTask, OnnxTaskError, Result, postprocess
from adapt.predict import AdapterDetector
from adapt.strategies import LINEAR_PROBE_PARAMETERS
from backbone.checkpoints import save_model
from backbone.config import tiny_for_tests
from backbone.model import GLIP
from backbone.postprocess import Postprocessor
from backbone.processor import GLIPProcessor
from backbone.verify import match_detections

ROOT = Path(__file__).resolve().parents[1]
SCORE_TOLERANCE = 1e-4  # the reference rule's |Δscore|; measured differences are ~2e-7 (nano) and ~1.5e-5 (GLIP-T)


def untrained_adapter(glip: GLIP, names: list[str], base_model: str, strategy: str = "prompt-tune",
                      seed: int = 0) -> Adapter:
    """An adapter on `glip` without training: the base's P0, and perturbed tensors for the weight strategies."""
    adapter = zero_shot_adapter(glip, names, base_model, task="demo")
    generator = torch.Generator().manual_seed(seed)
    state = glip.state_dict()

    def nudged(t):
        return t + 0.05 * t.abs().mean() * torch.randn(t.shape, generator=generator) if t.is_floating_point() else t

    if strategy == "linear-probe":
        adapter.weights = {k: nudged(state[k]) for k in LINEAR_PROBE_PARAMETERS}
    elif strategy == "finetune":
        adapter.weights = {k: nudged(v) for k, v in state.items()}
    elif strategy == "lora":
        targets = [n for n, m in glip.named_modules() if isinstance(m, torch.nn.Linear)
                   and (n.endswith("fusion.attn.v_proj") or n == "head.dot_product_projection_text")]
        adapter.lora_config = {"r": 2, "alpha": 4.0, "target_modules": targets, "dropout": 0.0}
        for name in targets:
            weight = state[f"{name}.weight"]
            adapter.lora[f"{name}.lora_A.weight"] = 0.1 * torch.randn(2, weight.shape[1], generator=generator)
            adapter.lora[f"{name}.lora_B.weight"] = 0.1 * torch.randn(weight.shape[0], 2, generator=generator)
    adapter.strategy = strategy
    return adapter


def assert_same_detections(ours, theirs, fragile=frozenset(), max_extra=0):
    """The reference matching rule (one-to-one: same label, IoU >= 0.99, |Δscore| <= 1e-4); returns the matches."""
    missed, extra, matched = match_detections(ours.boxes, ours.scores, ours.labels, theirs.boxes, theirs.scores,
                                              theirs.labels, set(fragile), max_extra)
    assert missed == 0 and extra <= max_extra, f"{missed} unmatched, {extra} extra of {len(theirs)} / {len(ours)}"
    assert matched >= len(theirs.scores) - len(fragile)
    return matched


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny deformable GLIP saved as a base file, and one adapter per strategy on it."""
    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    glip = GLIP.from_config(tiny_for_tests()).eval()
    with torch.no_grad():
        glip.head.bias0.fill_(-1.0)
    save_model(glip, root / "tiny.safetensors")
    glip = GLIP.from_pretrained(str(root / "tiny.safetensors"))
    for strategy in ("prompt-tune", "linear-probe", "lora", "finetune"):
        save_adapter(untrained_adapter(glip, ["fish", "shark", "crab"], str(root / "tiny.safetensors"), strategy),
                     root / f"{strategy}.safetensors")
    other = GLIP.from_config(tiny_for_tests())
    save_model(other, root / "other.safetensors")
    return root


def images(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((h // 4, w // 4, 3)) * 255).astype(np.uint8)).resize((w, h)) for h, w in sizes]


@pytest.mark.parametrize("strategy", ["prompt-tune", "linear-probe", "lora", "finetune"])
def test_every_strategy_exports_and_matches_pytorch(tiny, strategy):
    result = export_task(tiny / f"{strategy}.safetensors", tiny / f"{strategy}.onnx")
    onnx.checker.check_model(str(result.path))
    info = json.loads({p.key: p.value for p in onnx.load(str(result.path)).metadata_props}["glip_adapt"])
    assert info["strategy"] == strategy and info["categories"] == ["fish", "shark", "crab"]
    reference = AdapterDetector.load(tiny / f"{strategy}.safetensors")
    exported = OnnxDetector(result.path)
    # 70x90 resizes to 64x82, not a multiple of 32; 237x301 (portrait) would not fit a fixed landscape canvas
    for image in images([(64, 64), (70, 90), (237, 301), (301, 237)]):
        [theirs], [ours] = reference.detect(image), exported.detect(image)
        assert len(theirs) > 0
        assert_same_detections(ours, theirs)
        assert ours.categories == theirs.categories


def test_no_language_backbone_in_the_graph(tiny):
    """Prompt tuning exports P0 as a constant: the graph has no embedding lookup and no BERT weights."""
    path = tiny / "prompt-tune.onnx"
    if not path.exists():
        export_task(tiny / "prompt-tune.safetensors", path)
    model = onnx.load(str(path))
    assert [i.name for i in model.graph.input] == ["pixel_values"]
    assert not [n for n in model.graph.node if n.op_type == "Gather" and "embeddings" in n.name]
    assert not [t.name for t in model.graph.initializer if "text.bert" in t.name]
    assert any(n.op_type == "GridSample" for n in model.graph.node)  # the deformable conv's im2col sampling


def test_static_graph_pads_to_its_size_and_refuses_larger_images(tiny):
    path = tiny / "static.onnx"
    export_task(tiny / "prompt-tune.safetensors", path, fixed_size=(96, 128))
    task = OnnxTask(path)
    processor = GLIPProcessor.from_config(tiny_for_tests())
    batch = processor.preprocess(images([(64, 96)]), resize=False)
    [result] = task.run(batch.pixel_values.numpy(), batch.image_sizes, batch.original_sizes)
    # PyTorch on the same zero-padded 96x128 canvas
    glip = AdapterDetector.load(tiny / "prompt-tune.safetensors")
    canvas = torch.zeros(1, 3, 96, 128)
    canvas[..., :64, :96] = batch.pixel_values
    with torch.no_grad():
        outputs = glip.model(glip.adapter.prompt, canvas, batch.image_sizes)
    [final] = Postprocessor.from_config(glip.model.config)(outputs, glip.adapter.positive_map)
    assert_same_detections(to_torch(result, []), final)
    big = processor.preprocess(images([(128, 128)]), resize=False)
    with pytest.raises(OnnxTaskError, match="re-export without --size"):
        task.run(big.pixel_values.numpy(), big.image_sizes)


def to_torch(result: Result, categories):
    from backbone.outputs import Detections

    return Detections(torch.from_numpy(result.boxes), torch.from_numpy(result.scores), torch.from_numpy(result.labels),
                      categories)


@pytest.mark.parametrize("candidates", [200, 3000])  # below and above pre_nms_top_n; 3000 passes batched_nms' 1000
def test_numpy_postprocessing_equals_postprocessor(candidates):
    """Thresholds, per-level top-n, clipping, class-aware "+1" NMS and the max-detections cut, exactly as torch."""
    from backbone.anchors import BoxCoder, grid_anchors
    from backbone.config import PostprocessConfig
    from backbone.outputs import HeadOutputs

    generator = torch.Generator().manual_seed(candidates)
    shapes = [(40, 60), (20, 30), (10, 15)]
    anchors = grid_anchors(shapes, (8, 16, 32), 8)
    n, tokens, classes = len(anchors), 9, 4
    positive = torch.zeros(classes, tokens, dtype=torch.bool)
    positive[0, 1], positive[1, 2:4], positive[2, 5], positive[3, 6:8] = True, True, True, True
    # logits such that about `candidates` (anchor, phrase) pairs pass the 0.05 threshold
    logits = torch.randn(1, n, tokens, generator=generator) - 4.5 + (candidates > 1000) * 1.5
    outputs = HeadOutputs(box_deltas=torch.randn(1, n, 4, generator=generator), centerness=torch.randn(1, n, generator=generator),
                          alignment_logits=logits, anchors=anchors, level_shapes=shapes, image_sizes=[(300, 470)],
                          text_mask=torch.ones(1, tokens, dtype=torch.long), fused_text=torch.zeros(1), fused_visual=[])
    config = PostprocessConfig(pre_nms_top_n=1000, max_detections=100)
    [expected] = Postprocessor(config)(outputs, positive)
    from backbone.postprocess import phrase_probabilities

    boxes = BoxCoder().decode(outputs.box_deltas[0], anchors).numpy()
    probs = phrase_probabilities(logits[0], positive).numpy()
    levels = np.concatenate([np.full(h * w, i) for i, (h, w) in enumerate(shapes)])
    ours = postprocess(boxes, probs, outputs.centerness[0].sigmoid().numpy(), levels, (300, 470),
                       {"score_threshold": 0.05, "pre_nms_top_n": 1000, "nms_threshold": 0.6, "max_detections": 100})
    assert len(expected.scores) == 100
    np.testing.assert_array_equal(ours.labels, expected.labels.numpy())
    # torch's own sigmoid differs by 1 ulp between its vector and scalar paths (whole tensor vs per-level slices)
    np.testing.assert_allclose(ours.scores, expected.scores.numpy(), rtol=1e-6, atol=0)
    np.testing.assert_array_equal(ours.boxes, expected.boxes.numpy())


def test_onnx_task_runs_without_torch(tiny):
    """The runtime wrapper (onnxruntime + numpy) imports neither torch nor the GLIP core."""
    path = tiny / "prompt-tune.onnx"
    if not path.exists():
        export_task(tiny / "prompt-tune.safetensors", path)
    script = (f"import sys; sys.modules['torch'] = None; sys.path.insert(0, {str(ROOT)!r})\n"
              "import numpy as np\nfrom adapt.onnx_runtime import OnnxTask\n"
              f"task = OnnxTask({str(path)!r})\n"
              "x = np.random.default_rng(0).standard_normal((1, 3, 64, 96)).astype(np.float32)\n"
              "[r] = task.run(x, [(64, 90)], [(128, 180)])\n"
              "assert 'torch' not in [m.split('.')[0] for m in sys.modules if sys.modules[m] is not None]\n"
              "print(len(r.scores), r.boxes.shape, task.categories)")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "['fish', 'shark', 'crab']" in run.stdout


def test_float16_export_passes_the_checker_and_keeps_float32_io(tiny):
    path = tiny / "half.onnx"
    export_task(tiny / "prompt-tune.safetensors", path, dtype="float16")
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    full = tiny / "prompt-tune.onnx"
    if not full.exists():
        export_task(tiny / "prompt-tune.safetensors", full)
    pixels = np.random.default_rng(0).standard_normal((1, 3, 64, 96)).astype(np.float32)
    half_outputs = OnnxTask(path).session.run(None, {"pixel_values": pixels})
    full_outputs = OnnxTask(full).session.run(None, {"pixel_values": pixels})
    assert np.abs(half_outputs[1] - full_outputs[1]).max() < 5e-3  # per-category scores at half precision


# --------------------------------------------------------------------------------------------------- glip-nano


@pytest.fixture(scope="module")
def nano(tmp_path_factory):
    """glip-nano (the embedded base) with a prompt and a LoRA adapter for an icon task."""
    from tasks.icons.suite import generate_icon_task, task_dir

    root = tmp_path_factory.mktemp("nano")
    folder = generate_icon_task("icons-aquarium", task_dir(root / "data", "icons-aquarium"),
                                sizes={"train": 1, "valid": 1, "test": 2})
    scenes = sorted(folder.rglob("*.png")) + sorted(folder.rglob("*.jpg"))
    glip = GLIP.from_pretrained("glip-nano")
    from tasks import get_task

    names = get_task("icons-aquarium", data_root=root / "data").category_names
    save_adapter(untrained_adapter(glip, names, "glip-nano"), root / "pt.safetensors")
    save_adapter(untrained_adapter(glip, names, "glip-nano", "lora"), root / "lora.safetensors")
    return root, scenes


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["pt", "lora"])
def test_glip_nano_task_onnx_matches_pytorch(nano, strategy):
    root, scenes = nano
    result = export_task(root / f"{strategy}.safetensors", root / f"{strategy}.onnx")
    onnx.checker.check_model(str(result.path))
    reference, exported = AdapterDetector.load(root / f"{strategy}.safetensors"), OnnxDetector(result.path, threads=2)
    scene = Image.open(scenes[0]).convert("RGB")
    # 256x256 as rendered, and 301x237 (w x h), which the 256-px rule resizes to 202x256 (h x w): padded to 224x256,
    # where a fixed 256x256 canvas would change the scores
    for image in (scene, scene.resize((301, 237))):
        [theirs], [ours] = reference.detect(image), exported.detect(image)
        assert len(theirs) >= 20  # enough to compare (the v2 base keeps 30 above the threshold on this scene)
        assert_same_detections(ours, theirs)


# -------------------------------------------------------------------------------------------------- GLIP-T(C)


@pytest.fixture(scope="module")
def glip_t(tmp_path_factory, reference_dir):
    """Only set up for tests marked `reference`, which skip when the reference cases are absent."""
    from backbone.verify import rebuild_weights

    root = tmp_path_factory.mktemp("glip_t")
    rebuild_weights(reference_dir / "glip_t", root / "official.safetensors")
    save_model(GLIP.from_pretrained(root / "official.safetensors"), root / "glip_t.safetensors")
    (root / "official.safetensors").unlink()
    glip = GLIP.from_pretrained(str(root / "glip_t.safetensors"))
    prompt = json.loads((reference_dir / "glip_t" / "prompt.json").read_text())
    # the reference's exact caption and spans ("person. bicycle. car. toothbrush.", trailing "." included)
    reference_prompt = (prompt["caption"], [tuple(span) for span in prompt["phrase_char_spans"]])
    adapter = zero_shot_adapter(glip, reference_prompt, str(root / "glip_t.safetensors"))
    save_adapter(adapter, root / "pt.safetensors")
    export_task(root / "pt.safetensors", root / "pt.onnx")
    return root, AdapterDetector(glip, adapter)


@pytest.mark.slow
@pytest.mark.reference
def test_glip_t_prompt_adapter_onnx_matches_pytorch_and_the_official_code(glip_t, reference_dir):
    from safetensors.torch import load_file

    root, detector = glip_t
    onnx.checker.check_model(str(root / "pt.onnx"))
    task = OnnxTask(root / "pt.onnx", threads=2)
    source = Image.open(reference_dir / "glip_t" / "input.png").convert("RGB")
    outputs_json = json.loads((reference_dir / "glip_t" / "outputs.json").read_text())
    robustness = outputs_json.get("robustness", {})
    official = load_file(str(reference_dir / "glip_t" / "outputs.safetensors"))
    # 320x480 as the reference ran it (no resize), and a 250x410 crop: padded to 256x416, not a multiple of 32
    for image in (source, source.crop((0, 0, 410, 250))):
        batch = detector.processor.preprocess([image], resize=False)
        [result] = task.run(batch.pixel_values.numpy(), batch.image_sizes, batch.original_sizes)
        ours = to_torch(result, detector.categories)
        with torch.no_grad():
            outputs = detector.model(detector.adapter.prompt, batch.pixel_values, batch.image_sizes)
        [theirs] = detector.postprocessor(outputs, detector.adapter.positive_map)
        assert len(theirs.scores) == 100
        # fragile pairs (a same-label IoU within 1e-3 of 0.6, or at the top-100 cut) may flip either way
        assert_same_detections(ours, theirs, fragile=set(robustness.get("fragile_detection_indices", [])),
                               max_extra=int(robustness.get("max_extra_detections", 0)))
        if image is source:  # and the official code's detections (labels 1-based there)
            ours.labels = ours.labels + 1
            missed, extra, _ = match_detections(ours.boxes, ours.scores, ours.labels, official["det.boxes"],
                                                official["det.scores"], official["det.labels"],
                                                set(robustness.get("fragile_detection_indices", [])),
                                                int(robustness.get("max_extra_detections", 0)))
            assert missed == 0 and extra <= int(robustness.get("max_extra_detections", 0))


# ------------------------------------------------------------------------------------------- what users see


def invoke(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def test_cli_export_then_predict_onnx(tiny, tmp_path):
    code, output = invoke("export", "--adapter", tiny / "lora.safetensors", "--out", tmp_path / "task.onnx")
    assert code == 0, output
    assert "wrote" in output and "(lora)" in output and "batchx3xheightxwidth" in output
    image = tmp_path / "scene.png"
    images([(70, 90)])[0].save(image)
    code, output = invoke("predict", image, "--onnx", tmp_path / "task.onnx", "--threshold", "0.0",
                          "--json", tmp_path / "dets.json", "--save-vis", tmp_path / "vis")
    assert code == 0, output
    records = json.loads((tmp_path / "dets.json").read_text())
    assert records and {"bbox", "score", "category_id", "file_name"} <= set(records[0])
    assert (tmp_path / "vis" / "scene.png").exists()
    code, torch_output = invoke("predict", image, "--adapter", tiny / "lora.safetensors", "--threshold", "0.0")
    assert code == 0
    assert output.splitlines()[0] == torch_output.splitlines()[0]  # same number of detections


def test_default_export_gives_the_detections_of_predict_adapter_on_any_size(tiny, tmp_path):
    """`adapt export` with no size option, then `adapt predict --onnx` against `adapt predict --adapter` (PyTorch)
    on images whose sizes are not multiples of 32, landscape and portrait: same boxes, labels and scores."""
    code, output = invoke("export", "--adapter", tiny / "prompt-tune.safetensors", "--out", tmp_path / "task.onnx")
    assert code == 0, output
    paths = []
    for index, image in enumerate(images([(237, 301), (301, 237)], seed=3)):  # 301x237 and 237x301 (w x h)
        paths.append(tmp_path / f"scene{index}.png")
        image.save(paths[-1])
    records = {}
    for option, path in (("--onnx", tmp_path / "task.onnx"), ("--adapter", tiny / "prompt-tune.safetensors")):
        code, output = invoke("predict", *paths, option, path, "--threshold", "0.0", "--json", tmp_path / "dets.json")
        assert code == 0, output
        records[option] = json.loads((tmp_path / "dets.json").read_text())
    ours, theirs = records["--onnx"], records["--adapter"]
    assert len(theirs) > 10 and len(ours) == len(theirs)
    for path in paths:
        mine = sorted((r for r in ours if r["file_name"] == str(path)), key=lambda r: -r["score"])
        reference = sorted((r for r in theirs if r["file_name"] == str(path)), key=lambda r: -r["score"])
        assert [r["category_id"] for r in mine] == [r["category_id"] for r in reference]
        np.testing.assert_allclose([r["score"] for r in mine], [r["score"] for r in reference], rtol=0, atol=1e-4)
        np.testing.assert_allclose([r["bbox"] for r in mine], [r["bbox"] for r in reference], rtol=0, atol=1e-2)


def test_detect_predict_and_the_server_write_the_same_record_keys(tiny, tmp_path):
    from adapt.serve.schemas import Detection

    image = tmp_path / "scene.png"
    images([(70, 90)])[0].save(image)
    runs = {"detect": ["detect", image, "--prompt", "fish. shark. crab", "--base", tiny / "tiny.safetensors"],
            "predict": ["predict", image, "--adapter", tiny / "prompt-tune.safetensors"],
            "predict --onnx": ["predict", image, "--onnx", tiny / "prompt-tune.onnx"]}
    if not (tiny / "prompt-tune.onnx").exists():
        export_task(tiny / "prompt-tune.safetensors", tiny / "prompt-tune.onnx")
    keys = {}
    for name, args in runs.items():
        code, output = invoke(*args, "--threshold", "0.0", "--json", tmp_path / "out.json")
        assert code == 0, output
        records = json.loads((tmp_path / "out.json").read_text())
        assert records and all(r["file_name"] == str(image) and r["image_id"] == 0 for r in records)
        assert {r["category"] for r in records} <= {"fish", "shark", "crab"}
        assert all(r["category_id"] == ["fish", "shark", "crab"].index(r["category"]) + 1 for r in records)
        keys[name] = {frozenset(r) for r in records}
    assert keys["detect"] == keys["predict"] == keys["predict --onnx"] == {
        frozenset({"image_id", "file_name", "category_id", "category", "bbox", "score"})}
    assert set(Detection.model_fields) == {"category_id", "category", "bbox", "score"}  # the server's, per image


def test_fixed_size_is_an_explicit_option_that_says_it_changes_scores():
    code, output = invoke("export", "--help")
    assert code == 0 and "--dynamic" not in output
    assert "zero-padded" in " ".join(output.split()) and "changes the scores" in " ".join(output.split())


@pytest.mark.parametrize("args, message", [
    (["--opset", "11"], "--opset 11 is not supported"),
    (["--size", "100x200"], "--size 100x200: the graph input is padded to multiples of 32; use e.g. 128x224"),
    (["--size", "big"], "--size takes HEIGHTxWIDTH, e.g. 800x1344; got 'big'"),
    (["--dtype", "bfloat16"], "--dtype 'bfloat16' is not supported for export; use float32 or float16"),
])
def test_cli_refuses_bad_options_in_one_line(tiny, tmp_path, args, message):
    code, output = invoke("export", "--adapter", tiny / "prompt-tune.safetensors", "--out", tmp_path / "t.onnx", *args)
    assert code == 2
    assert output.strip().startswith("error:") and message in output and len(output.strip().splitlines()) == 1
    assert not (tmp_path / "t.onnx").exists()


def test_cli_refuses_an_adapter_for_another_base(tiny, tmp_path):
    code, output = invoke("export", "--adapter", tiny / "prompt-tune.safetensors", "--base", tiny / "other.safetensors",
                          "--out", tmp_path / "t.onnx")
    assert code == 2 and len(output.strip().splitlines()) == 1
    assert "was trained on base" in output and f"--base {tiny / 'tiny.safetensors'}" in output


def test_cli_refuses_an_unsupported_strategy(tiny, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(tiny / "prompt-tune.safetensors"), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        metadata = dict(handle.metadata(), strategy="bitfit")
    save_file(tensors, str(tmp_path / "bitfit.safetensors"), metadata=metadata)
    code, output = invoke("export", "--adapter", tmp_path / "bitfit.safetensors", "--out", tmp_path / "t.onnx")
    assert code == 2 and len(output.strip().splitlines()) == 1
    assert "is a 'bitfit' adapter; export supports prompt-tune, linear-probe, lora, finetune" in output


def test_cli_refuses_an_unwritable_output_path(tiny, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    code, output = invoke("export", "--adapter", tiny / "prompt-tune.safetensors", "--out", blocker / "t.onnx")
    assert code == 2 and len(output.strip().splitlines()) == 1
    assert f"cannot write --out {blocker / 't.onnx'}" in output and "choose a writable path" in output
    code, output = invoke("export", "--adapter", tiny / "prompt-tune.safetensors", "--out", tmp_path)
    assert code == 2 and "is a folder; give a file name" in output


def test_cli_predict_onnx_errors(tiny, tmp_path):
    image = tmp_path / "scene.png"
    images([(64, 64)])[0].save(image)
    code, output = invoke("predict", image)
    assert code == 2 and "pass --adapter FILE (PyTorch) or --onnx FILE (onnxruntime)" in output
    code, output = invoke("predict", image, "--onnx", tmp_path / "missing.onnx")
    assert code == 2 and "does not exist; write one with `adapt export" in output
    plain = tmp_path / "plain.onnx"
    onnx.save(onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])]),
        ir_version=10, opset_imports=[onnx.helper.make_opsetid("", 17)]), str(plain))
    code, output = invoke("predict", image, "--onnx", plain)
    assert code == 2 and "not a task exported by `adapt export`" in output and len(output.strip().splitlines()) == 1
    plain.write_bytes(b"not a protobuf")
    code, output = invoke("predict", image, "--onnx", plain)
    assert code == 2 and "onnxruntime cannot load" in output and len(output.strip().splitlines()) == 1


def test_check_options_accepts_the_documented_range(tmp_path):
    for opset in (16, 17, 20):
        assert check_options(tmp_path / "t.onnx", "float32", opset) == tmp_path / "t.onnx"
    with pytest.raises(ExportError, match="use --opset 17"):
        check_options(tmp_path / "t.onnx", "float32", 21)


def test_cuda_provider_is_preferred_when_onnxruntime_has_it(monkeypatch):
    import onnxruntime

    from adapt.onnx_runtime import default_providers

    assert default_providers() == (["CUDAExecutionProvider", "CPUExecutionProvider"]
                                   if "CUDAExecutionProvider" in onnxruntime.get_available_providers()
                                   else ["CPUExecutionProvider"])
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert default_providers() == ["CUDAExecutionProvider", "CPUExecutionProvider"]


def test_a_merged_model_exports_like_its_adapter(tiny, tmp_path):
    from adapt.adapter import merge_adapter

    merge_adapter(tiny / "linear-probe.safetensors", tmp_path / "merged.safetensors")
    result = export_task(tmp_path / "merged.safetensors", tmp_path / "merged.onnx")
    [image] = images([(64, 64)])
    [theirs] = AdapterDetector.load(tiny / "linear-probe.safetensors").detect(image)
    [ours] = OnnxDetector(result.path).detect(image)
    assert len(theirs) > 0
    assert_same_detections(ours, theirs)
