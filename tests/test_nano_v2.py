"""glip-nano v2's head and text-path options (issue #12): off by default, so GLIP's own behaviour is unchanged."""
import dataclasses
import math

import pytest
import torch

from adapt.strategies import LINEAR_PROBE_PARAMETERS
from backbone.config import get_preset, tiny_for_tests
from backbone.head import VLHead
from backbone.model import GLIP


def tiny_with(*, score: str = "dot", text_layer_scale: float | None = None) -> GLIP:
    config = tiny_for_tests()
    config = config.replace(head=dataclasses.replace(config.head, score=score),
                            fusion=dataclasses.replace(config.fusion, text_layer_scale=text_layer_scale))
    torch.manual_seed(0)
    return GLIP.from_config(config).eval()


def test_cosine_score_ignores_feature_norms_and_starts_within_its_temperature():
    torch.manual_seed(0)
    levels, text = [torch.randn(2, 16, 4, 4)], torch.randn(2, 5, 32)
    cosine = VLHead(channels=16, text_dim=32, num_levels=1, score="cosine")
    dot = VLHead(channels=16, text_dim=32, num_levels=1)
    assert torch.count_nonzero(cosine.dot_product_projection_text.bias) == 0
    bias = text.div(text.norm(dim=-1, keepdim=True)) @ cosine.bias_lang + cosine.bias0
    logits = cosine(levels, text)[2]
    assert (logits - bias[:, None, :]).abs().max() <= 10.0 + 1e-4
    torch.testing.assert_close(cosine([3.0 * levels[0]], text)[2], logits)
    assert not torch.allclose(dot([3.0 * levels[0]], text)[2], dot(levels, text)[2])
    with pytest.raises(ValueError, match="choose one of"):
        VLHead(channels=16, text_dim=32, num_levels=1, score="dotty")


def test_text_layer_scale_zero_keeps_the_normalised_input_text():
    model = tiny_with(text_layer_scale=0.0)
    layer = model.dyhead.layers[0]
    assert torch.count_nonzero(layer.fusion.gamma_l) == 0 and torch.count_nonzero(layer.text_layer_gamma) == 0
    assert torch.all(layer.fusion.gamma_v == 0.5)  # the visual side keeps GLIP's 1 / layers
    text = torch.randn(1, 4, 16)
    levels = [torch.randn(1, 16, 8, 8), torch.randn(1, 16, 4, 4)]
    with torch.no_grad():
        _, out = layer(levels, text, torch.ones(1, 4, dtype=torch.long))
        torch.testing.assert_close(out, layer.fusion.layer_norm_l(text))
        layer.text_layer_gamma.fill_(1.0)  # a scale of 1 is the plain BERT layer again
        _, plain = layer(levels, text, torch.ones(1, 4, dtype=torch.long))
    assert not torch.allclose(plain, out)


def test_defaults_keep_glips_parameters_and_v2_adds_one_per_text_layer():
    glip_keys = set(GLIP.from_config(tiny_for_tests()).state_dict())
    v2_keys = set(tiny_with(score="cosine", text_layer_scale=0.1).state_dict())
    assert v2_keys - glip_keys == {f"dyhead.layers.{i}.text_layer_gamma" for i in range(2)}
    assert glip_keys <= v2_keys
    assert get_preset("glip-t").head.score == "dot" and get_preset("glip-t").fusion.text_layer_scale is None


def test_linear_probe_tensors_exist_in_the_cosine_head():
    keys = set(tiny_with(score="cosine").state_dict())
    assert {name for name in LINEAR_PROBE_PARAMETERS if name.startswith("head.")} <= keys
    assert math.isclose(tiny_with(score="cosine").head.log_scale.detach().item(), -math.log(10.0), rel_tol=1e-6)
