"""Device discipline without a GPU: the GLIP core on fake CUDA tensors, and the device/dtype resolvers.

PyTorch's FakeTensorMode makes `cuda` tensors on a CPU-only machine that carry no data but follow the same
device rules, so a CPU tensor meeting a CUDA one raises here exactly as it would on a GPU. Without a ShapeEnv a
host sync (`bool(t)`, `.item()`, a data-dependent size) raises too, which is how the forward is shown to have none.
With a ShapeEnv, data-dependent sizes (nonzero, boolean masks, NMS) become symbols, so post-processing runs too.
"""
import copy
import dataclasses
import warnings

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from backbone.config import tiny_for_tests
from backbone.detector import GLIPDetector
import backbone.device
from backbone.device import DeviceError, resolve_device, resolve_dtype
from backbone.model import GLIP
from backbone.postprocess import Postprocessor
from backbone.processor import GLIPProcessor

CUDA = torch.device("cuda", 0)


def _config(**changes):
    config = tiny_for_tests()
    if "fusion" in changes:
        changes["fusion"] = dataclasses.replace(config.fusion, enabled=changes["fusion"])
    if "deform_impl" in changes:
        changes["dyhead"] = dataclasses.replace(config.dyhead, deform_impl=changes.pop("deform_impl"))
    return config.replace(**changes)


@pytest.fixture(scope="module")
def inputs():
    config = tiny_for_tests()
    processor = GLIPProcessor.from_config(config)
    [prompt] = processor.tokenize(["cat", "dog", "red car"])
    [short] = processor.tokenize(["cat"])
    batch = processor.preprocess([np.zeros((60, 90, 3), np.uint8), np.zeros((80, 50, 3), np.uint8)])
    return prompt, short, batch


def _model(**changes) -> GLIP:
    torch.manual_seed(0)
    return GLIP.from_config(_config(**changes)).eval()


@pytest.mark.parametrize("changes", [{}, {"fusion": False}, {"deform_impl": "im2col"}, {"deform_impl": "gather"},
                                     {"deform_impl": "torchvision"}],
                         ids=["deep-fusion", "no-fusion", "im2col-deform", "gather-deform", "torchvision-deform"])
def test_forward_runs_on_fake_cuda_without_host_syncs(inputs, changes):
    """Every hook (prompt, images, fusion, head), with prompts of different lengths batched (padding masked)."""
    from backbone.outputs import PromptFeatures

    prompt, short, batch = inputs
    model = _model(**changes)
    with FakeTensorMode(allow_non_fake_inputs=True):  # no ShapeEnv: any host sync raises
        model = model.to(CUDA)
        long_p0 = model.encode_prompt(prompt.input_ids.to(CUDA), prompt.attention_mask.to(CUDA))
        short_p0 = model.encode_prompt(short.input_ids.to(CUDA), short.attention_mask.to(CUDA))
        p0 = PromptFeatures.stack([long_p0, short_p0])
        visual = model.encode_images(batch.pixel_values.to(CUDA), batch.image_sizes)
        outputs = model.fuse_and_predict(visual, p0)
        for tensor in (outputs.alignment_logits, outputs.box_deltas, outputs.centerness, outputs.anchors,
                       outputs.fused_text, *outputs.fused_visual):
            assert tensor.device == CUDA


def test_postprocessing_runs_on_fake_cuda(inputs):
    prompt, _, batch = inputs
    model = _model()
    postprocessor = Postprocessor.from_config(model.config)
    with FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True):
        model = model.to(CUDA)
        p0 = model.encode_prompt(prompt.input_ids.to(CUDA), prompt.attention_mask.to(CUDA))
        outputs = model(p0, batch.pixel_values.to(CUDA), batch.image_sizes)
        finals = postprocessor(outputs, prompt.positive_map.to(CUDA))
        assert [f.boxes.device for f in finals] == [CUDA, CUDA]
        assert all(f.scores.device == CUDA and f.labels.device == CUDA for f in finals)


def test_detect_runs_end_to_end_on_fake_cuda(inputs):
    """The user-facing call: images from the host, chunked prompts, results handed back on the CPU."""
    model = _model()
    processor = GLIPProcessor.from_config(model.config)
    for name in ("tokenize", "preprocess"):  # host-side work on real data, as on a GPU machine
        method = getattr(processor, name)
        setattr(processor, name, lambda *a, _method=method, **k: _real(_method, *a, **k))
    with FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True):
        detector = GLIPDetector(model.to(CUDA), processor)
        assert detector.device == CUDA
        [dets] = detector.detect(np.zeros((60, 90, 3), np.uint8), ["cat", "dog"], threshold=0.0)
        assert dets.boxes.device.type == "cpu"


def _real(function, *args, **kwargs):
    with unset_fake_temporarily():
        return function(*args, **kwargs)


def test_fake_cuda_catches_a_cpu_constant():
    """The check itself: a CPU tensor created in the middle of CUDA work fails, as it would on a GPU."""
    with FakeTensorMode(allow_non_fake_inputs=True):
        boxes = torch.zeros(3, 4, device=CUDA)
        with pytest.raises(RuntimeError, match="device"):
            boxes + torch.tensor([0.0, 0.0, 1.0, 1.0])


def test_bf16_autocast_detect_matches_float32():
    torch.manual_seed(0)
    model = GLIP.from_config(tiny_for_tests()).eval()
    with torch.no_grad():
        model.head.bias0.fill_(0.0)
    processor = GLIPProcessor.from_config(model.config)
    image = (np.random.default_rng(0).random((70, 90, 3)) * 255).astype(np.uint8)
    [full] = GLIPDetector(model, processor).detect(image, ["cat", "dog"], threshold=0.0)
    [half] = GLIPDetector(model, processor, dtype="bfloat16").detect(image, ["cat", "dog"], threshold=0.0)
    assert half.scores.dtype == torch.float32 and len(half) > 0
    # the top detection survives bf16 rounding (random tiny weights: a loose but real check)
    assert abs(float(half.scores[0]) - float(full.scores[0])) < 0.02


def test_device_and_dtype_resolution():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    with pytest.raises(DeviceError, match="CUDA only"):
        resolve_dtype("float16", torch.device("cpu"))
    with pytest.raises(DeviceError, match="use one of"):
        resolve_dtype("int8", torch.device("cpu"))
    with pytest.raises(DeviceError, match="not a device name|not supported"):
        resolve_device("tpu:0")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="--device cpu"):
            resolve_device("cuda:1")


@pytest.mark.parametrize("native", [True, False])
def test_bfloat16_on_a_cpu_without_native_support_warns(monkeypatch, native):
    # An AVX2-only CPU emulates bf16 (a GLIP-T(A) forward: 136 s against 1.9 s in float32): say so, keep running.
    monkeypatch.setattr(backbone.device, "cpu_has_native_bfloat16", lambda: native)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
        assert resolve_dtype("float32", torch.device("cpu")) == torch.float32
    slow = [w for w in caught if "no native bfloat16" in str(w.message)]
    assert len(slow) == (0 if native else 1) and (native or "--dtype float32" in str(slow[0].message))


def test_cli_refuses_an_impossible_device_in_one_line():
    from typer.testing import CliRunner

    from adapt.cli import app

    result = CliRunner().invoke(app, ["eval", "--task", "icons-aquarium", "--dtype", "float16", "--device", "cpu"])
    assert result.exit_code == 2
    assert "float16 runs on CUDA only" in result.output and "Traceback" not in result.output


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_detect_on_a_real_gpu(dtype):
    model = _model()
    with torch.no_grad():
        model.head.bias0.fill_(0.0)
    processor = GLIPProcessor.from_config(model.config)
    image = (np.random.default_rng(0).random((70, 90, 3)) * 255).astype(np.uint8)
    [cpu] = GLIPDetector(copy.deepcopy(model), processor).detect(image, ["cat", "dog"], threshold=0.0)
    [gpu_dets] = GLIPDetector(model.to("cuda"), processor, dtype=dtype).detect(image, ["cat", "dog"], threshold=0.0)
    assert gpu_dets.boxes.device.type == "cpu" and len(gpu_dets) > 0
    tolerance = 1e-4 if dtype == "float32" else 0.02
    assert abs(float(gpu_dets.scores[0]) - float(cpu.scores[0])) < tolerance


def test_stochastic_rounding_lands_on_bf16_neighbours_without_bias():
    """The precision floor's stochastic roundings (backbone/verify.py): each value becomes one of its two bf16
    neighbours, the nearer one more often, and the mean over many draws keeps the float32 value."""
    from backbone.verify import round_stochastically

    value = torch.full((20000,), 1.0 + 2.0**-10)  # a quarter of the way from 1 to the next bf16 value, 1 + 2^-7
    rounded = round_stochastically(value, torch.bfloat16, torch.Generator().manual_seed(0))
    assert set(rounded.unique().tolist()) == {1.0, 1.0 + 2.0**-7}
    assert float((rounded > 1).float().mean()) == pytest.approx(0.125, abs=0.01)
    assert float(rounded.double().mean()) == pytest.approx(1.0 + 2.0**-10, abs=2e-5)
    exact = torch.tensor([0.5, -3.0, 0.0])  # already bf16 values stay put
    assert torch.equal(round_stochastically(exact, torch.bfloat16, torch.Generator().manual_seed(0)), exact)
