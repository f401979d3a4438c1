"""The GLIP core on a tiny random model: shapes, hooks, invariants, conversion and post-processing."""
import json
import os

import pytest
import torch

from backbone.anchors import BoxCoder, anchor_template, grid_anchors
from backbone.config import GLIPConfig, get_preset, glip_l, tiny_for_tests
from backbone.convert import CheckpointMismatchError, convert_state_dict, infer_config, map_key, read_official
from backbone.dyhead import modulated_deform_conv
from backbone.model import GLIP
from backbone.outputs import HeadOutputs, PromptFeatures
from backbone.postprocess import Candidates, Postprocessor, phrase_probabilities



@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return GLIP.from_config(tiny_for_tests()).eval()


def prompt_of(model, ids):
    ids = torch.tensor([ids])
    return model.encode_prompt(ids, torch.ones_like(ids))


def test_forward_returns_typed_outputs_in_train_and_eval(tiny):
    prompt = prompt_of(tiny, [101, 2711, 1012, 10165, 102])
    pixels = torch.randn(2, 3, 64, 96)
    for mode in (True, False):
        tiny.train(mode)
        out = tiny(prompt, pixels)
        assert isinstance(out, HeadOutputs)
        anchors = sum(h * w for h, w in out.level_shapes)
        assert out.level_shapes == [(8, 12), (4, 6), (2, 3), (1, 2)]
        assert out.box_deltas.shape == (2, anchors, 4)
        assert out.centerness.shape == (2, anchors)
        assert out.alignment_logits.shape == (2, anchors, 5)
        assert out.anchors.shape == (anchors, 4)
    tiny.eval()


def test_visual_features_computed_once_give_the_same_result(tiny):
    prompt = prompt_of(tiny, [101, 2711, 102])
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        direct = tiny(prompt, pixels)
        visual = tiny.encode_images(pixels)
        reused = tiny(prompt, visual=visual)
    torch.testing.assert_close(direct.alignment_logits, reused.alignment_logits, rtol=0, atol=0)


def test_padded_prompt_tokens_do_not_change_real_token_outputs(tiny):
    """Fusion over real tokens only equals fusion over a padded, masked prompt (official PAD_MAX False)."""
    short = prompt_of(tiny, [101, 2711, 1012, 102])
    padded = PromptFeatures.stack([short, prompt_of(tiny, [101, 2711, 1012, 2482, 1012, 11868, 102])])[0]
    assert padded.length == 7 and int(padded.mask.sum()) == 4
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a = tiny(short, pixels)
        b = tiny(padded, pixels)
    torch.testing.assert_close(a.alignment_logits, b.alignment_logits[..., :4], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.box_deltas, b.box_deltas, rtol=1e-5, atol=1e-5)


def test_batch_with_a_prompt_per_image_equals_single_runs(tiny):
    prompts = [prompt_of(tiny, [101, 2711, 102]), prompt_of(tiny, [101, 2482, 1012, 11868, 18623, 102])]
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        batched = tiny(PromptFeatures.stack(prompts), pixels)
        for i, prompt in enumerate(prompts):
            single = tiny(prompt, pixels[i:i + 1])
            n = prompt.length
            torch.testing.assert_close(batched.alignment_logits[i:i + 1, :, :n], single.alignment_logits,
                                       rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(batched.centerness[i:i + 1], single.centerness, rtol=1e-4, atol=1e-4)


def test_prompt_features_round_trip_and_broadcast(tiny):
    prompt = prompt_of(tiny, [101, 2711, 102])
    again = PromptFeatures.from_state_dict(prompt.state_dict())
    assert torch.equal(again.hidden, prompt.hidden) and torch.equal(again.mask, prompt.mask)
    assert prompt.expand(3).hidden.shape[0] == 3
    with pytest.raises(ValueError, match="one per image"):
        PromptFeatures.stack([prompt, prompt]).expand(3)


def test_model_runs_without_language_backbone_on_given_p0(tiny):
    prompt = prompt_of(tiny, [101, 2711, 102])
    headless = GLIP.from_config(tiny_for_tests(), with_text=False).eval()
    headless.load_state_dict({k: v for k, v in tiny.state_dict().items() if not k.startswith("text.")})
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(headless(prompt, pixels).alignment_logits, tiny(prompt, pixels).alignment_logits)
    with pytest.raises(RuntimeError, match="PromptFeatures"):
        headless.encode_prompt(torch.tensor([[101, 102]]), torch.ones(1, 2, dtype=torch.long))


def test_unpadded_images_are_rejected(tiny):
    with pytest.raises(ValueError, match="multiple of 32"):
        tiny.encode_images(torch.randn(1, 3, 50, 64))


def test_anchor_templates_follow_the_plus_one_convention():
    assert anchor_template(8, 64).tolist() == [[-28.0, -28.0, 35.0, 35.0]]
    anchors = grid_anchors([(2, 3)], (8,), 8)
    assert anchors.shape == (6, 4)
    assert anchors[4].tolist() == [-20.0, -20.0, 43.0, 43.0]  # row 1, column 1: shifted by (8, 8)


def test_box_coder_round_trip():
    coder = BoxCoder()
    anchors = torch.tensor([[0.0, 0.0, 63.0, 63.0], [10.0, 20.0, 40.0, 90.0]])
    boxes = torch.tensor([[5.0, 7.0, 50.0, 30.0], [12.0, 25.0, 60.0, 70.0]])
    torch.testing.assert_close(coder.decode(coder.encode(boxes, anchors), anchors), boxes)


def test_deformable_conv_reads_mismatched_offsets_as_raw_memory():
    torch.manual_seed(0)
    x = torch.randn(1, 2, 3, 4)
    weight = torch.randn(2, 2, 3, 3)
    offset = torch.randn(1, 18, 6, 8)  # offsets of the finer level (6x8) used on a 3x4 map
    mask = torch.rand(1, 9, 6, 8)
    out = modulated_deform_conv(x, offset, mask, weight, None, stride=1)
    raw_offset = offset.reshape(-1)[: 18 * 12].reshape(1, 18, 3, 4)
    raw_mask = mask.reshape(-1)[: 9 * 12].reshape(1, 9, 3, 4)
    import torchvision

    expected = torchvision.ops.deform_conv2d(x, raw_offset, weight, None, padding=1, mask=raw_mask)
    torch.testing.assert_close(out, expected)
    resized = torch.nn.functional.interpolate(offset, size=(3, 4))
    other = torchvision.ops.deform_conv2d(x, resized, weight, None, padding=1, mask=raw_mask)
    assert not torch.allclose(out, other)


def test_phrase_probability_is_mean_of_token_probabilities():
    logits = torch.tensor([[0.0, 2.0, -1.0, 3.0]])
    positive = torch.tensor([[False, True, False, True], [True, False, False, False]])
    probs = phrase_probabilities(logits, positive)
    expected = torch.tensor([[(torch.sigmoid(torch.tensor(2.0)) + torch.sigmoid(torch.tensor(3.0))) / 2, 0.5]])
    torch.testing.assert_close(probs, expected)


def test_nms_uses_plus_one_iou_and_keeps_classes_apart():
    post = Postprocessor()
    # IoU of these two with legacy +1 widths: inter 10*11 / (11*11 + 11*11 - 110) = 0.833 > 0.6
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 1.0, 10.0, 11.0], [0.0, 1.0, 10.0, 11.0]])
    cands = Candidates(boxes, torch.tensor([0.9, 0.8, 0.7]), torch.tensor([0, 0, 1]))
    kept = post.select(cands)
    assert kept.labels.tolist() == [0, 1]
    assert kept.scores.tolist() == pytest.approx([0.9, 0.7])


def test_max_detections_cut_keeps_the_highest_scores():
    from backbone.config import PostprocessConfig

    post = Postprocessor(PostprocessConfig(max_detections=2))
    boxes = torch.tensor([[0.0, 0.0, 5.0, 5.0], [20.0, 20.0, 25.0, 25.0], [40.0, 40.0, 45.0, 45.0]])
    kept = post.select(Candidates(boxes, torch.tensor([0.3, 0.9, 0.5]), torch.tensor([0, 0, 0])))
    assert kept.scores.tolist() == pytest.approx([0.9, 0.5])


def test_config_round_trips_through_dict():
    for name in ("glip-t", "glip-t-a", "glip-l", "glip-nano", "tiny"):
        config = get_preset(name)
        assert GLIPConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(KeyError, match="Did you mean: glip-t"):
        get_preset("glip_t")


def _official_keys(reference_dir, name):
    keys = json.loads((reference_dir / name / "keys.json").read_text())
    return keys, {k: torch.empty(v["shape"], dtype=getattr(torch, v["dtype"]), device="meta")
                  for k, v in keys["keys"].items()}


@pytest.mark.reference
def test_glip_l_key_layout_converts_with_nothing_missing_or_unexpected(reference_dir):
    keys, official = _official_keys(reference_dir, "glip_l")
    for key, entry in keys["keys"].items():  # real values for the buffers we check on conversion
        if "cell_anchors" in key:
            official[key] = torch.tensor(keys["buffer_values"][entry["value_id"]], dtype=torch.float32)
    config = infer_config(official)
    assert config.name == "glip-l"
    with torch.device("meta"):
        model = GLIP.from_config(config)
    converted = convert_state_dict(official, model, deep_fusion=True, strides=config.strides)
    assert set(converted) == set(model.state_dict())
    assert sum(v.numel() for v in converted.values()) == keys["num_parameters"] - 80 * 256 - 80  # minus cls_logits


@pytest.mark.reference
def test_conversion_errors_list_missing_unexpected_and_misshaped_keys_by_module(reference_dir):
    _, official = _official_keys(reference_dir, "glip_t")
    del official["rpn.head.bias0"]
    official["rpn.head.extra_thing.weight"] = torch.empty(3, device="meta")
    official["backbone.fpn.fpn_inner2.weight"] = torch.empty(256, 100, 1, 1, device="meta")
    for key in [k for k in official if "cell_anchors" in k]:
        del official[key]
    with torch.device("meta"):
        model = GLIP.from_config(get_preset("glip-t"))
    with pytest.raises(CheckpointMismatchError) as error:
        convert_state_dict(official, model, deep_fusion=True)
    message = str(error.value)
    assert "missing from the checkpoint (1)" in message and "head.bias0" in message
    assert "unexpected in the checkpoint (1)" in message and "rpn.head.extra_thing" in message
    assert "shape mismatches (1)" in message and "fpn_inner2" in message


def test_checkpoint_of_another_model_is_refused(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(10, 512)}, path)
    with pytest.raises(CheckpointMismatchError, match="not a GLIP checkpoint"):
        infer_config(read_official(path))


def test_corrupt_and_truncated_checkpoints_are_refused(tmp_path):
    good = tmp_path / "good.pth"
    torch.save({"model": {"module.backbone.body.patch_embed.proj.weight": torch.zeros(96, 3, 4, 4)}}, good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:100])
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"definitely not a checkpoint")
    for path in (truncated, garbage):
        with pytest.raises(CheckpointMismatchError, match="cannot read"):
            read_official(path)
    assert infer_config(read_official(good)).name == "glip-t-a"


def test_pickled_code_is_never_executed(tmp_path):
    class Boom:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    path = tmp_path / "evil.pth"
    torch.save({"model": Boom()}, path)
    with pytest.raises(CheckpointMismatchError):
        read_official(path)
    assert not (tmp_path / "pwned").exists()


def test_key_table_maps_every_stage():
    assert map_key("backbone.body.layers.2.downsample.reduction.weight", True)[0] == \
        "swin.body.layers.3.downsample.reduction.weight"
    assert map_key("rpn.head.dyhead_tower.4.attention.self.query.weight", True)[0] == \
        "dyhead.layers.1.text_layer.attention.self.query.weight"
    assert map_key("rpn.head.dyhead_tower.3.b_attn.gamma_v", True)[0] == "dyhead.layers.1.fusion.gamma_v"
    assert map_key("rpn.head.dyhead_tower.3.offset.weight", False)[0] == "dyhead.layers.3.dyconv.offset.weight"
    assert map_key("rpn.head.cls_logits.weight", True)[0] is None
    with pytest.raises(KeyError):
        map_key("roi_heads.box.weight", True)


@pytest.mark.parametrize("impl", ["im2col", "gather"])
@pytest.mark.parametrize("stride", [1, 2])
def test_deformable_conv_implementations_match_torchvision_with_gradients(stride, impl):
    torch.manual_seed(stride)
    x = torch.randn(2, 6, 9, 13, dtype=torch.float64)
    out_h, out_w = (9 + 2 - 3) // stride + 1, (13 + 2 - 3) // stride + 1
    offset = torch.randn(2, 18, out_h, out_w, dtype=torch.float64) * 3  # large: many samples fall outside the map
    mask = torch.rand(2, 9, out_h, out_w, dtype=torch.float64)
    weight, bias = torch.randn(5, 6, 3, 3, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    upstream = torch.randn(2, 5, out_h, out_w, dtype=torch.float64)

    def run(which):
        inputs = [t.clone().requires_grad_() for t in (x, offset, mask, weight, bias)]
        out = modulated_deform_conv(*inputs[:4], inputs[4], stride, impl=which)
        return out, torch.autograd.grad((out * upstream).sum(), inputs)

    expected, expected_grads = run("torchvision")
    ours, our_grads = run(impl)
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-10)
    for name, got, want in zip(["x", "offset", "mask", "weight", "bias"], our_grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9, msg=lambda m, name=name: f"d/d{name}: {m}")


def test_factored_fusion_attention_equals_the_direct_order_with_gradients():
    from backbone.fusion import BiMultiHeadAttention
    torch.manual_seed(0)
    attn = BiMultiHeadAttention(visual_dim=32, text_dim=24, embed_dim=64, num_heads=4, dropout=0.0).double().train()
    for parameter in attn.parameters():
        torch.nn.init.normal_(parameter, std=0.3)  # non-zero biases, so the bias terms are exercised
    visual = torch.randn(2, 150, 32, dtype=torch.double, requires_grad=True)
    text = torch.randn(2, 6, 24, dtype=torch.double, requires_grad=True)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2], dtype=torch.bool)
    inputs = [visual, text, *attn.parameters()]
    results = []
    for forward in (attn._forward_direct, attn._forward_factored):
        delta_visual, delta_text = forward(visual, text, mask)
        loss = (delta_visual * torch.linspace(-1, 1, 32, dtype=torch.double)).sum() + (delta_text ** 2).sum()
        results.append((delta_visual, delta_text, *torch.autograd.grad(loss, inputs)))
    for direct, factored in zip(*results):
        torch.testing.assert_close(factored, direct, rtol=1e-9, atol=1e-9)


def test_lora_wrapped_fusion_projections_keep_their_update():
    import copy

    from peft import LoraConfig, inject_adapter_in_model

    from backbone.fusion import BiMultiHeadAttention
    torch.manual_seed(0)
    attn = BiMultiHeadAttention(visual_dim=32, text_dim=24, embed_dim=64, num_heads=4, dropout=0.0).double().eval()
    merged = copy.deepcopy(attn)
    targets = ["v_proj", "values_v_proj", "out_v_proj"]
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=4, target_modules=targets), attn)
    for name in targets:  # a trained adapter: B != 0, merged by hand into the plain copy (scale alpha / r = 2)
        layer = getattr(attn, name)
        torch.nn.init.normal_(layer.lora_B["default"].weight)
        delta = 2.0 * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        getattr(merged, name).weight.data += delta.to(torch.double)
    attn.double()
    visual, text = torch.randn(1, 40, 32, dtype=torch.double), torch.randn(1, 5, 24, dtype=torch.double)
    for got, want in zip(attn(visual, text, None), merged(visual, text, None)):
        torch.testing.assert_close(got, want)
